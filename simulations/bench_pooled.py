"""Benchmark (b): does pooling help? ``pooled`` on beauty + toy + health vs ``local`` on each.

    python -m simulations.bench_pooled [--minutes 8] [--out runs/bench-pooled]

``pooled`` trains one shared adapter (private heads) on all three domains' raw
data in one place: the non-private upper bound the federation is compared with.
Each ``local`` run gets ``--minutes`` of training, the pooled run three times that,
so both see the same compute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.pipeline import train_and_evaluate
from shared.training import TrainConfig
from simulations.common import add_out_flag, machine, real_domain, write_json

DOMAINS = ["amazon2014-beauty", "amazon2014-toy", "amazon2014-health"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--minutes", type=float, default=8.0, help="training cap per local run; pooled gets 3x (default: 8)")
    add_out_flag(parser, "runs/bench-pooled")
    args = parser.parse_args()
    out = Path(args.out)
    folders = [real_domain(d) for d in DOMAINS]
    local: dict[str, dict[str, dict[str, float]]] = {}
    seconds = {}
    for folder in folders:
        local.update(
            train_and_evaluate(
                [folder],
                out / "local" / folder.name,
                mode="local",
                train_config=TrainConfig(epochs=200, patience=5, max_minutes=args.minutes),
            )
        )
        seconds[folder.name] = json.loads((out / "local" / folder.name / "report.json").read_text())["seconds"]["train"]
    pooled = train_and_evaluate(
        folders, out / "pooled", mode="pooled", train_config=TrainConfig(epochs=200, patience=5, max_minutes=3 * args.minutes)
    )
    seconds["pooled"] = json.loads((out / "pooled" / "report.json").read_text())["seconds"]["train"]
    print(f"\nlocal vs pooled, test split, full ranking; {machine()}")
    print(f"{'domain':<20} {'local NDCG@10':>14} {'pooled NDCG@10':>15} {'change':>8}   {'local R@10':>10} {'pooled R@10':>11}")
    rows = {}
    for name in DOMAINS:
        lo, po = local[name]["test"], pooled[name]["test"]
        change = po["ndcg@10"] / lo["ndcg@10"] - 1
        rows[name] = {"local": lo, "pooled": po, "ndcg@10_change": change}
        print(
            f"{name:<20} {lo['ndcg@10']:>14.4f} {po['ndcg@10']:>15.4f} {change:>+8.1%}   {lo['recall@10']:>10.4f} {po['recall@10']:>11.4f}"
        )
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    write_json(out / "benchmark.json", {"domains": rows, "train_seconds": seconds, "machine": machine()})


if __name__ == "__main__":
    main()
