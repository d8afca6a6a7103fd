"""The adapter's state dict is the wire format: its contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.encoder import TextEncoder
from shared.model.adapters import (
    LoraAdapterConfig,
    MoEAdapter,
    MoEAdapterConfig,
    adapter_state,
    build_adapter,
    load_adapter,
    load_adapter_weights,
    n_parameters,
    save_adapter,
    state_problems,
)

MINILM_BYTES = 90_852_864  # all-MiniLM-L6-v2: 22,713,216 float32 parameters


def test_moe_key_set_is_stable() -> None:
    adapter = MoEAdapter(384, MoEAdapterConfig())
    state = adapter_state(adapter)
    assert sorted(state) == ["experts.bias", "experts.weight", "gate.bias", "gate.weight"]
    assert state["experts.weight"].shape == (4 * 128, 384)
    assert state["gate.weight"].shape == (4, 384)


def test_default_adapter_is_at_most_one_percent_of_the_encoder() -> None:
    params = n_parameters(MoEAdapter(384, MoEAdapterConfig()))
    assert params * 4 <= 0.01 * MINILM_BYTES, params


def test_moe_save_load_save_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    adapter = MoEAdapter(384, MoEAdapterConfig())
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    save_adapter(adapter, tmp_path / "a.safetensors", config=adapter.config)
    fresh = MoEAdapter(384, MoEAdapterConfig())
    load_adapter(fresh, tmp_path / "a.safetensors")
    save_adapter(fresh, tmp_path / "b.safetensors", config=fresh.config)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    x = torch.randn(3, 384)
    adapter.eval()
    fresh.eval()
    torch.testing.assert_close(adapter(x), fresh(x))


def test_wrong_state_is_refused_with_every_difference() -> None:
    small = MoEAdapter(384, MoEAdapterConfig(dim=64))
    big = MoEAdapter(384, MoEAdapterConfig(dim=128))
    state = adapter_state(small)
    state["extra"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"experts.weight: shape \(256, 384\), expected \(512, 384\).*unexpected extra|unexpected extra.*experts.weight"
    ):
        load_adapter_weights(big, state)


def test_non_finite_or_retyped_weights_are_refused_by_name() -> None:
    adapter = MoEAdapter(384, MoEAdapterConfig(dim=64))
    state = adapter_state(adapter)
    state["experts.weight"] = state["experts.weight"].clone()
    state["experts.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    state["gate.weight"] = state["gate.weight"].double()
    assert state_problems(state, adapter_state(adapter)) == [
        "experts.weight: 3 non-finite value(s) (NaN or infinity)",
        "gate.weight: dtype torch.float64, expected torch.float32",
    ]
    with pytest.raises(ValueError, match=r"the server's arrays: not weights of this adapter.*non-finite"):
        load_adapter_weights(adapter, state, source="the server's arrays")


def test_untrained_moe_preserves_cosine_ranking() -> None:
    torch.manual_seed(0)
    adapter = MoEAdapter(384, MoEAdapterConfig(dim=128)).eval()
    # clustered vectors, as text vectors are (random ones are all near-orthogonal)
    centres = torch.randn(10, 384)
    x = torch.nn.functional.normalize(centres.repeat(20, 1) + 0.7 * torch.randn(200, 384), dim=-1)
    y = torch.nn.functional.normalize(adapter(x), dim=-1)
    before, after = (x @ x.T).flatten(), (y @ y.T).flatten()
    assert torch.corrcoef(torch.stack([before, after]))[0, 1] > 0.9


def test_lora_key_set_and_round_trip(tiny_encoder: Path, tmp_path: Path) -> None:
    encoder = TextEncoder(tiny_encoder)
    config = LoraAdapterConfig(r=4)
    adapter = build_adapter(config, in_dim=encoder.dim, encoder_model=encoder.model)
    state = adapter_state(adapter)
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert all("base_layer" not in k for k in state)  # never the frozen encoder
    assert {k.split(".")[-3] for k in state} <= {"query", "value"}
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_adapter(adapter, tmp_path / "a.safetensors", config=config)
    fresh = build_adapter(config, in_dim=encoder.dim, encoder_model=TextEncoder(tiny_encoder).model)
    load_adapter(fresh, tmp_path / "a.safetensors")
    save_adapter(fresh, tmp_path / "b.safetensors", config=config)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
