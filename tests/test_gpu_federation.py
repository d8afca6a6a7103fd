"""Partners on a CUDA GPU through the ClientApp, Flower's simulation engine and the demo.

Marked ``gpu``, like ``tests/test_gpu_training.py``: ``make test-gpu`` runs both on a
machine with a GPU. These need Flower, Ray and the encoder package too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

from client import partner
from client.client_app import evaluate, train
from client.private_state import PartnerState
from shared.cli import main
from shared.data.synthetic import SyntheticConfig, generate
from shared.encoder import TextEncoder
from shared.federation import wire
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec
from shared.privacy import ledger
from shared.training import model_user_ranks
from simulations.runner import simulate as run_federation
from tests.test_federation import ENCODER_DIM, context, message, settings_for
from tests.test_gpu_training import tensors_in

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    # Flower stamps messages with the running task's identity; a test is its own task.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def test_a_partner_on_the_gpu_keeps_the_wire_contract_and_a_state_any_machine_can_load(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, device="cuda")
    arrays = initial_adapter(settings, in_dim=ENCODER_DIM)
    expected = {k: tuple(v.shape) for k, v in arrays.items()}
    ctx = context()
    for server_round in (1, 2):  # round 2 loads the optimizer state that round 1 saved on the CPU
        reply = train(message(MessageType.TRAIN, arrays, settings, server_round), ctx)
        sent = reply.content[wire.ARRAYS].to_torch_state_dict()
        assert {k: tuple(v.shape) for k, v in sent.items()} == expected
        assert set(reply.content[wire.METRICS].keys()) == set(wire.TRAIN_METRICS)
        metrics = dict(reply.content[wire.METRICS])
        assert metrics["declined"] == 0 and metrics["steps"] > 0 and 0 < metrics["epsilon"] <= settings.target_epsilon * 1.011
        assert any(not torch.equal(sent[k], arrays[k]) for k in arrays)
        arrays = sent
        scored = dict(evaluate(message(MessageType.EVALUATE, arrays, settings, server_round), ctx).content[wire.METRICS])
        assert 0 <= scored["test-ndcg@10"] <= 1
    folder = tmp_path / "test" / "partners" / "books"
    state = PartnerState.load(folder)
    assert state.head is not None
    assert all(t.device.type == "cpu" for t in [*state.head.values(), *tensors_in(state.optimizer)])
    check = ledger.verify(folder / "ledger.jsonl")
    assert check.ok and [e["status"] for e in check.entries] == ["trained", "trained"]

    # the same model ranks every user's test item alike on the GPU and on the CPU
    spec = partner.resolve_partner({"partition-id": 0, "num-partitions": 3}, settings)
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    on_gpu = partner.build_model(settings, data, adapter_arrays=arrays, head=state.head)
    on_cpu = partner.build_model(settings_for(tmp_path, device="cpu"), data, adapter_arrays=arrays, head=state.head)
    assert next(on_gpu.parameters()).device.type == "cuda"
    gpu_ranks, cpu_ranks = model_user_ranks(on_gpu, data.split, "test"), model_user_ranks(on_cpu, data.split, "test")
    assert (gpu_ranks == cpu_ranks).float().mean() > 0.99  # float sums in another order may swap near-ties


def test_a_partner_on_the_gpu_encodes_its_catalogue_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDXREC_CACHE", str(tmp_path / "cache"))  # every text a miss
    monkeypatch.setattr(partner, "_ENCODER", None)  # a fresh encoder, loaded on the CPU
    (folder, *_) = generate(tmp_path / "data", SyntheticConfig(users=40, items=30, seed=3))
    partner.partner_data(PartnerSpec("books", folder), max_len=partner.HEAD.max_len, device="cuda")
    on_gpu = partner.encoder()
    assert on_gpu.texts_encoded > 0 and next(on_gpu.model.parameters()).device.type == "cuda"
    texts = ["Red mug", "Blue lamp with a much longer title than the other one"]
    on_cpu = TextEncoder()
    np.testing.assert_allclose(on_gpu.encode(texts), on_cpu.encode(texts), atol=1e-5)
    assert on_gpu.fingerprint == on_cpu.fingerprint  # the cache's key does not depend on the device


@pytest.mark.usefixtures("simulation_processes")
def test_simulated_partners_share_one_gpu_through_flowers_engine(tmp_path: Path) -> None:
    """Two partners with half a GPU each (client-resources-num-gpus = 0.5) train a DP round on it."""
    config = {"rounds": 1, "runs-dir": str(tmp_path / "runs"), "run-id": "gpu", "batch-size": 128, "device": "cuda"}
    run = run_federation(config, partners=2, client_gpus=0.5)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["partner"] for r in rows) == ["books", "games"]
    assert all(r["steps"] > 0 and not r["failed"] and 0 < r["epsilon"] <= 8.0 * 1.011 for r in rows), rows
    for name in ("books", "games"):
        assert ledger.verify(run / "ledger" / f"{name}.jsonl").ok


def test_the_demo_runs_its_partners_on_shares_of_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fedxrec demo --gpus-per-partner 0.5``: the real ``flwr run`` path, with the GPU in its federation config."""
    assert main(["demo", "--out", str(tmp_path), "--rounds", "1", "--partners", "2", "--gpus-per-partner", "0.5"]) == 0
    assert "2 partners (0.5 of a GPU each)" in capsys.readouterr().out
    (summary_file,) = tmp_path.glob("*/summary.json")  # beside the generated data, _data/
    summary = json.loads(summary_file.read_text())
    assert sorted(summary["partners"]) == ["books", "games"] and all(p["rounds_trained"] == 1 for p in summary["partners"].values())
