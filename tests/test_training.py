"""The non-DP training loop: learning-rate halving and early stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from shared.data.readers import read_domain
from shared.data.split import split_domain
from shared.model.adapters import MoEAdapter, MoEAdapterConfig
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.training import DomainRun, TrainConfig, train


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
