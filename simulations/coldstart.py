"""Cold start: a partner with few users joins a federation, versus training alone.

    python -m simulations.coldstart [--scenarios simulations/scenarios/scientific-office-coldstart.toml ...]
        [--rounds 3] [--local-epochs 2] [--seed 0] [--recipe-epochs 40] [--recipe-minutes 12] [--personal-mix]
        [--out runs/coldstart]

Each scenario's cold partner is its one partner with the smallest ``max-users`` (its
domain's first users).
Two training-free baselines come first: ``zero-shot (untrained)`` (text
similarity to the last item) and ``popularity (untrained)`` (the cold partner's
most frequent training items). Both runs are the real ServerApp + ClientApp in
Flower's simulation engine, no DP:
``alone`` is the cold partner in a federation of one, ``in the federation`` the
whole scenario (plain FedAvg; with ``--personal-mix`` also each partner's own mix of
the global adapter, ``personal-mix = "valid"``). With the full recipe on (``--recipe-minutes`` > 0), also each
path's best local training: ``alone, full recipe`` (``fedxrec train``'s recipe on
the cold partner's users) and ``in the federation + fine-tune`` (``fedxrec
finetune`` on its state folder after the federation). Its own few test users give a noisy estimate (a handful of hits
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

import torch
from safetensors.torch import load_file

from client import partner
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec, load_scenario
from shared.federation.settings import FederationSettings
from shared.model.adapters import adapter_state
from shared.training import DomainRun, TrainConfig, evaluate_model
from simulations.common import add_federation_flags, add_out_flag, machine, read_scenario, write_report
from simulations.federations import (
    federate,
    federated_model,
    finetune_partners,
    one_partner_scenario,
    other_users,
    popularity,
    recipe_alone,
    test_row,
    zero_shot,
)

METHODS = (
    "zero-shot (untrained)",
    "popularity (untrained)",
    "alone",
    "in the federation",
    "in the federation, personal mix",
    "alone, full recipe",
    "in the federation + fine-tune",
)

# The table's comparisons: (label, method, the method it is compared with), each printed where both ran.
GAINS = (
    ("federation vs alone", "in the federation", "alone"),
    ("federation with personal mix vs alone", "in the federation, personal mix", "alone"),
    ("federation + fine-tune vs full recipe alone", "in the federation + fine-tune", "alone, full recipe"),
)


def on_other_users(spec: PartnerSpec, arrays: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """A model of the cold partner (adapter arrays, private head and prior) on its domain's other users' test items."""
    whole, others = other_users(spec)
    settings = FederationSettings(private_residual=partner.has_private_residual(head))
    model = partner.build_model(settings, whole, adapter_arrays=arrays, head=head)
    m = evaluate_model(DomainRun(others, model), "test")
    return {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "users": len(others.users)}


def cold_partner(specs: list[PartnerSpec], *, scenario: Path) -> PartnerSpec:
    """The scenario's one partner with the smallest ``max-users``."""
    fewest = min((s.max_users for s in specs if s.max_users), default=None)
    cold = [s for s in specs if fewest is not None and s.max_users == fewest]
    if len(cold) != 1:
        raise ValueError(
            f"{scenario}: a cold-start scenario's cold partner is its one partner with the smallest max-users; "
            f"found {len(cold)} with max-users = {fewest}"
        )
    return cold[0]


def check_cold_scenario(parser: argparse.ArgumentParser, path: Path, *, flag: str) -> None:
    """A usage error naming ``flag`` unless ``path`` is a cold-start scenario (read before anything runs)."""
    try:
        cold_partner(read_scenario(parser, path, flag=flag), scenario=path)
    except ValueError as err:
        parser.error(f"{flag}: {err}")


