"""Federated without DP vs local, over several seeds: is the difference larger than the seeds'?

    python -m simulations.seeds [--scenario simulations/scenarios/scientific-office.toml]
        [--seeds 0 1 2] [--rounds 3] [--local-epochs 2] [--proximal-mu 1] [--calibrate-prior]
        [--finetune continue] [--out runs/experiments-seeds]

The same runs as :mod:`simulations.experiments`' ``local`` and ``federated, no DP``
rows (the real ServerApp + ClientApp in Flower's simulation engine), once per
seed. A seed changes the initial adapter, the users' sampling and the negatives.
With ``--proximal-mu`` each seed also runs the federation with FedProx's
proximal term (the ``federated-nodp-prox`` row of :mod:`simulations.experiments`).
``--calibrate-prior`` scores every arm with run setting ``calibrate-prior`` on.
``--finetune MODE`` also gives each partner of ``local`` and of the federation
``fedxrec finetune --mode MODE`` (the same fine-tune on both sides, early stopping on
valid): does the federation's start still lead once each side has trained on?
Writes ``seeds.md`` and ``seeds.json``; a run folder that exists is resumed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from client.finetune import FINETUNE_MODES
from shared.training import TrainConfig
from simulations.common import add_federation_flags, add_out_flag, add_scenario_flag, machine, read_scenario, write_report
from simulations.federations import federate, finetune_partners, one_partner_scenario

# (baseline, arm, the arm's title): each arm is compared with its baseline, seed by seed
PAIRS = (
    ("local", "federated", "federated, no DP"),
    ("local", "federated-prox", "FedProx, no DP"),
    ("local-finetuned", "federated-finetuned", "federated + fine-tune"),
)
TITLES = {"local": "local", "local-finetuned": "local + fine-tune"}


def table(by_seed: dict[int, dict[str, dict[str, float]]], domains: list[str]) -> list[str]:
    """One row per domain and seed, and one with the means over the seeds; for each arm
    of :data:`PAIRS` run on every seed, its baseline, its NDCG@10 and the change."""
    pairs = [(base, arm, title) for base, arm, title in PAIRS if all(arm in r for r in by_seed.values())]
    arms = sorted({k for base, arm, _ in pairs for k in (base, arm)})
    lines = [
        "| domain | seed | " + " | ".join(f"{TITLES[base]} | {title} | change" for base, _, title in pairs) + " |",
        "|---|---|" + "---|---|---|" * len(pairs),
    ]
    for d in domains:
        rows = [(str(seed), {k: v[d] for k, v in r.items()}) for seed, r in by_seed.items()]
        rows.append(("mean", {k: float(np.mean([r[k][d] for r in by_seed.values()])) for k in arms}))
        for label, r in rows:
            cells = " | ".join(f"{r[base]:.4f} | {r[arm]:.4f} | {r[arm] / r[base] - 1:+.1%}" for base, arm, _ in pairs)
            lines.append(f"| {d} | {label} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_scenario_flag(parser, "simulations/scenarios/scientific-office.toml")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds, each a local and a federated run per partner (default: 0 1 2)"
    )
    add_federation_flags(parser, local_epochs=2)
    parser.add_argument(
        "--proximal-mu",
        type=float,
        default=0.0,
        help="also run each seed's federation with FedProx's proximal-mu = this (0: no such column)",
    )
    parser.add_argument(
        "--calibrate-prior",
        action="store_true",
        help="every arm (local and federated) with calibrate-prior = true: each partner's model scored with its prior's "
        "weight calibrated on its validation users",
    )
    parser.add_argument(
        "--finetune",
        choices=FINETUNE_MODES,
        default=None,
        help="also fine-tune each partner of local and of the federation with fedxrec finetune --mode this, "
        "seeded as the run (default: no fine-tune columns)",
    )
    add_out_flag(parser, "runs/experiments-seeds")
    args = parser.parse_args()
    out, scenario = Path(args.out), Path(args.scenario)
    specs = read_scenario(parser, scenario)
    base: dict[str, Any] = {"rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.batch_size}
    if args.calibrate_prior:
        base["calibrate-prior"] = True
    by_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        local = {}
        for spec in specs:
            alone = one_partner_scenario(spec, out / "scenarios")
            local[spec.name] = federate(f"local-{spec.name}-seed{seed}", alone, 1, base, out, dp=False, seed=seed)[spec.name]["ndcg@10"]
        together = federate(f"federated-nodp-seed{seed}", scenario, len(specs), base, out, dp=False, seed=seed)
        by_seed[seed] = {"local": local, "federated": {d: r["ndcg@10"] for d, r in together.items()}}
        if args.finetune:
            config = TrainConfig(calibrate_prior=args.calibrate_prior, seed=seed)
            alone_tuned: dict[str, dict[str, Any]] = {}
            for spec in specs:
                alone_tuned |= finetune_partners(out / f"local-{spec.name}-seed{seed}", [spec], config, mode=args.finetune)
            by_seed[seed]["local-finetuned"] = {d: r["ndcg@10"] for d, r in alone_tuned.items()}
            tuned = finetune_partners(out / f"federated-nodp-seed{seed}", specs, config, mode=args.finetune)
            by_seed[seed]["federated-finetuned"] = {d: r["ndcg@10"] for d, r in tuned.items()}
        if args.proximal_mu:
            prox = federate(
                f"federated-nodp-prox-seed{seed}", scenario, len(specs), {**base, "proximal-mu": args.proximal_mu}, out, dp=False, seed=seed
            )
            by_seed[seed]["federated-prox"] = {d: r["ndcg@10"] for d, r in prox.items()}
    text = [
        f"Scenario {scenario.name}: {args.rounds} rounds x {args.local_epochs} local epoch(s), batch {args.batch_size}"
        + (f", FedProx mu {args.proximal_mu:g}" if args.proximal_mu else "")
        + (", prior's weight calibrated (calibrate-prior)" if args.calibrate_prior else "")
        + (f", fedxrec finetune --mode {args.finetune}" if args.finetune else "")
        + f"; {machine()}",
        "",
        "test NDCG@10",
        "",
        *table(by_seed, [s.name for s in specs]),
    ]
    write_report(out, "seeds", text, {"ndcg@10": by_seed, "args": vars(args)})


if __name__ == "__main__":
    main()
