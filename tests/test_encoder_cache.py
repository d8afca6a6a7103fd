"""The frozen encoder and its on-disk cache of item vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.encoder import TextEncoder, make_tiny_encoder
from shared.vector_cache import VectorCache, encode_texts

TEXTS = ["Red mug", "Blue lamp", "Green shirt", "Red mug", "Black poster with a much longer title than the others"]


def test_encoder_runs_once_per_distinct_text_across_two_runs(tiny_encoder: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    # run 1: a fresh process would build a new encoder and cache object; so do we
    first_encoder = TextEncoder(tiny_encoder)
    first, stats1 = encode_texts(TEXTS, encoder=first_encoder, cache=VectorCache(cache_dir), progress=False)
    assert first_encoder.texts_encoded == 4  # "Red mug" twice, encoded once
    assert (stats1.distinct, stats1.encoded, stats1.hits) == (4, 4, 0)
    # run 2: same texts plus one new one
    second_encoder = TextEncoder(tiny_encoder)
    second, stats2 = encode_texts([*TEXTS, "Silver kit"], encoder=second_encoder, cache=VectorCache(cache_dir), progress=False)
    assert second_encoder.texts_encoded == 1
    assert (stats2.encoded, stats2.hits) == (1, 4) and stats2.hit_rate == pytest.approx(0.8)
    np.testing.assert_array_equal(first, second[: len(TEXTS)])
    np.testing.assert_allclose(second[-1], second_encoder.encode(["Silver kit"])[0], atol=1e-6)


def test_cache_is_keyed_by_encoder_fingerprint(tiny_encoder: Path, tmp_path: Path) -> None:
    other = make_tiny_encoder(tmp_path / "other", seed=1)  # same tokenizer, other weights
    a, b = TextEncoder(tiny_encoder), TextEncoder(other)
    assert a.fingerprint != b.fingerprint
    cache = VectorCache(tmp_path / "cache")
    encode_texts(TEXTS, encoder=a, cache=cache, progress=False)
    _, stats = encode_texts(TEXTS, encoder=b, cache=cache, progress=False)
    assert stats.hits == 0 and b.texts_encoded == 4


def test_dynamic_padding_gives_the_same_vectors_as_one_by_one(tiny_encoder: Path) -> None:
    encoder = TextEncoder(tiny_encoder, batch_size=2)
    together = encoder.encode(TEXTS)
    alone = np.stack([encoder.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_real_minilm_is_offline_and_sensible() -> None:
    encoder = TextEncoder()
    assert encoder.dim == 384
    v = encoder.encode(["A telescope for stargazing", "Astronomy telescope with tripod", "Chocolate chip cookie recipe"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert len(encoder.fingerprint) == 64


def test_an_encoder_moved_to_a_device_it_cannot_reach_moves_nothing_while_the_cache_answers(tiny_encoder: Path, tmp_path: Path) -> None:
    cache = VectorCache(tmp_path / "cache")
    encode_texts(TEXTS, encoder=TextEncoder(tiny_encoder), cache=cache, progress=False)
    encoder = TextEncoder(tiny_encoder)
    encoder.use("meta")  # a device no text can be encoded on: the warm cache must not need it
    vectors, stats = encode_texts(TEXTS, encoder=encoder, cache=cache, progress=False)
    assert stats.encoded == 0 and vectors.shape == (len(TEXTS), encoder.dim)
    assert next(encoder.model.parameters()).device.type == "cpu"
    encoder.use("cpu")
    np.testing.assert_allclose(encoder.encode(TEXTS[:1]), vectors[:1], atol=1e-6)


def test_loading_the_encoder_draws_no_progress_bar_and_keeps_the_users_setting(
    tiny_encoder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()  # transformers' default
    TextEncoder(tiny_encoder)
    assert "Loading weights" not in "".join(capfd.readouterr())
    assert transformers_logging.is_progress_bar_enabled()  # on again for anything else the user loads
