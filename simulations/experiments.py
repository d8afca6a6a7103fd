"""Experiments: local vs federated (no DP, DP at several epsilons) vs pooled, fine-tune, cold start.

    python -m simulations.experiments [--scenario simulations/scenarios/scientific-office.toml]
        [--rounds 3] [--local-epochs 1] [--epsilons 8 3 1] [--finetune-epsilons 8] [--recipe-epochs 40]
        [--recipe-minutes 12] [--pooled-minutes 15] [--out runs/experiments]

``zero-shot (untrained)`` ranks by the frozen encoder's text similarity to the
last item (initial adapter, identity head, no prior): what training adds is
measured from it. Every federated result and ``local`` run the real ServerApp and ClientApp in
Flower's simulation engine with the same training code; ``local`` is each
partner in a federation of one (DP off). ``local, full recipe`` is what one
partner gets from ``fedxrec train`` alone (full softmax, popularity prior,
early stopping on valid; at most ``--recipe-epochs``, and ``--recipe-minutes`` as a safety cap: a cap that
binds makes the result depend on the machine's load). ``+ fine-tune`` is that
same recipe started from the partner's final federated model (global adapter
and its private head); nothing of it is sent, so it spends none of the
federation's budget. ``pooled`` is the centralised, non-private upper bound
(``fedxrec train --mode pooled``). The cold-start part puts a 300-user partner in
a federation and alone. Writes ``results.md`` (tables), ``results.json`` and
``ndcg_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from client import partner
from server.run_folder import RunFolder
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec, load_scenario
from shared.federation.settings import FederationSettings
from shared.pipeline import train_and_evaluate
from shared.training import DomainRun, TrainConfig, evaluate_model, train
from simulations.common import machine, write_json
from simulations.runner import simulate


def final_metrics(run: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in rows)
    out = {}
    for r in rows:
        if r["round"] == last:
            out[r["partner"]] = {"ndcg@10": r["test_ndcg@10"], "recall@10": r["test_recall@10"], "epsilon": r.get("epsilon")}
    # epsilon: the last value each partner reported (a partner not sampled in the last round keeps its earlier one)
    for r in rows:
        if r.get("epsilon") is not None and r["partner"] in out:
            out[r["partner"]]["epsilon"] = r["epsilon"]
    return out


def one_partner_scenario(spec: PartnerSpec, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.toml"
    lines = ["[[partner]]", f'name = "{spec.name}"', f'data = "{spec.data}"'] + (
        [f"max-users = {spec.max_users}"] if spec.max_users else []
    )
    path.write_text("\n".join(lines) + "\n")
    return path


def federate(name: str, scenario: Path, n: int, base: dict[str, Any], out: Path, **overrides: Any) -> dict[str, dict[str, Any]]:
    config = {
        **base,
        "scenario": str(scenario.resolve()),
        "runs-dir": str(out.resolve()),
        "run-id": name,
        "min-partners": min(n, 2),
        **overrides,
    }
    started = time.monotonic()
    run = simulate(config, partners=n)
    print(f"[{name}] {time.monotonic() - started:.0f} s")
    return final_metrics(run)


def local_recipe(
    spec: PartnerSpec,
    settings: FederationSettings,
    *,
    config: TrainConfig,
    adapter: dict[str, torch.Tensor] | None = None,
    head: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``fedxrec train``'s recipe on one partner's data, without DP: full softmax,
    popularity prior, learning-rate halving and early stopping on valid NDCG@10.

    From the federation's initial adapter (``local, full recipe``), or from a
    federated model (the fine-tune: nothing of it is sent, so it spends none of
    the budget).
    """
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    arrays = adapter if adapter is not None else initial_adapter(settings, in_dim=int(data.vectors.shape[1]))
    exact = torch.as_tensor(data.split.item_popularity())  # exact counts: this model is never sent
    model = partner.build_model(settings, data, adapter_arrays=arrays, head=head, counts=exact, leave_one_out=False)
    run = DomainRun(data.split, model)
    train([run], config, log=lambda _: None)
    m = evaluate_model(run, "test")
    return {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "epsilon": None}


