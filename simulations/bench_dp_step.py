"""Benchmark: the cost of a DP-SGD step next to the same step without DP, side by side.

    python -m simulations.bench_dp_step [--domain amazon2018-scientific] [--steps 30] [--trains adapter] [--device cpu]

Same model, same batches (a user-level batch of the domain's training sequences,
sampled softmax with per-user negatives), the steps taken in turn so that
machine noise hits them alike. The DP step is a DP round's own Opacus set-up
(``client.local_training.made_private``): per-sample gradients, per-user clipping,
Gaussian noise in Opacus' floating-point-safe form, accountant step, with the linear layers as a DP
round trains them (``client/per_user_linear.py``: no summed gradient that Opacus
would throw away); a third step, Opacus with plain ``nn.Linear`` layers, shows
what that saves. Every step trains what a partner trains under DP (``--trains``,
default the federation's: the adapter), with the allocator setting that training
uses (``shared/allocator.py``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from client.local_training import DPPlan, freeze_untrained, made_private, trainable_parameters, trim_padding, user_sequences
from client.partner import HEAD, PartnerData, build_model, partner_data
from client.per_user_linear import per_user_gradients_only
from shared.allocator import keep_freed_memory
from shared.device import DEVICES, training_device
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import TRAINS, FederationSettings
from shared.model.recommender import DomainModel
from shared.privacy.accounting import Budget, PartnerAccountant
from simulations.common import add_domain_flag, add_out_flag, machine, real_domain, write_json

STEPS = {
    "plain": "step without DP",
    "dp": "step with DP (as a DP round trains)",
    "dp-summed": "step with DP, Opacus' nn.Linear (summed grad)",
}


def model_for(data: PartnerData, settings: FederationSettings) -> DomainModel:
    return build_model(settings, data, adapter_arrays=initial_adapter(settings, in_dim=int(data.vectors.shape[1])), head=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_domain_flag(parser, "amazon2018-scientific")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each kind, taken in turn (default: 30)")
    parser.add_argument("--batch-size", type=int, default=64, help="users per step (default: 64)")
    parser.add_argument("--trains", choices=TRAINS, default=FederationSettings.trains, help="what every step trains")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where every step runs (the run setting 'device')")
    add_out_flag(parser, "runs/bench-dp-step")
    args = parser.parse_args()
    settings = FederationSettings(batch_size=args.batch_size, trains=args.trains, device=args.device)
    device = training_device(args.device)
    keep_freed_memory()
    data = partner_data(PartnerSpec(args.domain, real_domain(args.domain)), max_len=HEAD.max_len)
    examples = user_sequences(data.split, max_len=HEAD.max_len)
    torch.manual_seed(0)
    models = {name: model_for(data, settings) for name in STEPS}
    for model in models.values():
        freeze_untrained(model, settings.trains)
    loader = DataLoader(examples, batch_size=args.batch_size, shuffle=True)
    steps: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {
        "plain": (models["plain"], torch.optim.AdamW(trainable_parameters(models["plain"]), lr=1e-3))
    }
    with per_user_gradients_only(models["dp"]):  # for the whole benchmark, as for a whole DP round
        for name in ("dp", "dp-summed"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module, optimizer, _ = made_private(  # a DP round's own Opacus set-up; its loader is not used
                    models[name],
                    torch.optim.AdamW(trainable_parameters(models[name]), lr=1e-3),
                    examples,
                    batch_size=args.batch_size,
                    dp=DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, ledger=PartnerAccountant(Budget(epsilon=8.0, delta=1e-5))),
                    device=device,
                )
            steps[name] = (module, optimizer)
        times, rows = timed_steps(steps, data=data, settings=settings, loader=loader, n_steps=args.steps, device=device)
    ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    print(
        f"\n{args.domain}: batch {args.batch_size} users, {settings.negatives} negatives per user, {args.steps} steps each, on {device}; {machine()}"
    )
    print(
        f"trained: {args.trains} ({sum(p.numel() for p in trainable_parameters(models['plain'])):,} weights); "
        f"adapter rows per user: {np.mean(rows):.0f} (mean)"
    )
    for name, label in STEPS.items():
        ratio = "" if name == "plain" else f"   {ms[name] / ms['plain']:.2f}x the step without DP"
        print(f"{label:<44} {ms[name]:8.1f} ms (median){ratio}")
    write_json(
        Path(args.out) / "benchmark.json",
        {
            "plain_ms": ms["plain"],
            "dp_ms": ms["dp"],
            "dp_summed_ms": ms["dp-summed"],
            "ratio": ms["dp"] / ms["plain"],
            "ratio_summed": ms["dp-summed"] / ms["plain"],
            "steps": args.steps,
            "batch_size": args.batch_size,
            "trains": args.trains,
            "device": str(device),
            "machine": machine(),
        },
    )


def timed_steps(
    steps: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    *,
    data: PartnerData,
    settings: FederationSettings,
    loader: DataLoader,
    n_steps: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], list[int]]:
    """Seconds per step of each of ``steps`` on the same batches, taken in turn (3 warm-up steps
    not counted), and the adapter rows per user of each counted batch."""
    n_items = data.split.n_items
    times: dict[str, list[float]] = {name: [] for name in steps}
    rows: list[int] = []
    batches = iter(loader)
    for step in range(n_steps + 3):
        inputs, targets = trim_padding(*next(batches))
        negatives = torch.randint(1, n_items + 1, (len(inputs), settings.negatives))
        inputs, targets, negatives = inputs.to(device), targets.to(device), negatives.to(device)
        if step >= 3:
            rows.append(inputs.shape[1] + 1 + settings.negatives)  # adapter rows per user
        for name, (module, opt) in steps.items():
            t0 = time.perf_counter()
            loss = module(inputs, targets, negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()  # a GPU step ends when its kernels do, not when they are queued
            if step >= 3:  # warm-up steps are not counted
                times[name].append(time.perf_counter() - t0)
    return times, rows


if __name__ == "__main__":
    main()
