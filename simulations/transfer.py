"""What each partner gains from each other partner alone: every federation of two, against training alone.

    python -m simulations.transfer --scenario simulations/scenarios/amazon-steam-4k.toml
        [--rounds 3] [--local-epochs 2] [--seed 0] [--partners NAME ...]
        [--local 'runs/experiments/local-{partner}'] [--together runs/experiments/federated-nodp]
        [--out runs/transfer]

When a partner loses in the federation, is it negative transfer from one
particular domain, or from the others together? For every pair of the
scenario's partners this runs the federation of the two without DP (the real
ServerApp + ClientApp in Flower's simulation engine), and scores each partner's
model after it user by user against its model trained alone (the experiments'
``local`` row; :func:`simulations.compare_runs.paired`). The matrix in
``transfer.md`` has a row per partner scored and a column per partner it was
federated with: the change in test NDCG@10 with its paired 95 % interval.
``--together`` adds a column for a run of all partners (the experiments'
``federated-nodp``). ``--local`` names existing ``local`` runs to compare against
(their rounds, epochs and seed must match); without it they are run here. Writes
``transfer.md`` and ``transfer.json``; a run folder that exists is resumed.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import combinations
from pathlib import Path
from typing import Any

from simulations.common import add_federation_flags, add_out_flag, machine, write_report
from simulations.compare_runs import change_with_interval, paired, run_folder, scenario_partners, scores
from simulations.federations import federate, one_partner_scenario, scenario_file

# the settings a baseline run must share with the pairs for the comparison to be like for like
MATCHED = ("rounds", "local-epochs", "batch-size", "seed", "dp", "private-residual", "personal-mix")


def check_matches(run: Path, base: dict[str, Any]) -> None:
    """Raises if ``run`` (a finished run folder) was trained with other settings than ``base``."""
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
    config = json.loads(path.read_text())
    wrong = [f"{key} is {config.get(key)!r}, expected {base[key]!r}" for key in MATCHED if config.get(key) != base[key]]
    if wrong:
        raise ValueError(f"{path}: not comparable with these pairs: " + "; ".join(wrong))


def pair_name(a: str, b: str) -> str:
    """The run of partners ``a`` and ``b`` (either order)."""
    first, second = sorted((a, b))
    return f"pair-{first}__{second}"


def matrix(names: list[str], pairs: dict[str, dict[str, Any]], together: dict[str, Any] | None) -> list[str]:
    """Rows: the partner scored; columns: the partner it was federated with (and all together)."""
    columns = names + (["all together"] if together else [])
    lines = ["| scored \\ federated with | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for scored in names:
        cells = [change_with_interval(pairs[pair_name(scored, other)][scored]["test"]) if other != scored else "—" for other in names]
        if together:
            cells.append(change_with_interval(together[scored]["test"]))
        lines.append(f"| {scored} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, required=True, help="scenario file: each partner's data")
    add_federation_flags(parser, local_epochs=2)
    parser.add_argument("--seed", type=int, default=0, help="the federations' seed (initial adapter, sampling, negatives; default: 0)")
    parser.add_argument("--partners", nargs="+", help="only the pairs among these partners (default: every partner of the scenario)")
    parser.add_argument(
        "--local", help="existing run folders of each partner trained alone, a pattern with {partner} (default: run them here)"
    )
    parser.add_argument("--together", type=Path, help="a run folder of all the partners together, for the last column")
    add_out_flag(parser, "runs/transfer")
    args = parser.parse_args(argv)
    specs = scenario_partners(parser, args.scenario, args.partners, two_for="a pair")
    base: dict[str, Any] = {
        "rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "seed": args.seed,
        "dp": False,
        "private-residual": True,
        "personal-mix": "off",
    }
    started = time.monotonic()
    out = Path(args.out)
    by_name = {s.name: s for s in specs}
    if args.local:
        local = {name: run_folder(args.local, name) for name in by_name}
        for run in local.values():
            check_matches(run, base)
    else:
        local = {}
        for spec in specs:
            federate(f"local-{spec.name}", one_partner_scenario(spec, out / "scenarios"), 1, base, out)
            local[spec.name] = out / f"local-{spec.name}"
    if args.together:
        check_matches(args.together, base)
    alone = {name: scores(run, by_name[name]) for name, run in local.items()}  # each partner's local model, scored once

    pairs: dict[str, dict[str, Any]] = {}
    for a, b in combinations(sorted(by_name), 2):
        name = pair_name(a, b)
        federate(name, scenario_file([by_name[a], by_name[b]], out / "scenarios" / f"{name}.toml"), 2, base, out)
        pairs[name] = {p: {"partner": p, **paired(scores(out / name, by_name[p]), alone[p])} for p in (a, b)}
    together = {s.name: {"partner": s.name, **paired(scores(args.together, s), alone[s.name])} for s in specs} if args.together else None

    names = sorted(by_name)
    text = [
        f"Scenario {args.scenario.name}: federations of two without DP against each partner trained alone; "
        f"{args.rounds} rounds x {args.local_epochs} local epoch(s), seed {args.seed}; {machine()}; {time.monotonic() - started:.0f} s",
        "",
        "Change in test NDCG@10 against `local`, paired user by user (95 % interval; bold where it excludes no change):",
        "",
        *matrix(names, pairs, together),
    ]
    write_report(
        out,
        "transfer",
        text,
        {
            "pairs": pairs,
            "together": together,
            "local": {k: str(v) for k, v in local.items()},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        },
    )


if __name__ == "__main__":
    main()
