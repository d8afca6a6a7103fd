"""Shared adapters: frozen-encoder item text -> recommendation space.

The adapter is the only part of the model that leaves a partner. Its
``state_dict()`` is the wire format: stable names, trainable weights only (no
buffers, no catalogue, no Opacus ``_module.`` prefix), saved with safetensors.

``moe`` (default)
    Parametric whitening + mixture-of-experts projection, after UniSRec
    (Hou et al., "Towards Universal Sequence Representation Learning for
    Recommender Systems", KDD 2022). Expert k maps a text vector x to
    ``(x - b_k) W_k``; a softmax gate over x mixes the experts. ``(x - b) W`` is
    ``x W - b W``, so each expert is one ``nn.Linear`` with a bias: the same
    function class, and layers Opacus computes per-sample gradients for.
    Works on cached vectors, so the encoder never runs in training.
``lora``
    peft LoRA (Hu et al., ICLR 2022) on the encoder's attention query/value
    projections; the encoder runs inside training (meant for a GPU). Only the
    LoRA matrices are shared.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from shared.checks import Problem, SelfChecking, expect


@dataclass
class MoEAdapterConfig(SelfChecking):
    kind: str = field(default="moe", metadata={"help": "adapter kind; 'moe'"})
    n_experts: int = field(default=4, metadata={"help": "number of whitening + projection experts"})
    dim: int = field(default=128, metadata={"help": "output dimension (the head's width)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the text vector before the experts"})

    def problems(self) -> list[Problem]:
        return expect(
            self,
            ("kind", self.kind == "moe", "'moe'"),
            ("n_experts", self.n_experts >= 1, "a whole number of at least 1"),
            ("dim", self.dim >= 1, "a whole number of at least 1"),
            ("dropout", 0 <= self.dropout < 1, "a probability in [0, 1)"),
        )


@dataclass
class LoraAdapterConfig(SelfChecking):
    kind: str = field(default="lora", metadata={"help": "adapter kind; 'lora'"})
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout inside the LoRA branch"})
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"], metadata={"help": "encoder modules to adapt"})

    def problems(self) -> list[Problem]:
        return expect(
            self,
            ("kind", self.kind == "lora", "'lora'"),
            ("r", self.r >= 1, "a whole number of at least 1"),
            ("alpha", self.alpha > 0, "above 0"),
            ("dropout", 0 <= self.dropout < 1, "a probability in [0, 1)"),
            ("target_modules", bool(self.target_modules), "one or more of the encoder's module names"),
        )


AdapterConfig = MoEAdapterConfig | LoraAdapterConfig


def adapter_config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    kind = d.get("kind", "moe")
    cls = {"moe": MoEAdapterConfig, "lora": LoraAdapterConfig}.get(kind)
    if cls is None:
        raise ValueError(f"unknown adapter kind {kind!r}; expected 'moe' or 'lora'")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {kind} adapter option(s) {unknown}; expected some of {sorted(known)}")
    return cls(**d)


class MoEAdapter(nn.Module):
    """UniSRec-style MoE adapter. x [..., d_enc] -> [..., dim]."""

    def __init__(self, in_dim: int, config: MoEAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.in_dim = in_dim
        self.out_dim = config.dim
        self.experts = nn.Linear(in_dim, config.n_experts * config.dim)
        self.gate = nn.Linear(in_dim, config.n_experts)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert starts as a random orthonormal projection scaled to keep norms,
        # the gate starts uniform: the untrained adapter nearly preserves cosine
        # similarity, so an untrained model already ranks by text similarity.
        k, d = self.config.n_experts, self.config.dim
        weight = torch.empty(k, d, self.in_dim)
        for i in range(k):
            nn.init.orthogonal_(weight[i])
        scale = (self.in_dim / d) ** 0.5 if d < self.in_dim else 1.0
        with torch.no_grad():
            self.experts.weight.copy_(weight.reshape(k * d, self.in_dim) * scale)
            self.experts.bias.zero_()
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = F.softmax(self.gate(x), dim=-1)  # [..., K]
        experts = self.experts(self.dropout(x))  # [..., K * dim]
        experts = experts.unflatten(-1, (self.config.n_experts, self.config.dim))  # [..., K, dim]
        return (gates.unsqueeze(-1) * experts).sum(-2)  # [..., dim]


class LoraAdapter(nn.Module):
    """peft LoRA on the frozen encoder. tokens [M, T] -> mean-pooled [M, hidden]."""

    def __init__(self, encoder_model: nn.Module, config: LoraAdapterConfig) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config
        lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.target_modules))
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            self.model = get_peft_model(encoder_model, lora)
        self.in_dim = self.out_dim = int(encoder_model.config.hidden_size)  # type: ignore[arg-type,union-attr]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from shared.encoder import mean_pool

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)


Adapter = MoEAdapter | LoraAdapter


def build_adapter(config: AdapterConfig, *, in_dim: int, encoder_model: nn.Module | None = None) -> Adapter:
    if isinstance(config, MoEAdapterConfig):
        return MoEAdapter(in_dim, config)
    if encoder_model is None:
        raise ValueError("the lora adapter needs the encoder model")
    return LoraAdapter(encoder_model, config)


def adapter_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The wire format: trainable weights by stable name, detached, contiguous, CPU."""
    module = getattr(adapter, "_module", adapter)  # an Opacus wrapper never leaks its prefix
    if isinstance(module, LoraAdapter):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(module.model)
    else:
        state = module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def state_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Every way ``state`` differs from ``expected`` in form: missing and unexpected names,
    other shapes or dtypes, and non-finite values (one NaN would spread to every partner
    through the average)."""
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    for k in expected:
        if k not in state:
            continue
        got, want = state[k], expected[k]
        if got.shape != want.shape:
            problems.append(f"{k}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{k}: dtype {got.dtype}, expected {want.dtype}")
        elif got.is_floating_point() and not bool(torch.isfinite(got).all()):
            problems.append(f"{k}: {int((~torch.isfinite(got)).sum())} non-finite value(s) (NaN or infinity)")
    return problems


def load_adapter_weights(adapter: nn.Module, state: dict[str, torch.Tensor], *, source: str = "state") -> None:
    """Loads wire-format weights, checking them first (:func:`state_problems`, all problems at once)."""
    module = getattr(adapter, "_module", adapter)
    problems = state_problems(state, adapter_state(module))
    if problems:
        raise ValueError(f"{source}: not weights of this adapter (its names, shapes and dtypes, all finite): {'; '.join(problems[:5])}")
    if isinstance(module, LoraAdapter):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module.model, state)
    else:
        module.load_state_dict(state)


def save_adapter(adapter: nn.Module, path: Path, *, config: AdapterConfig) -> None:
    meta = {k: str(v) for k, v in asdict(config).items()}
    save_file(adapter_state(adapter), str(path), metadata=meta)


def load_adapter(adapter: nn.Module, path: Path) -> None:
    load_adapter_weights(adapter, load_file(str(path)), source=str(path))


def n_parameters(adapter: nn.Module) -> int:
    return sum(v.numel() for v in adapter_state(adapter).values())
