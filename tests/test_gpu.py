"""Partners on a CUDA GPU (the run setting ``device``): what only a GPU can show.

Marked ``gpu`` and left out of ``make test`` (CI has no GPU); ``make test-gpu`` runs
them, and fails, naming why, on a machine without one. The device-independent
parts (the setting, its errors, Ray's assignment) are in ``tests/test_device.py``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity
from opacus import GradSampleModule
from torch.utils.data import TensorDataset

from client import partner
from client.client_app import evaluate, train
from client.local_training import DPPlan, train_round
from client.private_state import PartnerState
from shared.cli import main
from shared.device import why_no_gpu
from shared.federation import wire
from shared.federation.adapter import initial_adapter
from shared.model.adapters import adapter_state
from shared.privacy import ledger
from shared.privacy.accounting import Budget, PartnerAccountant
from shared.training import model_user_ranks
from simulations.runner import simulate as run_federation
from tests.test_federation import ENCODER_DIM, context, message, settings_for
from tests.test_privacy import assert_one_example_gradients, tiny_model, users

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _needs_a_gpu() -> Iterator[None]:
    missing = why_no_gpu()
    if missing:
        pytest.fail(f"these tests need a CUDA GPU: {missing}")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in _tensors(v)]
    return []


def test_per_sample_gradients_on_the_gpu_equal_one_example_batches_on_the_cpu() -> None:
    model = tiny_model(released_counts=True, residual=True).to(CUDA)
    inputs, targets, negatives = users()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    wrapped(inputs.to(CUDA), targets.to(CUDA), negatives.to(CUDA)).backward()
    per_sample = {name: p.grad_sample.cpu() for name, p in model.named_parameters()}
    wrapped._close()
    reference = tiny_model(released_counts=True, residual=True)  # on the CPU
    assert_one_example_gradients(per_sample, reference, (inputs, targets, negatives), atol=1e-4, rtol=1e-3)


def test_a_dp_round_on_the_gpu_draws_its_noise_there_and_returns_its_state_on_the_cpu() -> None:
    model = tiny_model(dropout=0.1).to(CUDA)
    before = {k: v.clone() for k, v in adapter_state(model.adapter).items()}
    accountant = PartnerAccountant(Budget(epsilon=8.0, delta=1e-3))
    inputs, targets, _ = users(40, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, state = train_round(
            model, TensorDataset(inputs, targets), epochs=1, batch_size=8, lr=1e-2, negatives=7, seed=0, dp=DPPlan(1.0, 1.0, accountant)
        )
    after = adapter_state(model.adapter)
    assert all(v.device.type == "cpu" for v in after.values()) and any(not torch.equal(before[k], after[k]) for k in before)
    assert accountant.steps == 5 and outcome.steps == 5 and torch.isfinite(torch.tensor(outcome.loss))
    assert all(t.device.type == "cpu" for t in _tensors(state))
    assert all(p.device.type == "cuda" for p in model.parameters())


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
    assert all(t.device.type == "cpu" for t in [*state.head.values(), *_tensors(state.optimizer)])
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


def test_simulated_partners_share_one_gpu_through_flowers_engine(tmp_path: Path, ray_env: Path) -> None:
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
    (run,) = tmp_path.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["partners"]) == ["books", "games"] and all(p["rounds_trained"] == 1 for p in summary["partners"].values())
