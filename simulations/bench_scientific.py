"""Benchmark (a): ``local`` on amazon2018-scientific, its own split, vs published results.

    python -m simulations.bench_scientific [--minutes 10] [--no-popularity-prior] [--out runs/bench-scientific]

Full ranking over all 4,385 items (RecBole protocol), no item ids, default
adapter and recipe (with the popularity prior unless ``--no-popularity-prior``).
Published figures on exactly this split (NDCG@10 / Recall@10) are those of the
UniSRec (KDD 2022) and VQ-Rec (WWW 2023) papers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.pipeline import ModelConfig, train_and_evaluate
from shared.training import TrainConfig
from simulations.common import add_out_flag, machine, real_domain, write_json

PUBLISHED = {
    "SASRec (ids)": (0.0553, 0.1080),
    "SASRec (text)": (0.0561, 0.0994),
    "UniSRec (text only)": (0.0641, 0.1188),
    "UniSRec (text + ids)": (0.0634, 0.1235),
    "VQ-Rec": (0.0643, 0.1211),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-time cap (default: 10)")
    parser.add_argument("--no-popularity-prior", action="store_true", help="score by text alone")
    add_out_flag(parser, "runs/bench-scientific")
    args = parser.parse_args()
    out = Path(args.out)
    train = TrainConfig(epochs=200, patience=8, max_minutes=args.minutes)  # lr halves after 2 stale epochs
    model = ModelConfig(popularity_prior=not args.no_popularity_prior)
    metrics = train_and_evaluate([real_domain("amazon2018-scientific")], out, mode="local", model_config=model, train_config=train)
    report = json.loads((out / "report.json").read_text())
    test = metrics["amazon2018-scientific"]["test"]
    base = report["baselines"]["amazon2018-scientific"]
    print(f"\nScientific, full ranking over {4385:,} items; {machine()}")
    print(f"{'model':<34} {'NDCG@10':>8} {'Recall@10':>10}")
    for name, (ndcg, recall) in PUBLISHED.items():
        print(f"{name + ' [published]':<34} {ndcg:>8.4f} {recall:>10.4f}")
    for name, b in base.items():
        print(f"{name + ' [ours, no training]':<34} {b['test']['ndcg@10']:>8.4f} {b['test']['recall@10']:>10.4f}")
    label = "fedxrec local, text only" if args.no_popularity_prior else "fedxrec local, text + popularity"
    print(f"{label:<34} {test['ndcg@10']:>8.4f} {test['recall@10']:>10.4f}")
    epochs = len(report["history"][0]) - 1
    print(
        f"\nadapter {report['adapter_parameters']:,} parameters ({report['adapter_share_of_encoder']:.2%} of the encoder's bytes); "
        f"{epochs} epochs, training {report['seconds']['train']:.0f} s, total {report['seconds']['total']:.0f} s; "
        f"peak memory {report['peak_memory_mb']:.0f} MB"
    )
    write_json(
        out / "benchmark.json",
        {
            "test": test,
            "published": PUBLISHED,
            "baselines": base,
            "seconds": report["seconds"],
            "peak_memory_mb": report["peak_memory_mb"],
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
