"""Cold start: a partner with few users joins a federation, versus training alone.

    python -m simulations.coldstart [--scenarios simulations/scenarios/scientific-office-coldstart.toml ...]
        [--rounds 3] [--local-epochs 2] [--out runs/coldstart]

Each scenario names one cold partner (``max-users``: its domain's first users).
Both runs are the real ServerApp + ClientApp in Flower's simulation engine, no DP:
``alone`` is the cold partner in a federation of one, ``in the federation`` the
whole scenario. Its own few test users give a noisy estimate (a handful of hits
either way moves NDCG@10 by tens of percent), so the cold partner's final model
(global adapter + its private head and prior) is also scored on its domain's
other users, whom it never saw: the model is inductive (items are text), so
they measure it with many more test items. Writes ``coldstart.md`` and
``coldstart.json``; a run folder that exists is resumed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from client import partner
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec, load_scenario
from shared.federation.settings import FederationSettings
from shared.training import DomainRun, evaluate_model
from simulations.common import machine, write_json
from simulations.federations import federate, final_adapter, one_partner_scenario, zero_shot

METHODS = ("zero-shot (untrained)", "alone", "in the federation")


def on_other_users(run: Path | None, spec: PartnerSpec) -> dict[str, Any]:
    """The cold partner's final model (``run`` None: the untrained one) on its domain's other users' test items."""
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


def cold_start(scenario: Path, base: dict[str, Any], out: Path) -> dict[str, Any]:
    """The cold partner alone and in the scenario's federation: its own and its domain's other users' test metrics."""
    specs = load_scenario(scenario)
    cold = [s for s in specs if s.max_users]
    if len(cold) != 1:
        raise SystemExit(f"{scenario}: a cold-start scenario names exactly one partner with max-users, found {len(cold)}")
    spec = cold[0]
    tag = scenario.stem
    runs = {
        "alone": out / f"{tag}-alone",
        "in the federation": out / f"{tag}-federated",
    }
    own = {
        "zero-shot (untrained)": zero_shot(spec, FederationSettings(**_settings(base))),
        "alone": federate(runs["alone"].name, one_partner_scenario(spec, out / "scenarios"), 1, base, out, dp=False)[spec.name],
        "in the federation": federate(runs["in the federation"].name, scenario, len(specs), base, out, dp=False)[spec.name],
    }
    others = {"zero-shot (untrained)": on_other_users(None, spec), **{k: on_other_users(r, spec) for k, r in runs.items()}}
    return {
        "scenario": str(scenario),
        "partner": spec.name,
        "users": spec.max_users,
        "joins": [s.name for s in specs if s is not spec],
        "own": own,
        "others": others,
    }


def _settings(base: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in base.items()}


def table(result: dict[str, Any]) -> list[str]:
    own, others = result["own"], result["others"]
    n = others["alone"]["users"]
    gain_own = own["in the federation"]["ndcg@10"] / own["alone"]["ndcg@10"] - 1
    gain_others = others["in the federation"]["ndcg@10"] / others["alone"]["ndcg@10"] - 1
    return [
        f"**cold start: {result['partner']}** ({result['users']} users) joining {', '.join(result['joins'])} "
        f"(no DP; test metrics on its own users and on its domain's {n:,} other users)",
        "",
        f"| | own users NDCG@10 | own users Recall@10 | {n:,} other users NDCG@10 | other users Recall@10 |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {own[k]['ndcg@10']:.4f} | {own[k]['recall@10']:.4f} | {others[k]['ndcg@10']:.4f} | {others[k]['recall@10']:.4f} |"
            for k in METHODS
        ),
        "",
        f"federation vs alone: {gain_own:+.1%} NDCG@10 on its own users, {gain_others:+.1%} on the other users",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--scenarios", nargs="+", default=["simulations/scenarios/scientific-office-coldstart.toml"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="runs/coldstart")
    args = parser.parse_args()
    out = Path(args.out)
    base: dict[str, Any] = {"rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.batch_size}
    results = [cold_start(Path(s), base, out) for s in args.scenarios]
    text = [f"{args.rounds} rounds x {args.local_epochs} local epoch(s), batch {args.batch_size}; {machine()}", ""]
    for r in results:
        text += table(r)
    (out / "coldstart.md").write_text("\n".join(text))
    print("\n" + "\n".join(text))
    write_json(out / "coldstart.json", {"results": results, "args": vars(args)})


if __name__ == "__main__":
    main()