def final_adapter(run: Path) -> dict[str, torch.Tensor]:
    """The global adapter after a run's last round."""
    folder = RunFolder(run)
    return folder.adapter(folder.last_round())


def finetune(run: Path, specs: list[PartnerSpec], settings: FederationSettings, config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Each partner's final federated model (global adapter + its head), then :func:`local_recipe`."""
    adapter = final_adapter(run)
    out = {}
    for spec in specs:
        state = partner.PartnerState.load(run / "partners" / spec.name)
        out[spec.name] = local_recipe(spec, settings, config=config, adapter=adapter, head=state.head)
    return out


def zero_shot(spec: PartnerSpec, settings: FederationSettings) -> dict[str, Any]:
    """The untrained model: the initial adapter (near cosine-preserving), identity head,
    no prior; it ranks items by text similarity to the last one. What training adds
    is measured from here."""
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    arrays = initial_adapter(settings, in_dim=int(data.vectors.shape[1]))
    m = evaluate_model(DomainRun(data.split, partner.build_model(settings, data, adapter_arrays=arrays, head=None)), "test")
    return {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "epsilon": None}


def cold_start_on_other_users(run: Path | None, spec: PartnerSpec) -> dict[str, Any]:
    """The cold partner's final model (global adapter + its head) on its domain's other users' test items
    (``run`` None: the zero-shot model).

    The partner's own few users give a noisy estimate (300 test items: a handful
    of hits either way moves NDCG@10 by tens of percent); the model is inductive,
    so the users it never trained on measure it too, about 15x more of them on office.
    """
    assert spec.max_users
    whole = partner.partner_data(PartnerSpec(spec.name, spec.data), max_len=partner.HEAD.max_len)
    if run is None:
        arrays, head = initial_adapter(FederationSettings(), in_dim=int(whole.vectors.shape[1])), None
    else:
        arrays, head = final_adapter(run), partner.PartnerState.load(run / "partners" / spec.name).head
    model = partner.build_model(FederationSettings(), whole, adapter_arrays=arrays, head=head)
    others = whole.split.select_users(slice(spec.max_users, None))
    m = evaluate_model(DomainRun(others, model), "test")
    return {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "users": len(others.users)}


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
            ("federated, no DP + fine-tune", (0, (5, 1)), "C3"),
            ("pooled", "--", "C4"),
        ):
            if d in results.get(key, {}):
                ax.axhline(results[key][d]["ndcg@10"], linestyle=style, color=color, label=key)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{e:g}" for e in xs])
        ax.set_title(d)
        ax.set_xlabel("epsilon (per partner, whole run)")
        ax.set_ylabel("test NDCG@10")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    domains = list(results["local"])
    lines = []
    for d in domains:
        lines += [f"**{d}**", "", "| method | test NDCG@10 | test Recall@10 | epsilon |", "|---|---|---|---|"]
        for method, by_domain in results.items():
            if d in by_domain:
                r = by_domain[d]
                eps = r.get("epsilon")
                lines.append(f"| {method} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {'-' if eps is None else format(eps, '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--scenario", default="simulations/scenarios/scientific-office.toml")
    parser.add_argument("--coldstart-scenario", default="simulations/scenarios/scientific-office-coldstart.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument(
        "--recipe-minutes", type=float, default=12.0, help="time cap of each full-recipe local run and fine-tune (0: no such rows)"
    )
    parser.add_argument(
        "--recipe-epochs", type=int, default=40, help="most epochs of each full-recipe local run and fine-tune (early stopping on valid)"
    )
    parser.add_argument(
        "--finetune-epsilons", type=float, nargs="*", default=None, help="the DP federations that get a fine-tune row (default: all)"
    )
    parser.add_argument("--pooled-minutes", type=float, default=15.0, help="time cap of the pooled run (at most --recipe-epochs)")
    parser.add_argument("--out", default="runs/experiments")
    args = parser.parse_args()
    out = Path(args.out)
    scenario = Path(args.scenario)
    specs = load_scenario(scenario)
    base: dict[str, Any] = {"rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.batch_size}
    settings = FederationSettings(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size)
    # early stopping on valid within --recipe-epochs; the time cap is a safety net
    recipe = TrainConfig(epochs=args.recipe_epochs, patience=5, lr_patience=2, max_minutes=args.recipe_minutes, seed=settings.seed)
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, Any]]] = {"zero-shot (untrained)": {s.name: zero_shot(s, settings) for s in specs}}
    results["local"] = {}

    for spec in specs:
        results["local"].update(federate(f"local-{spec.name}", one_partner_scenario(spec, out / "scenarios"), 1, base, out, dp=False))
    if args.recipe_minutes:
        results["local, full recipe"] = {s.name: local_recipe(s, settings, config=recipe) for s in specs}
    results["federated, no DP"] = federate("federated-nodp", scenario, len(specs), base, out, dp=False)
    if args.recipe_minutes:
        results["federated, no DP + fine-tune"] = finetune(out / "federated-nodp", specs, settings, recipe)
    for eps in args.epsilons:
        key = f"federated DP eps={eps:g}"
        results[key] = federate(f"federated-dp-{eps:g}", scenario, len(specs), base, out, dp=True, **{"target-epsilon": eps})
        if args.recipe_minutes and (args.finetune_epsilons is None or eps in args.finetune_epsilons):
            tuned = finetune(out / f"federated-dp-{eps:g}", specs, settings, recipe)
            results[f"{key} + fine-tune"] = {d: {**tuned[d], "epsilon": results[key][d]["epsilon"]} for d in tuned}
    pooled = train_and_evaluate(
        [s.data for s in specs],
        out / "pooled",
        mode="pooled",
        train_config=dataclasses.replace(recipe, max_minutes=args.pooled_minutes),
    )
    results["pooled"] = {
        d: {"ndcg@10": m["test"]["ndcg@10"], "recall@10": m["test"]["recall@10"], "epsilon": None} for d, m in pooled.items()
    }

    cold_specs = load_scenario(Path(args.coldstart_scenario))
    cold = next(s for s in cold_specs if s.max_users)
    cold_runs = {
        "alone": federate(f"cold-alone-{cold.name}", one_partner_scenario(cold, out / "scenarios"), 1, base, out, dp=False),
        "in the federation": federate("cold-federated", Path(args.coldstart_scenario), len(cold_specs), base, out, dp=False),
    }
    cold_results = {"zero-shot (untrained)": zero_shot(cold, settings), **{k: v[cold.name] for k, v in cold_runs.items()}}
    cold_others = {
        "zero-shot (untrained)": cold_start_on_other_users(None, cold),
        "alone": cold_start_on_other_users(out / f"cold-alone-{cold.name}", cold),
        "in the federation": cold_start_on_other_users(out / "cold-federated", cold),
    }

    text = [
        f"Scenario {scenario.name}: {args.rounds} rounds x {args.local_epochs} local epoch(s), batch {args.batch_size}; {machine()}",
        "",
        table(results),
    ]
    gain = cold_results["in the federation"]["ndcg@10"] / cold_results["alone"]["ndcg@10"] - 1
    gain_others = cold_others["in the federation"]["ndcg@10"] / cold_others["alone"]["ndcg@10"] - 1
    others = cold_others["alone"]["users"]
    text += [
        f"**cold start: {cold.name}** (no DP; test NDCG@10 / Recall@10 on its {cold.max_users} users, and on the domain's {others} other users)",
        "",
        f"| | own users NDCG@10 | own users Recall@10 | {others} other users NDCG@10 | other users Recall@10 |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {v['ndcg@10']:.4f} | {v['recall@10']:.4f} | {cold_others[k]['ndcg@10']:.4f} | {cold_others[k]['recall@10']:.4f} |"
            for k, v in cold_results.items()
        ),
        "",
        f"federation vs alone: {gain:+.1%} NDCG@10 on its own users, {gain_others:+.1%} on the other users",
        "",
        f"total time {time.monotonic() - started:.0f} s",
    ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print("\n" + "\n".join(text))
    plot(results, args.epsilons, out / "ndcg_vs_epsilon.png")
    write_json(
        out / "results.json",
        {"results": results, "cold_start": cold_results, "cold_start_other_users": cold_others, "args": vars(args)},
    )


if __name__ == "__main__":
    main()
