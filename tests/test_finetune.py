"""A partner's local fine-tune after the federation (``fedxrec finetune``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file, save_file

from client import finetune as finetune_module
from client import partner
from client.client_app import evaluate, train
from client.private_state import GLOBAL_ADAPTER, PRIOR_SCALE, PartnerState, read_kept_adapter
from shared import training
from shared.cli import main
from shared.federation import wire
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec
from shared.pipeline import load_domain_model
from shared.training import DomainRun, TrainConfig, ranking_metrics
from tests.test_federation import ENCODER_DIM, context, message, settings_for

FAST = ["--epochs", "2", "--batch-size", "64"]


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def federate_one_round(tmp_path: Path, **settings_overrides: object) -> tuple[Path, Path, dict[str, float]]:
    """One DP round and its evaluation through the ClientApp: (state folder, data folder, evaluate's metrics)."""
    settings = settings_for(tmp_path, **settings_overrides)
    ctx = context()
    reply = train(message(MessageType.TRAIN, initial_adapter(settings, in_dim=ENCODER_DIM), settings, 1), ctx)
    arrays = reply.content[wire.ARRAYS].to_torch_state_dict()
    # what the server would send for evaluation: the new global adapter (here, the one reply)
    evaluated = evaluate(message(MessageType.EVALUATE, arrays, settings, 1), ctx)
    folder = tmp_path / "test" / "partners" / "books"
    kept = load_file(str(folder / GLOBAL_ADAPTER))
    assert kept.keys() == arrays.keys() and all(torch.equal(kept[k], arrays[k]) for k in arrays)
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    return folder, spec.data, dict(evaluated.content[wire.METRICS])


@pytest.mark.slow
def test_finetune_starts_from_the_federated_model_and_only_reads_the_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, data, evaluated = federate_one_round(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "finetuned"
    assert main(["finetune", "--state-dir", str(folder), "--data", str(data), "--out", str(out), *FAST]) == 0
    result = json.loads((out / "metrics.json").read_text())
    # the start is exactly the federated model the partner evaluated (global adapter, private head and prior)
    assert result["federated"]["test"]["ndcg@10"] == pytest.approx(evaluated["test-ndcg@10"])
    assert result["federated"]["valid"]["recall@10"] == pytest.approx(evaluated["valid-recall@10"])
    assert result["from"]["run_id"] == "test" and result["from"]["round"] == 1
    # the default mode tries both and keeps the better on the partner's valid users
    modes = result["modes"]
    assert set(modes) == {"recipe", "continue"} and result["fine-tuned"] == modes[result["mode"]]
    assert modes[result["mode"]]["valid"]["ndcg@10"] == max(m["valid"]["ndcg@10"] for m in modes.values())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # a DP round from this state stays possible
    assert "fine-tuned" in capsys.readouterr().out

    loaded = load_domain_model(out / "model")  # what 'fedxrec recommend' serves
    item_ids = loaded.item_ids[:3]
    assert main(["recommend", "--model", str(out / "model"), "--history", *item_ids, "-k", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    index = json.loads((out / "model" / "model.json").read_text())
    assert index["mode"] == "finetune" and index["federated"]["round"] == 1


@pytest.mark.slow
def test_finetune_errors_name_what_is_missing_or_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, data, _ = federate_one_round(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["finetune", "--state-dir", str(empty), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{empty / 'state.pt'} not found" in err and GLOBAL_ADAPTER in err and "Traceback" not in err
    other = data.parent / "games"  # another domain's data: another catalogue
    assert main(["finetune", "--state-dir", str(folder), "--data", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "not the catalogue the model in" in capsys.readouterr().err
    assert main(["finetune", "--state-dir", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "--state-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_continue_trains_the_adapter_and_prior_and_keeps_the_head(tmp_path: Path) -> None:
    # with calibrate-prior the partner was scored with its prior's weight scaled: the fine-tune starts from that model
    folder, data, evaluated = federate_one_round(tmp_path, calibrate_prior=True)
    out = tmp_path / "continued"
    assert main(["finetune", "--mode", "continue", "--state-dir", str(folder), "--data", str(data), "--out", str(out), *FAST]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["federated"]["test"]["ndcg@10"] == pytest.approx(evaluated["test-ndcg@10"])
    assert result["federated"]["valid"]["ndcg@10"] == pytest.approx(evaluated["valid-ndcg@10"])
    loaded = load_domain_model(out / "model").members[0]
    head = PartnerState.load(folder).head
    assert head is not None
    saved = loaded.state_dict()
    # the head is the federation's, untouched; the prior counts are the federation's kind (last 2 items, exact)
    assert all(torch.equal(saved[k], v) for k, v in head.items() if k.startswith("head."))
    kept = load_file(str(folder / GLOBAL_ADAPTER))
    if result["fine-tuned"]["valid"]["ndcg@10"] > result["federated"]["valid"]["ndcg@10"]:  # an epoch beat the start
        assert any(not torch.equal(saved[f"adapter.{k}"], v) for k, v in kept.items())


@pytest.mark.slow
def test_finetune_trains_from_the_prior_weight_as_trained_and_calibrates_it_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the partner was scored with its prior's weight x4: "before" is that model, but no training step uses the factor
    folder, data, _ = federate_one_round(tmp_path, calibrate_prior=True)
    arrays, meta = read_kept_adapter(folder)
    assert arrays is not None
    save_file(arrays, str(folder / GLOBAL_ADAPTER), metadata={**meta, PRIOR_SCALE: "4.0"})
    head = PartnerState.load(folder).head
    assert head is not None
    starts: list[torch.Tensor] = []
    calibrated: list[bool] = []

    def watched_train(runs: list[DomainRun], config: TrainConfig, **kwargs: Any) -> list[dict[str, object]]:
        starts.extend(r.model.state_dict()["popularity.weight"].clone() for r in runs)
        calibrated.append(config.calibrate_prior)
        return training.train(runs, config, **kwargs)

    monkeypatch.setattr(finetune_module, "train", watched_train)
    logged: list[str] = []
    result = finetune_module.finetune(
        state_dir=folder, data=data, out=tmp_path / "out", config=TrainConfig(epochs=1, batch_size=64), log=logged.append
    )
    own = partner.partner_data(PartnerSpec(data.name, data), max_len=partner.HEAD.max_len)
    scaled = {**head, "popularity.weight": head["popularity.weight"] * 4}
    before = partner.build_model(settings_for(tmp_path), own, adapter_arrays=arrays, head=scaled)
    assert result["federated"]["valid"] == pytest.approx(ranking_metrics(before, own.split, "valid"))
    assert len(starts) == 2 and all(torch.equal(w, head["popularity.weight"]) for w in starts)  # both modes
    assert calibrated == [True, True] and any("judges each epoch with the weight calibrated again" in line for line in logged)
    # asked not to, it keeps the weight as trained
    calibrated.clear()
    args = ["finetune", "--mode", "continue", "--no-calibrate-prior", "--state-dir", str(folder), "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "as-trained"), "--epochs", "1"]) == 0
    assert calibrated == [False]


@pytest.mark.slow
def test_finetune_seeds_keeps_the_ensemble_or_its_best_member_by_valid_and_serves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, data, _ = federate_one_round(tmp_path)
    out = tmp_path / "ensemble"
    args = ["finetune", "--mode", "recipe", "--seeds", "3", "--seed", "5", "--state-dir", str(folder), "--data", str(data)]
    assert main([*args, "--out", str(out), *FAST]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [s["seed"] for s in result["seeds"]] == [5, 6, 7] and result["mode"] == "recipe"
    best = max(result["seeds"], key=lambda s: s["valid"]["ndcg@10"])
    ensemble_wins = result["ensemble"]["valid"]["ndcg@10"] >= best["valid"]["ndcg@10"]
    assert result["kept"] == ("ensemble" if ensemble_wins else f"seed {best['seed']}")
    assert result["fine-tuned"] == (result["ensemble"] if ensemble_wins else {w: best[w] for w in ("valid", "test")})
    assert "ensemble" in capsys.readouterr().out

    # what 'fedxrec recommend' serves scores as the kept metrics say
    loaded = load_domain_model(out / "model")
    assert len(loaded.members) == json.loads((out / "model" / "model.json").read_text())["members"] == (3 if ensemble_wins else 1)
    own = partner.partner_data(PartnerSpec(data.name, data), max_len=partner.HEAD.max_len)
    for which in ("valid", "test"):
        assert ranking_metrics(loaded.members, own.split, which) == pytest.approx(result["fine-tuned"][which])

    assert main([*args, "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_experiments_fine_tune_keeps_each_result_and_reads_it_back_when_asked_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations import compare_runs, federations

    folder, data, _ = federate_one_round(tmp_path)
    run, spec = folder.parent.parent, PartnerSpec("books", data)
    config = TrainConfig(epochs=1, batch_size=64)
    first = federations.finetune_partners(run, [spec], config, mode="continue")
    kept = json.loads((run / "finetuned" / "books" / "metrics.json").read_text())
    assert first == {
        "books": {"ndcg@10": kept["fine-tuned"]["test"]["ndcg@10"], "recall@10": kept["fine-tuned"]["test"]["recall@10"], "epsilon": None}
    }
    assert kept["asked"]["mode"] == "continue" and kept["asked"]["config"]["epochs"] == 1
    # compare_runs --finetuned scores that model user by user, as the fine-tune measured it
    row = compare_runs.compare(spec, run=run, baseline=run, finetuned=True)
    assert row["test"]["run"] == pytest.approx(kept["fine-tuned"]["test"]["ndcg@10"]) and row["test"]["difference"] == 0
    assert row["valid"]["run"] == pytest.approx(kept["fine-tuned"]["valid"]["ndcg@10"])
    with pytest.raises(FileNotFoundError, match=r"finetuned/games/model: no fine-tuned model of partner 'games' after"):
        compare_runs.compare(PartnerSpec("games", data), run=run, baseline=run, finetuned=True)

    calls: list[str] = []

    def recorded(**kwargs: object) -> dict[str, object]:
        calls.append(str(kwargs["mode"]))
        return kept

    monkeypatch.setattr(federations, "partner_finetune", recorded)
    assert federations.finetune_partners(run, [spec], config, mode="continue") == first and calls == []
    # asked another way (mode, seeds or training config), it trains again
    federations.finetune_partners(run, [spec], config, mode="recipe")
    federations.finetune_partners(run, [spec], dataclasses.replace(config, seed=1), mode="recipe")
    assert calls == ["recipe", "recipe"]
