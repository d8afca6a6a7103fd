"""The federation's centralised counterpart: pooled partners train one adapter, alone ones their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client import partner
from shared.federation.scenario import PartnerSpec, synthetic_scenario
from shared.federation.settings import FederationSettings
from shared.training import PRIOR_SCALES
from simulations import centralised
from simulations.federations import scenario_file


def two_partners(root: Path) -> list[PartnerSpec]:
    return synthetic_scenario(root, partners=2)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s weights as they are now."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_pooled_partners_train_one_adapter_and_partners_alone_their_own(tmp_path: Path) -> None:
    specs = two_partners(tmp_path)
    settings = FederationSettings(dp=False, rounds=1, local_epochs=1, batch_size=32)
    data = {s.name: partner.partner_data(s, max_len=partner.HEAD.max_len) for s in specs}
    a, b = (s.name for s in specs)

    alone = centralised.arm_models("alone", data, settings)
    start = weights(alone[a].adapter)
    centralised.run_arm("alone", alone, data, settings, log=lambda _: None)
    trained_a, trained_b = weights(alone[a].adapter), weights(alone[b].adapter)
    assert any(not torch.equal(trained_a[k], start[k]) for k in start)
    assert any(not torch.equal(trained_a[k], trained_b[k]) for k in start)  # each its own

    pooled = centralised.arm_models("pooled", data, settings)
    result = centralised.run_arm("pooled", pooled, data, settings, log=lambda _: None)
    assert pooled[a].adapter is pooled[b].adapter
    assert all(not p.requires_grad for m in pooled.values() for p in m.head.parameters())  # trains = "adapter"
    assert any(not torch.equal(weights(pooled[a].adapter)[k], trained_a[k]) for k in start)  # saw b's batches too
    assert [h["round"] for h in result[a]["history"]] == [1]
    assert set(result[b]["history"][0]) == {"round", "epochs", "valid", "test"}


@pytest.mark.slow
def test_the_command_writes_a_row_per_partner_with_each_rounds_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = two_partners(tmp_path)
    scenario = scenario_file(specs, tmp_path / "two.toml")
    out = tmp_path / "out"
    centralised.main(["--scenario", str(scenario), "--rounds", "2", "--local-epochs", "1", "--batch-size", "32", "--out", str(out)])
    lines = (out / "centralised.md").read_text().splitlines()
    assert lines[2].startswith("| partner | alone / pooled, round 1 | alone / pooled, round 2 | change in test NDCG@10")
    assert "| prior's factor, alone / pooled | calibrated: change in test NDCG@10" in lines[2]
    assert [line.split(" | ")[0] for line in lines[4:]] == [f"| {s.name}" for s in specs]
    assert all(line.count("|") == lines[2].count("|") for line in lines[3:])
    result = json.loads((out / "centralised.json").read_text())
    for s in specs:
        row = result["partners"][s.name]
        assert [h["round"] for h in row["history"]["pooled"]] == [1, 2]
        assert row["test"]["users"] > 0 and "z" in row["test"]
        assert set(row["prior-factor"]) == {"alone", "pooled"} and all(f in PRIOR_SCALES for f in row["prior-factor"].values())
        assert row["calibrated"]["test"]["users"] == row["test"]["users"]


def test_pooling_needs_two_partners(books_and_games: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        centralised.main(["--scenario", str(books_and_games), "--partners", "books"])
    assert "pooling needs two partners, got ['books']" in capsys.readouterr().err


@pytest.mark.slow
def test_share_head_trains_one_head_for_the_pooled_partners(tmp_path: Path) -> None:
    specs = two_partners(tmp_path)
    settings = FederationSettings(dp=False, rounds=1, local_epochs=1, batch_size=32, trains="all")
    data = {s.name: partner.partner_data(s, max_len=partner.HEAD.max_len) for s in specs}
    models = centralised.arm_models("pooled", data, settings)
    a, b = models.values()
    start = weights(a.head)
    centralised.run_arm("pooled", models, data, settings, log=lambda _: None)
    assert a.head is b.head and a.adapter is b.adapter
    assert all(p.requires_grad for p in a.head.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in a.head.state_dict().items())  # the shared head trained
