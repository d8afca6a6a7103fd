"""``fedxrec demo``: the quick-start job on generated data, needing nothing else.

Generates three synthetic domains, trains each alone (``local``) and all pooled,
and prints both next to the training-free baselines.
"""

from __future__ import annotations

from pathlib import Path

from shared.data.synthetic import SyntheticConfig, generate
from shared.pipeline import train_and_evaluate
from shared.training import TrainConfig


def run_demo(*, out: Path) -> int:
    folders = generate(out / "data", SyntheticConfig())
    print(f"generated {len(folders)} domains in {out / 'data'}")
    train = TrainConfig(epochs=8, patience=3)
    results = {mode: train_and_evaluate(folders, out / mode, mode=mode, train_config=train) for mode in ("local", "pooled")}
    print(f"\n{'domain':<14} {'local NDCG@10':>14} {'pooled NDCG@10':>15}")
    for name in results["local"]:
        print(f"{name:<14} {results['local'][name]['test']['ndcg@10']:>14.4f} {results['pooled'][name]['test']['ndcg@10']:>15.4f}")
    return 0
