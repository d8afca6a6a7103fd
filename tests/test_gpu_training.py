"""DP-SGD on a CUDA GPU: what only a GPU can show, with torch and Opacus alone.

Marked ``gpu`` and left out of ``make test`` (CI has no GPU); ``make test-gpu`` runs
them, and fails, naming why, on a machine without one. A machine that lacks
Flower, Ray or the encoder can still run this file; the partner, simulation and
demo on a GPU are in ``tests/test_gpu_federation.py``. The device-independent
parts (the setting, its errors, Ray's assignment) are in ``tests/test_device.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import TensorDataset

from client.local_training import DPPlan, train_round
from client.per_user_linear import per_user_gradients_only
from shared.model.adapters import adapter_state
from shared.privacy.accounting import Budget, PartnerAccountant
from tests.test_privacy import assert_one_example_gradients, tiny_model, users

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """Every tensor in ``tree`` (dicts, lists and tuples, e.g. an optimizer's state dict)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_in(v)]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in tensors_in(v)]
    return []


def test_per_sample_gradients_on_the_gpu_equal_one_example_batches_on_the_cpu() -> None:
    model = tiny_model(released_counts=True, residual=True).to(CUDA)
    inputs, targets, negatives = users()
    with per_user_gradients_only(model):  # as a DP round trains it
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
    assert all(t.device.type == "cpu" for t in tensors_in(state))
    assert all(p.device.type == "cuda" for p in model.parameters())
