"""``fedxrec demo`` (what ``make demo`` runs): the federated DP simulation on generated data.

Three partners (books, games, gear: synthetic domains whose users share tastes;
``--partners`` for more)
train the shared adapter under user-level DP-SGD for 3 rounds through Flower's
simulation engine (``flwr run``), then the per-partner NDCG@10 and epsilon spent
are printed from the run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shared.flower_run import PROJECT, run_federation


def run_demo(*, out: Path, rounds: int = 3, epsilon: float = 8.0, partners: int = 3, gpus_per_partner: float = 0.0) -> int:
    """``gpus_per_partner`` > 0: each partner trains on that share of a GPU (run setting ``device = "auto"``)."""
    runs = out.resolve()
    run_id = time.strftime("demo-%Y%m%d-%H%M%S")
    config = {"rounds": rounds, "target-epsilon": epsilon, "runs-dir": str(runs), "run-id": run_id, "scenario": "synthetic"}
    where = f"{gpus_per_partner:g} of a GPU each" if gpus_per_partner else "on the CPU"
    print(f"fedxrec demo: {partners} partners ({where}), {rounds} rounds, DP at epsilon {epsilon:g}; run folder {runs / run_id}")
    try:
        run = run_federation(run_config=config, partners=partners, flwr_home=PROJECT / ".flwr", client_gpus=gpus_per_partner)
    except RuntimeError as err:  # a round missing from the run folder, whatever flwr run's exit status
        print(f"fedxrec demo: {err}")
        return 1
    print("\n" + partner_table(json.loads((run / "summary.json").read_text()), epsilon=epsilon))
    print(f"\nrun folder: {run} (config.json, manifest.json, metrics.jsonl, ledger/, adapter/, summary.md)")
    print(f"privacy report: fedxrec privacy report {run}")
    return 0


def partner_table(summary: dict[str, Any], *, epsilon: float) -> str:
    """Per partner, by name: test NDCG@10 and Recall@10 and the epsilon spent (from ``summary.json``)."""
    width = max(10, *map(len, summary["partners"]))
    lines = [f"{'partner':<{width}} {'test NDCG@10':>13} {'test Recall@10':>15} {'epsilon spent':>14}  (target {epsilon:g})"]
    for name, p in sorted(summary["partners"].items()):
        lines.append(f"{name:<{width}} {p['test_ndcg@10']:>13.4f} {p['test_recall@10']:>15.4f} {p['epsilon']:>14.3f}")
    return "\n".join(lines)
