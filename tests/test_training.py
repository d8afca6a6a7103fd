"""The non-DP training loop (learning-rate halving, early stopping) and scoring by several models' mean."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from shared.data.readers import read_domain
from shared.data.split import DomainSplit, split_domain
from shared.evaluation import metrics_from_ranks, pad_histories, user_ranks
from shared.model.adapters import MoEAdapter, MoEAdapterConfig
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.training import PRIOR_SCALES, DomainRun, TrainConfig, averaged_scorer, calibrate_prior, ranking_metrics, train


def test_lr_halves_after_stale_epochs_and_training_stops_at_patience(synthetic: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    split = split_domain(read_domain(synthetic[0]))
    vectors = F.normalize(torch.randn(split.n_items + 1, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    model = DomainModel(
        adapter=MoEAdapter(16, MoEAdapterConfig(n_experts=2, dim=8)),
        features=ItemFeatures(vectors=vectors),
        head_config=HeadConfig(n_layers=1, max_len=8),
        item_counts=torch.as_tensor(split.item_popularity()),
    )
    scores = iter([0.10, 0.20, 0.15, 0.15, 0.15, 0.15, 0.15])  # epoch 0, 1, then stale
    monkeypatch.setattr("shared.training.evaluate_model", lambda run, which: {"ndcg@10": next(scores)})
    lines: list[str] = []
    config = TrainConfig(epochs=10, batch_size=64, lr=1e-3, patience=4, lr_patience=2)
    history = train([DomainRun(split, model)], config, log=lines.append)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5]  # 4 stale epochs after the best (1)
    assert [line for line in lines if "halved" in line] == ["learning rate halved to 5.00e-04", "learning rate halved to 2.50e-04"]
    assert lines[-1] == "best epoch 1 (mean valid NDCG@10 0.2000)"


def small_model(split: DomainSplit, seed: int) -> DomainModel:
    torch.manual_seed(seed)
    vectors = F.normalize(torch.randn(split.n_items + 1, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    return DomainModel(
        adapter=MoEAdapter(16, MoEAdapterConfig(n_experts=2, dim=8)),
        features=ItemFeatures(vectors=vectors),
        head_config=HeadConfig(n_layers=1, max_len=8),
        item_counts=torch.as_tensor(split.item_popularity()),
    )


def test_several_models_rank_by_the_mean_of_their_scores(synthetic: list[Path]) -> None:
    split = split_domain(read_domain(synthetic[0]))
    a, b = small_model(split, 0), small_model(split, 1)
    a.eval(), b.eval()
    seqs, lengths = pad_histories([split.history(u, "test") for u in split.eval_users("test")[:5]], 8)
    mean = (a.score_all(seqs, lengths) + b.score_all(seqs, lengths)) / 2  # [5, N]
    assert torch.allclose(averaged_scorer([a, b])(seqs, lengths), mean)
    assert not torch.allclose(mean, a.score_all(seqs, lengths))  # two different members
    for which in ("valid", "test"):
        by_hand = user_ranks(lambda s, n: (a.score_all(s, n) + b.score_all(s, n)) / 2, split, which, max_len=8)
        assert ranking_metrics([a, b], split, which) == pytest.approx(metrics_from_ranks(by_hand))
    assert ranking_metrics([a], split, "test") == ranking_metrics(a, split, "test")

    bigger = DomainModel(
        adapter=MoEAdapter(16, MoEAdapterConfig(n_experts=2, dim=8)),
        features=ItemFeatures(vectors=torch.randn(split.n_items + 6, 16)),
        head_config=HeadConfig(n_layers=1, max_len=8),
    )
    with pytest.raises(ValueError, match="different catalogues"):
        averaged_scorer([a, bigger])
    with pytest.raises(ValueError, match="at least one model"):
        averaged_scorer([])


def test_calibrate_prior_keeps_the_factor_with_the_best_valid_ndcg(synthetic: list[Path]) -> None:
    split = split_domain(read_domain(synthetic[0]))
    model = small_model(split, 0)
    assert model.popularity is not None
    with torch.no_grad():
        model.popularity.weight.fill_(0.3)
    by_hand = {}
    for factor in PRIOR_SCALES:  # each factor scored as a model of its own
        probe = copy.deepcopy(model)
        assert probe.popularity is not None
        with torch.no_grad():
            probe.popularity.weight.mul_(factor)
        by_hand[factor] = ranking_metrics(probe, split, "valid")["ndcg@10"]
    factor, by_scale = calibrate_prior(DomainRun(split, model))
    assert by_scale == pytest.approx(by_hand)
    assert by_scale[factor] == max(by_scale.values()) and (factor == 1.0 or by_scale[1.0] < by_scale[factor])
    assert float(model.popularity.weight.detach()) == pytest.approx(0.3 * factor)
    assert ranking_metrics(model, split, "valid")["ndcg@10"] == pytest.approx(by_scale[factor])  # the model now scores so


def test_calibrate_prior_keeps_the_trained_weight_on_a_tie_and_skips_a_model_without_prior(synthetic: list[Path]) -> None:
    split = split_domain(read_domain(synthetic[0]))
    even = small_model(split, 0)
    even.log_counts = torch.ones_like(even.log_counts)  # the same count for every item: no factor changes a rank
    assert even.popularity is not None
    with torch.no_grad():
        even.popularity.weight.fill_(0.3)
    factor, by_scale = calibrate_prior(DomainRun(split, even))
    assert factor == 1.0 and len(set(by_scale.values())) == 1 and float(even.popularity.weight.detach()) == pytest.approx(0.3)
    plain = DomainModel(
        adapter=MoEAdapter(16, MoEAdapterConfig(n_experts=2, dim=8)),
        features=ItemFeatures(vectors=torch.randn(split.n_items + 1, 16)),
        head_config=HeadConfig(n_layers=1, max_len=8),
    )
    assert calibrate_prior(DomainRun(split, plain)) == (1.0, {})


def test_training_with_calibrate_prior_ends_with_the_factor_it_chose(synthetic: list[Path]) -> None:
    split = split_domain(read_domain(synthetic[0]))
    model = small_model(split, 0)
    untrained = ranking_metrics(model, split, "valid")["ndcg@10"]
    lines: list[str] = []
    history = train([DomainRun(split, model)], TrainConfig(epochs=3, batch_size=64, calibrate_prior=True), log=lines.append)
    last = history[-1]
    assert last["epoch"] == "prior" and isinstance(last["prior_scale"], dict)
    factor = last["prior_scale"][split.name]
    assert factor in PRIOR_SCALES and lines[-1].startswith(f"{split.name}: popularity prior's weight x{factor:g} (valid NDCG@10 ")
    epochs: list[dict[str, Any]] = history[:-1]
    assert epochs[0]["valid_ndcg@10"][split.name] == pytest.approx(untrained)  # each record keeps the weight as trained's score
    # the epoch kept is the best as kept: calibrated; the model scores what that epoch's record says
    kept = max(epochs, key=lambda h: h["mean_calibrated_valid_ndcg@10"])
    assert kept["prior_scale"][split.name] == factor
    assert ranking_metrics(model, split, "valid")["ndcg@10"] == pytest.approx(kept["calibrated_valid_ndcg@10"][split.name])
    assert lines[-2] == f"best epoch {kept['epoch']} (mean calibrated valid NDCG@10 {kept['mean_calibrated_valid_ndcg@10']:.4f})"
    assert [
        h["epoch"] for h in train([DomainRun(split, small_model(split, 0))], TrainConfig(epochs=1, batch_size=64), log=lines.append)
    ] == [0, 1]


def test_with_calibrate_prior_the_epoch_is_picked_by_its_calibrated_score(synthetic: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 1 is best as trained, epoch 0 once calibrated: epoch 0 is kept, its weight scaled by its own factor."""
    split = split_domain(read_domain(synthetic[0]))
    model = small_model(split, 0)
    start = copy.deepcopy(model.state_dict())
    scores = iter([{1.0: 0.10, 2.0: 0.30}, {1.0: 0.20, 0.5: 0.21}, {1.0: 0.15, 4.0: 0.16}, {1.0: 0.15}])
    monkeypatch.setattr("shared.training.valid_ndcg_by_prior_scale", lambda run: next(scores))
    lines: list[str] = []
    config = TrainConfig(epochs=10, batch_size=64, patience=3, calibrate_prior=True)
    history = train([DomainRun(split, model)], config, log=lines.append)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, "prior"]
    assert [h["prior_scale"] for h in history] == [{split.name: f} for f in (2.0, 0.5, 4.0, 1.0, 2.0)]
    assert lines[-2:] == [
        "best epoch 0 (mean calibrated valid NDCG@10 0.3000)",
        f"{split.name}: popularity prior's weight x2 (valid NDCG@10 0.1000 -> 0.3000)",
    ]
    kept = model.state_dict()
    assert model.popularity is not None and "popularity.weight" in kept
    for name, value in start.items():
        expected = value * 2 if name == "popularity.weight" else value
        assert torch.equal(kept[name], expected), name
