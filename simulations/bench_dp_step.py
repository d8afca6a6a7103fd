"""Benchmark: the cost of a DP-SGD step next to the same step without DP, side by side.

    python -m simulations.bench_dp_step [--domain amazon2018-scientific] [--steps 30] [--trains adapter] [--device cpu]

Same model, same batches (a user-level batch of the domain's training sequences,
sampled softmax with per-user negatives), alternating DP and non-DP steps so that
machine noise hits both alike. The DP step is Opacus: per-sample gradients,
per-user clipping, Gaussian noise, accountant step. Both steps train what a
partner trains under DP (``--trains``, default the federation's: the adapter),
with the allocator setting that training uses (``shared/allocator.py``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from client.local_training import freeze_untrained, trainable_parameters, trim_padding, user_sequences
from client.partner import HEAD, PartnerData, build_model, partner_data
from shared.allocator import keep_freed_memory
from shared.device import DEVICES, training_device
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import TRAINS, FederationSettings
from shared.model.recommender import DomainModel
from simulations.common import machine, real_domain, write_json


def model_for(data: PartnerData, settings: FederationSettings) -> DomainModel:
    return build_model(settings, data, adapter_arrays=initial_adapter(settings, in_dim=int(data.vectors.shape[1])), head=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--domain", default="amazon2018-scientific")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trains", choices=TRAINS, default=FederationSettings.trains, help="what both steps train")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where both steps run (the run setting 'device')")
    parser.add_argument("--out", default="runs/bench-dp-step")
    args = parser.parse_args()
    settings = FederationSettings(batch_size=args.batch_size, trains=args.trains, device=args.device)
    device = training_device(args.device)
    keep_freed_memory()
    data = partner_data(PartnerSpec(args.domain, real_domain(args.domain)), max_len=HEAD.max_len)
    examples = user_sequences(data.split, max_len=HEAD.max_len)
    torch.manual_seed(0)
    plain, private = model_for(data, settings), model_for(data, settings)
    freeze_untrained(plain, settings.trains)
    freeze_untrained(private, settings.trains)
    plain_opt = torch.optim.AdamW(trainable_parameters(plain), lr=1e-3)
    loader = DataLoader(examples, batch_size=args.batch_size, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        dp_model, dp_opt, _ = engine.make_private(
            module=private,
            optimizer=torch.optim.AdamW(trainable_parameters(private), lr=1e-3),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator(device=device),
        )
    n_items = data.split.n_items
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    rows: list[int] = []
    batches = iter(loader)
    for step in range(args.steps + 3):
        inputs, targets = trim_padding(*next(batches))
        rows.append(inputs.shape[1] + 1 + settings.negatives)  # adapter rows per user
        negatives = torch.randint(1, n_items + 1, (len(inputs), settings.negatives))
        inputs, targets, negatives = inputs.to(device), targets.to(device), negatives.to(device)
        for name, module, opt in (("plain", plain, plain_opt), ("dp", dp_model, dp_opt)):
            t0 = time.perf_counter()
            loss = module(inputs, targets, negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()  # a GPU step ends when its kernels do, not when they are queued
            if step >= 3:  # warm-up steps are not counted
                times[name].append(time.perf_counter() - t0)
    plain_ms, dp_ms = 1000 * np.median(times["plain"]), 1000 * np.median(times["dp"])
    print(
        f"\n{args.domain}: batch {args.batch_size} users, {settings.negatives} negatives per user, {args.steps} steps each, on {device}; {machine()}"
    )
    print(
        f"trained: {args.trains} ({sum(p.numel() for p in trainable_parameters(plain)):,} weights); adapter rows per user: {np.mean(rows):.0f} (mean)"
    )
    print(f"step without DP: {plain_ms:8.1f} ms (median)")
    print(f"step with DP:    {dp_ms:8.1f} ms (median)")
    print(f"DP / no DP:      {dp_ms / plain_ms:8.2f}x")
    write_json(
        Path(args.out) / "benchmark.json",
        {
            "plain_ms": plain_ms,
            "dp_ms": dp_ms,
            "ratio": dp_ms / plain_ms,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "trains": args.trains,
            "device": str(device),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
