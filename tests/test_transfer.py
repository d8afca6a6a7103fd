"""The pairwise transfer matrix's pieces: scenario files of a pair, like-for-like baselines, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.federation.scenario import PartnerSpec, load_scenario
from simulations import transfer
from simulations.federations import scenario_file


def test_a_written_scenario_reads_back_as_the_same_partners(tmp_path: Path) -> None:
    specs = [
        PartnerSpec("books", (tmp_path / "data" / "books").resolve(), max_users=300, data_format="recbole"),
        PartnerSpec(
            'games "old"', (tmp_path / "data" / "games").resolve(), max_epsilon=4.0, max_delta=1e-5, account=tmp_path / "games.jsonl"
        ),
    ]
    for spec in specs:
        spec.data.mkdir(parents=True)
    assert load_scenario(scenario_file(specs, tmp_path / "scenarios" / "pair.toml")) == specs


def row(change: float, low: float, high: float) -> dict[str, object]:
    return {"test": {"change": change, "change-interval": [low, high]}}


def test_the_matrix_has_a_row_per_partner_scored_and_marks_what_is_more_than_noise() -> None:
    pairs = {
        "pair-a__b": {"a": row(-0.03, -0.06, -0.001), "b": row(0.01, -0.02, 0.04)},
        "pair-a__c": {"a": row(0.0, -0.03, 0.03), "c": row(0.05, 0.01, 0.09)},
        "pair-b__c": {"b": row(-0.01, -0.04, 0.02), "c": row(0.02, -0.01, 0.05)},
    }
    together = {"a": row(-0.04, -0.08, -0.005), "b": row(0.0, -0.02, 0.02), "c": row(0.03, -0.01, 0.07)}
    lines = transfer.matrix(["a", "b", "c"], pairs, together)
    assert lines[0] == "| scored \\ federated with | a | b | c | all together |"
    assert lines[2] == "| a | — | **-3.0%** (-6.0% to -0.1%) | +0.0% (-3.0% to +3.0%) | **-4.0%** (-8.0% to -0.5%) |"
    assert lines[3].startswith("| b | +1.0% (-2.0% to +4.0%) | — | -1.0%")
    assert lines[4].startswith("| c | **+5.0%** (+1.0% to +9.0%) | +2.0%")
    assert len(transfer.matrix(["a", "b", "c"], pairs, None)[0].split("|")) == 6  # no last column without a run


def test_a_baseline_trained_otherwise_is_refused_with_every_difference(tmp_path: Path) -> None:
    base = {"rounds": 3, "local-epochs": 2, "batch-size": 64, "seed": 0, "dp": False, "private-residual": True, "personal-mix": "off"}
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        transfer.check_matches(tmp_path / "nope", base)
    run = tmp_path / "local-books"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**base, "rounds": 6, "dp": True}))
    with pytest.raises(ValueError, match=r"not comparable.*rounds is 6, expected 3; dp is True, expected False"):
        transfer.check_matches(run, base)
    (run / "config.json").write_text(json.dumps(base))
    transfer.check_matches(run, base)


def test_a_pair_needs_two_named_partners(books_and_games: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        transfer.main(["--scenario", str(books_and_games), "--partners", "books", "gear"])
    assert "--partners ['gear'] not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transfer.main(["--scenario", str(books_and_games), "--partners", "books"])
    assert "a pair needs two partners, got ['books']" in capsys.readouterr().err
