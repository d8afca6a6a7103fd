"""Experiments: local vs federated (no DP, DP at several epsilons) vs pooled, fine-tune, cold start.

    python -m simulations.experiments [--scenario simulations/scenarios/scientific-office.toml]
        [--rounds 3] [--local-epochs 1] [--epsilons 8 3 1] [--finetune-epsilons 8] [--recipe-epochs 40]
        [--recipe-minutes 12] [--pooled-minutes 15] [--no-personal-mix] [--proximal-mu 1] [--finetune-seeds 4]
        [--calibrate-prior] [--out runs/experiments]

``federated, no DP, personal mix`` is the same federation with ``personal-mix =
"valid"``: each partner mixes the global adapter with its own by validation NDCG@10.
With ``--proximal-mu``, each federation is also run with FedProx's proximal term
(``proximal-mu``: each partner's local training is pulled towards the global adapter).
With ``--calibrate-prior`` every federated row, ``local`` included, is scored with run
setting ``calibrate-prior`` on (each partner's prior's weight calibrated on its validation users).
``zero-shot (untrained)`` ranks by the frozen encoder's text similarity to the
last item (initial adapter, identity head, no prior): what training adds is
measured from it. ``popularity (untrained)``, the other training-free baseline,
gives every user the partner's most frequent training items (exact counts).
Every federated result and ``local`` run the real ServerApp and ClientApp in
Flower's simulation engine with the same training code; ``local`` is each
partner in a federation of one (DP off). ``local, full recipe`` is what one
partner gets from ``fedxrec train`` alone (full softmax, popularity prior,
early stopping on valid; at most ``--recipe-epochs``, and ``--recipe-minutes`` as a safety cap: a cap that
binds makes the result depend on the machine's load). ``+ fine-tune`` is ``fedxrec finetune``
(:mod:`client.finetune`) on each partner's state folder: that same recipe started
from the partner's final federated model (the global adapter it kept, its private
head and prior); nothing of it is sent, so it spends none of the federation's
budget (``--finetune-seeds N``: N such fine-tunes averaged, a seed ensemble). ``pooled`` is the centralised, non-private upper bound
(``fedxrec train --mode pooled``). The cold-start part is :mod:`simulations.coldstart`
on ``--coldstart-scenario``. Each federation's row also gives its change against
``local`` with the 95 % interval of the paired difference, user by user on the same
test users (:mod:`simulations.compare_runs`): a change inside it is within the
users' noise. Writes ``results.md`` (tables), ``results.json`` and
``ndcg_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from client.finetune import FINETUNE_MODES
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings
from shared.pipeline import train_and_evaluate
from shared.training import TrainConfig
from simulations import compare_runs
from simulations.coldstart import check_cold_scenario, cold_start
from simulations.coldstart import table as cold_table
from simulations.common import add_federation_flags, add_out_flag, add_scenario_flag, machine, read_scenario, write_report
from simulations.federations import (
    federate,
    finetune_partners,
    metrics_row,
    one_partner_scenario,
    popularity,
    recipe_alone,
    test_row,
    zero_shot,
)


def plot(results: dict[str, dict[str, dict[str, Any]]], epsilons: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["local"])
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        xs = sorted(epsilons)
        ax.plot(xs, [results[f"federated DP eps={e:g}"][d]["ndcg@10"] for e in xs], "o-", label="federated, DP")
        tuned = [e for e in xs if f"federated DP eps={e:g} + fine-tune" in results]
        if tuned:
            ax.plot(
                tuned,
                [results[f"federated DP eps={e:g} + fine-tune"][d]["ndcg@10"] for e in tuned],
                "s--",
                label="federated, DP + local fine-tune",
            )
        for key, style, color in (
            ("zero-shot (untrained)", (0, (1, 3)), "gray"),
            ("local", ":", "gray"),
            ("local, full recipe", "-", "gray"),
            ("federated, no DP", "-.", "C2"),
            ("federated, no DP, personal mix", (0, (3, 1, 1, 1)), "C1"),
            ("federated, no DP + fine-tune", (0, (5, 1)), "C3"),
            ("pooled", "--", "C4"),
        ):
            if d in results.get(key, {}):
                ax.axhline(results[key][d]["ndcg@10"], linestyle=style, color=color, label=key)
        popular = results.get("popularity (untrained)", {}).get(d)
        if popular is not None:
            # far below the trained models on most catalogues: a line there would flatten the DP curve to nothing
            low, _ = ax.get_ylim()
            if popular["ndcg@10"] >= low:
                ax.axhline(popular["ndcg@10"], linestyle=(0, (1, 1)), color="black", label="popularity (untrained)")
            else:
                ax.annotate(f"popularity (untrained): {popular['ndcg@10']:.4f}, below", (0.02, 0.02), xycoords="axes fraction", fontsize=7)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{e:g}" for e in xs])
        ax.set_title(d)
        ax.set_xlabel("epsilon (per partner, whole run)")
        ax.set_ylabel("test NDCG@10")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def against_local(out: Path, runs: dict[str, str], specs: list[PartnerSpec]) -> dict[str, dict[str, dict[str, float]]]:
    """For each row of ``runs`` (row name: run folder name), each partner's change in test NDCG@10
    against its ``local`` run, as a fraction of ``local``'s, with the paired difference's 95 %
    interval (``low``, ``high``) and z."""
    by_row: dict[str, dict[str, dict[str, float]]] = {key: {} for key in runs}
    for spec in specs:
        local = compare_runs.scores(out / f"local-{spec.name}", spec)  # scored once for every row
        for key, run_name in runs.items():
            test = compare_runs.paired(compare_runs.scores(out / run_name, spec), local)["test"]
            low, high = test["change-interval"]
            by_row[key][spec.name] = {"change": test["change"], "low": low, "high": high, "z": test["z"]}
    return by_row


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    domains = list(results["local"])
    lines = []
    for d in domains:
        lines += [
            f"**{d}**",
            "",
            "| method | test NDCG@10 | test Recall@10 | epsilon | change vs local (95 % interval) |",
            "|---|---|---|---|---|",
        ]
        for method, by_domain in results.items():
            if d in by_domain:
                r = by_domain[d]
                eps = r.get("epsilon")
                vs = r.get("vs-local")
                change = f"{vs['change']:+.1%} ({vs['low']:+.1%} to {vs['high']:+.1%})" if vs else "-"
                lines.append(
                    f"| {method} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {'-' if eps is None else format(eps, '.2f')} | {change} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_scenario_flag(parser, "simulations/scenarios/scientific-office.toml")
    parser.add_argument(
        "--coldstart-scenario", default="simulations/scenarios/scientific-office-coldstart.toml", help="'' for no cold-start part"
    )
    add_federation_flags(parser, local_epochs=1)
    parser.add_argument(
        "--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0], help="one DP federation per target epsilon (default: 8 3 1)"
    )
    parser.add_argument(
        "--recipe-minutes", type=float, default=12.0, help="time cap of each full-recipe local run and fine-tune (0: no such rows)"
    )
    parser.add_argument(
        "--recipe-epochs", type=int, default=40, help="most epochs of each full-recipe local run and fine-tune (early stopping on valid)"
    )
    parser.add_argument(
        "--finetune-epsilons", type=float, nargs="*", default=None, help="the DP federations that get a fine-tune row (default: all)"
    )
    parser.add_argument(
        "--pooled-minutes", type=float, default=15.0, help="time cap of the pooled run (at most --recipe-epochs; 0: no pooled row)"
    )
    parser.add_argument(
        "--finetune-mode",
        choices=FINETUNE_MODES,
        default="recipe",
        help="fedxrec finetune's --mode for the fine-tune rows (default: recipe, the mode of README's Scientific/office tables)",
    )
    parser.add_argument(
        "--finetune-seeds", type=int, default=1, help="fedxrec finetune's --seeds for the fine-tune rows (a seed ensemble; default: 1)"
    )
    parser.add_argument(
        "--personal-mix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the federation without DP with personal-mix = 'valid' (each partner mixes the global adapter with its own)",
    )
    parser.add_argument(
        "--proximal-mu",
        type=float,
        default=0.0,
        help="also run each federation (without DP, and DP at each --epsilons) with FedProx's proximal-mu = this (0: no such rows)",
    )
    parser.add_argument(
        "--calibrate-prior",
        action="store_true",
        help="every federated row (local included) with calibrate-prior = true: each partner's model scored with its prior's "
        "weight calibrated on its validation users (the fine-tunes start from it)",
    )
    add_out_flag(parser, "runs/experiments")
    args = parser.parse_args()
    out = Path(args.out)
    scenario = Path(args.scenario)
    specs = read_scenario(parser, scenario)
    if args.coldstart_scenario:  # read now: the cold-start part runs last
        check_cold_scenario(parser, Path(args.coldstart_scenario), flag="--coldstart-scenario")
    base: dict[str, Any] = {"rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.batch_size}
    if args.calibrate_prior:
        base["calibrate-prior"] = True
    settings = FederationSettings(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size)
    # early stopping on valid within --recipe-epochs; the time cap is a safety net
    recipe = TrainConfig(epochs=args.recipe_epochs, patience=5, lr_patience=2, max_minutes=args.recipe_minutes or None, seed=settings.seed)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, Any]]] = {
        "zero-shot (untrained)": {s.name: zero_shot(s, settings) for s in specs},
        "popularity (untrained)": {s.name: popularity(s) for s in specs},
    }
    results["local"] = {}

    for spec in specs:
        results["local"].update(federate(f"local-{spec.name}", one_partner_scenario(spec, out / "scenarios"), 1, base, out, dp=False))
    if args.recipe_minutes:
        results["local, full recipe"] = {s.name: test_row(s, recipe_alone(s, settings, config=recipe)) for s in specs}
    runs: dict[str, str] = {}  # each federation's row: its run folder, for the paired comparison against local

    def federation(key: str, run: str, **overrides: Any) -> dict[str, dict[str, Any]]:
        runs[key] = run
        results[key] = federate(run, scenario, len(specs), base, out, **overrides)
        return results[key]

    prox = f"proximal mu={args.proximal_mu:g}"
    federation("federated, no DP", "federated-nodp", dp=False)
    if args.personal_mix:
        federation("federated, no DP, personal mix", "federated-nodp-mix", dp=False, **{"personal-mix": "valid"})
    if args.proximal_mu:
        federation(f"federated, no DP, {prox}", "federated-nodp-prox", dp=False, **{"proximal-mu": args.proximal_mu})
    if args.recipe_minutes:
        results["federated, no DP + fine-tune"] = finetune_partners(
            out / "federated-nodp", specs, recipe, mode=args.finetune_mode, seeds=args.finetune_seeds
        )
    for eps in args.epsilons:
        key = f"federated DP eps={eps:g}"
        dp_rows = federation(key, f"federated-dp-{eps:g}", dp=True, **{"target-epsilon": eps})
        if args.recipe_minutes and (args.finetune_epsilons is None or eps in args.finetune_epsilons):
            tuned = finetune_partners(out / f"federated-dp-{eps:g}", specs, recipe, mode=args.finetune_mode, seeds=args.finetune_seeds)
            results[f"{key} + fine-tune"] = {d: {**tuned[d], "epsilon": dp_rows[d]["epsilon"]} for d in tuned}
        if args.proximal_mu:
            federation(f"{key}, {prox}", f"federated-dp-{eps:g}-prox", dp=True, **{"target-epsilon": eps, "proximal-mu": args.proximal_mu})
    if args.pooled_minutes:
        pooled = train_and_evaluate(
            [s.data for s in specs],
            out / "pooled",
            mode="pooled",
            train_config=dataclasses.replace(recipe, max_minutes=args.pooled_minutes),
        )
        results["pooled"] = {d: metrics_row(m["test"]) for d, m in pooled.items()}

    for key, by_domain in against_local(out, runs, specs).items():
        for d, vs in by_domain.items():
            results[key][d]["vs-local"] = vs

    cold: dict[str, Any] = {}
    if args.coldstart_scenario:
        cold = cold_start(Path(args.coldstart_scenario), base, out, recipe=recipe if args.recipe_minutes else None)

    text = [
        f"Scenario {scenario.name}: {args.rounds} rounds x {args.local_epochs} local epoch(s), batch {args.batch_size}; {machine()}",
        "",
        table(results),
        *(cold_table(cold) if cold else []),
        f"total time {time.monotonic() - started:.0f} s",
    ]
    write_report(out, "results", text, {"results": results, "cold_start": cold, "args": vars(args)})
    plot(results, args.epsilons, out / "ndcg_vs_epsilon.png")


if __name__ == "__main__":
    main()
