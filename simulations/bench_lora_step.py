"""Benchmark: a training step of the lora adapter, each distinct item encoded once vs every row, side by side.

    python -m simulations.bench_lora_step [--domain amazon2018-scientific] [--steps 5] [--batch-size 16] [--negatives 32] [--device cpu]

With LoRA inside the encoder, a step of the sampled softmax runs the encoder on
each user's whole sequence and its negatives: B x (L + 1 + K) rows, most of
them repeats (padding, popular items, negatives drawn from one catalogue).
``DomainModel.item_vectors`` encodes each distinct item of a call once, in
chunks sorted by length and padded to their own longest text, and gathers
its vector for every row; the reference here runs the encoder on every row,
all padded to the longest, as it did before. Same model, same batches, the two steps taken in
turn so that machine noise hits them alike; the figures per step are the
median time, the encoder's rows and the bytes autograd saves for the backward
pass (what bounds the batch on a GPU). The defaults keep the every-row step to
seconds on 2 CPU cores; ``fedxrec train``'s are 128 users and 256 negatives.
"""

from __future__ import annotations

import argparse
import copy
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.device import DEVICES, training_device
from shared.encoder import TextEncoder
from shared.model.adapters import LoraAdapterConfig
from shared.model.recommender import DomainModel
from shared.pipeline import ModelConfig, build_model, new_adapter, prepare_domain
from shared.training import training_batches
from shared.vector_cache import VectorCache
from simulations.common import add_domain_flag, add_out_flag, machine, real_domain, write_json

STEPS = {"distinct": "each distinct item once", "every-row": "every row (before)"}


def every_row_item_vectors(self: DomainModel, index: torch.Tensor) -> torch.Tensor:
    """The lora adapter on every row of ``index`` [...] -> [..., d]: the reference."""
    assert self.features.input_ids is not None and self.features.attention_mask is not None
    flat = index.reshape(-1)
    ids, mask = self.features.input_ids[flat], self.features.attention_mask[flat]
    width = int(mask.sum(1).max().clamp(min=1))
    return self.adapter(ids[:, :width], mask[:, :width]).reshape(*index.shape, -1)


def adds_rows_to(counts: list[int]) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
    """A forward pre-hook for the adapter: adds the rows of each call to ``counts[-1]``."""

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        counts[-1] += len(args[0])

    return hook


class SavedBytes:
    """Counts the bytes autograd saves for the backward pass while active (views of one tensor count each time)."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += t.numel() * t.element_size()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_domain_flag(parser, "amazon2018-scientific")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind, taken in turn, after one warm-up (default: 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="users per step (default: 16)")
    parser.add_argument("--negatives", type=int, default=32, help="uniform negatives per user (default: 32)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where every step runs")
    add_out_flag(parser, "runs/bench-lora-step")
    args = parser.parse_args()
    device = training_device(args.device)
    encoder = TextEncoder()
    domain = prepare_domain(real_domain(args.domain), encoder=encoder, cache=VectorCache(), progress=False)
    config = ModelConfig(adapter=LoraAdapterConfig(dropout=0.0))
    torch.manual_seed(0)
    # eval(): no dropout anywhere, so the two steps compute one function (the gradients flow all the same)
    model = build_model(domain, config, adapter=new_adapter(config, encoder), encoder=encoder).to(device).eval()
    models = {"distinct": model, "every-row": copy.deepcopy(model)}
    models["every-row"].item_vectors = types.MethodType(every_row_item_vectors, models["every-row"])  # type: ignore[method-assign]
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for name, m in models.items()}

    batches = training_batches(domain.split, np.random.default_rng(0), batch_size=args.batch_size, max_len=config.head.max_len)
    times: dict[str, list[float]] = {name: [] for name in STEPS}
    saved: dict[str, list[int]] = {name: [] for name in STEPS}
    losses: dict[str, list[float]] = {name: [] for name in STEPS}
    encoded: dict[str, list[int]] = {name: [] for name in STEPS}  # encoder rows of each step
    for name, m in models.items():  # what each step's encoder calls really take
        m.adapter.register_forward_pre_hook(adds_rows_to(encoded[name]))
    for step in range(args.steps + 1):
        inputs, targets = next(batches)
        negatives = torch.randint(1, domain.split.n_items + 1, (len(inputs), args.negatives))
        inputs, targets, negatives = inputs.to(device), targets.to(device), negatives.to(device)
        for name in STEPS:
            encoded[name].append(0)
            counter = SavedBytes()
            t0 = time.perf_counter()
            with counter.hooks():
                loss = models[name].sampled_loss(inputs, targets, negatives)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - t0)
                saved[name].append(counter.total)
                losses[name].append(float(loss.detach()))
    rows, distinct = (float(np.mean(encoded[name][1:])) for name in ("every-row", "distinct"))
    ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    mb = {name: float(np.mean(s)) / 2**20 for name, s in saved.items()}
    print(
        f"\n{args.domain}: lora adapter, batch {args.batch_size} users, {args.negatives} negatives per user, {args.steps} steps each, on {device}"
    )
    print(f"{machine()}")
    print(f"encoder rows per step: every row {rows:,.0f}, distinct items {distinct:,.0f} (mean)")
    for name, label in STEPS.items():
        ratio = "" if name == "every-row" else f"   {ms['every-row'] / ms[name]:.2f}x faster, {mb['every-row'] / mb[name]:.2f}x less saved"
        print(f"{label:<26} {ms[name]:10.1f} ms (median)  {mb[name]:9.1f} MB saved for backward{ratio}")
    gap = max(abs(a - b) for a, b in zip(losses["distinct"], losses["every-row"], strict=True))
    print(f"largest difference between the two steps' losses: {gap:.2e}")
    write_json(
        Path(args.out) / "benchmark.json",
        {
            "distinct_ms": ms["distinct"],
            "every_row_ms": ms["every-row"],
            "speedup": ms["every-row"] / ms["distinct"],
            "distinct_saved_mb": mb["distinct"],
            "every_row_saved_mb": mb["every-row"],
            "rows": rows,
            "distinct_rows": distinct,
            "largest_loss_difference": gap,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "negatives": args.negatives,
            "device": str(device),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