def cold_start(
    scenario: Path, base: dict[str, Any], out: Path, *, recipe: TrainConfig | None, personal_mix: bool = False
) -> dict[str, Any]:
    """The cold partner alone and in the scenario's federation (plain FedAvg and, with
    ``personal_mix``, each partner's own mix of the global adapter; with ``recipe``, the full
    recipe alone vs ``fedxrec finetune`` after the FedAvg federation): test metrics on its own
    users and on its domain's other users."""
    specs = load_scenario(scenario)
    spec = cold_partner(specs, scenario=scenario)
    settings = FederationSettings(**_settings(base))
    data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
    untrained = initial_adapter(settings, in_dim=int(data.vectors.shape[1])), None
    _, other = other_users(spec)
    own = {"zero-shot (untrained)": zero_shot(spec, settings), "popularity (untrained)": popularity(spec)}
    others = {
        "zero-shot (untrained)": on_other_users(spec, *untrained),
        "popularity (untrained)": {**popularity(spec, users=other), "users": len(other.users)},
    }
    together = out / f"{scenario.stem}-federated"
    runs: dict[str, tuple[Path, Path, int, dict[str, object]]] = {  # method: (run folder, its scenario, partners, run config overrides)
        "alone": (out / f"{scenario.stem}-alone", one_partner_scenario(spec, out / "scenarios"), 1, {}),
        "in the federation": (together, scenario, len(specs), {}),
    }
    if personal_mix:
        runs["in the federation, personal mix"] = (out / f"{scenario.stem}-federated-mix", scenario, len(specs), {"personal-mix": "valid"})
    for method, (run, federation, n, overrides) in runs.items():
        own[method] = federate(run.name, federation, n, base, out, dp=False, **overrides)[spec.name]
        others[method] = on_other_users(spec, *federated_model(run, spec.name))
    if recipe is not None:
        model = recipe_alone(spec, settings, config=recipe)
        own["alone, full recipe"] = test_row(spec, model)
        others["alone, full recipe"] = on_other_users(spec, adapter_state(model.adapter), model.private_state())
        # mode recipe: what README's cold-start table measured
        own["in the federation + fine-tune"] = finetune_partners(together, [spec], recipe, mode="recipe")[spec.name]
        saved = together / "finetuned" / spec.name / "model" / spec.name
        arrays, head = load_file(str(saved / "adapter.safetensors")), load_file(str(saved / "head.safetensors"))
        others["in the federation + fine-tune"] = on_other_users(spec, arrays, head)
    return {
        "scenario": str(scenario),
        "partner": spec.name,
        "users": spec.max_users,
        "joins": [s.name for s in specs if s is not spec],
        "own": own,
        "others": others,
    }


def recipe_config(*, epochs: int, minutes: float, seed: int = 0) -> TrainConfig | None:
    """The full recipe's settings (early stopping on valid; the time cap is a safety net); None when ``minutes`` is 0."""
    return TrainConfig(epochs=epochs, patience=5, lr_patience=2, max_minutes=minutes, seed=seed) if minutes else None


def _settings(base: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in base.items()}


def table(result: dict[str, Any]) -> list[str]:
    own, others = result["own"], result["others"]
    n = others["alone"]["users"]
    return [
        f"**cold start: {result['partner']}** ({result['users']} users) joining {', '.join(result['joins'])} "
        f"(no DP; test metrics on its own users and on its domain's {n:,} other users)",
        "",
        f"| | own users NDCG@10 | own users Recall@10 | {n:,} other users NDCG@10 | other users Recall@10 |",
        "|---|---|---|---|---|",
        *(
            f"| {k} | {own[k]['ndcg@10']:.4f} | {own[k]['recall@10']:.4f} | {others[k]['ndcg@10']:.4f} | {others[k]['recall@10']:.4f} |"
            for k in METHODS
            if k in own
        ),
        "",
        *(
            f"{label}: {_gain(own, new, old):+.1%} NDCG@10 on its own users, {_gain(others, new, old):+.1%} on the other users"
            for label, new, old in GAINS
            if new in own and old in own
        ),
        "",
    ]


def _gain(rows: dict[str, dict[str, Any]], new: str, old: str) -> float:
    return float(rows[new]["ndcg@10"] / rows[old]["ndcg@10"] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["simulations/scenarios/scientific-office-coldstart.toml"],
        help="cold-start scenario files, each a small partner and the federation it joins",
    )
    add_federation_flags(parser, local_epochs=2)
    parser.add_argument("--seed", type=int, default=0, help="the federations' seed (initial adapter, sampling, negatives)")
    parser.add_argument(
        "--recipe-epochs", type=int, default=40, help="most epochs of the full recipe alone and of the fine-tune (early stopping on valid)"
    )
    parser.add_argument("--recipe-minutes", type=float, default=12.0, help="time cap of each (0: no such rows)")
    parser.add_argument(
        "--personal-mix",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also the federation with personal-mix = 'valid' (each partner mixes the global adapter with its own; "
        "docs/experiments.md: it gave the cold partner less than FedAvg)",
    )
    add_out_flag(parser, "runs/coldstart")
    args = parser.parse_args()
    for scenario in args.scenarios:
        check_cold_scenario(parser, Path(scenario), flag="--scenarios")
    out = Path(args.out)
    base: dict[str, Any] = {"rounds": args.rounds, "local-epochs": args.local_epochs, "batch-size": args.batch_size, "seed": args.seed}
    recipe = recipe_config(epochs=args.recipe_epochs, minutes=args.recipe_minutes, seed=args.seed)
    results = [cold_start(Path(s), base, out, recipe=recipe, personal_mix=args.personal_mix) for s in args.scenarios]
    text = [f"{args.rounds} rounds x {args.local_epochs} local epoch(s), batch {args.batch_size}, seed {args.seed}; {machine()}", ""]
    for r in results:
        text += table(r)
    write_report(out, "coldstart", text, {"results": results, "args": vars(args)})


if __name__ == "__main__":
    main()
