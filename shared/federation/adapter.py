"""The federation's initial adapter: built by the server, the same for every partner."""

from __future__ import annotations

import torch

from shared.federation.settings import FederationSettings
from shared.model.adapters import MoEAdapter, MoEAdapterConfig, adapter_state


def adapter_config(settings: FederationSettings) -> MoEAdapterConfig:
    return MoEAdapterConfig(n_experts=settings.moe_n_experts, dim=settings.moe_dim)


def initial_adapter(settings: FederationSettings, *, in_dim: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(settings.seed)
    return adapter_state(MoEAdapter(in_dim, adapter_config(settings)))
