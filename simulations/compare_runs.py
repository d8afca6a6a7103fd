"""Two runs' models compared user by user: is a change in NDCG@10 larger than the users' noise?

    python -m simulations.compare_runs --scenario simulations/scenarios/amazon-steam-4k.toml
        --run runs/experiments/federated-nodp --baseline 'runs/experiments/local-{partner}'
        [--partners NAME ...] [--other-users | --new-items | --seen-items] [--finetuned] [--out runs/compare]

Each partner's model after ``--run`` (the adapter it kept after the last round and
its private head) is scored on the partner's validation and test users beside its
model after ``--baseline`` (a run folder holding every partner, or a pattern with
``{partner}`` for one run per partner, as the experiments' ``local-<partner>``
rows). The difference of their NDCG@10 is paired user by user
(:func:`shared.evaluation.paired_difference`): its 95 % interval says whether a
change of a few per cent on a few thousand test users is more than noise.
With ``--other-users`` a partner with ``max-users`` (a cold-start partner) is
scored on its domain's other users instead, whom it never saw, as
:mod:`simulations.coldstart` scores it. With ``--new-items`` each partner is
scored on the users whose target is a new item, one that none of its training
sequences holds (its text is all a model knows of it; the popularity prior
counts it 0): where a text-based federation is meant to help most; with
``--seen-items``, on the others. With ``--finetuned`` each side's fine-tuned model
after its run is compared (``<run>/finetuned/<partner>/model``).

The last columns apply a no-harm rule a partner can use to pick its model: keep
``--run``'s only where its validation gain over the baseline is significant
(one-sided 5 %, z > 1.645), else the baseline's; then its test score. Writes
``compare.md`` and ``compare.json`` to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from client import partner
from shared.data.split import DomainSplit
from shared.evaluation import paired_difference, user_ndcg
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import settings_from_run_config
from shared.model.recommender import DomainModel
from shared.pipeline import load_domain_model
from shared.training import model_user_ranks
from simulations import federations
from simulations.common import read_scenario, write_json

SPLITS = ("valid", "test")
Z_ONE_SIDED_5 = 1.645  # a validation gain this many standard errors above 0 is kept


def run_folder(pattern: str, name: str) -> Path:
    return Path(pattern.replace("{partner}", name))


TARGETS = ("all", "new", "seen")  # which of a partner's users are scored, by their target item
SCORED = {  # the users a comparison scores (compare.json's "users"), as its heading says it
    "all": "",
    "other-users": " on each domain's other users",
    "new-items": " on the users whose target is a new item",
    "seen-items": " on the users whose target is a seen item",
}


def scores(run: Path, spec: PartnerSpec, *, other_users: bool = False, targets: str = "all", finetuned: bool = False) -> dict[str, Any]:
    """Per-user NDCG@10 on the valid and test users of partner ``spec`` under its model after ``run``
    (with ``finetuned``, its fine-tune after ``run``: ``run/finetuned/<partner>/model``, which
    :func:`simulations.federations.finetune_partners` writes). With ``other_users``, on its domain's
    users after its ``max-users``, whom it never saw. ``targets`` "new": only the users whose target
    is a new item (:meth:`DomainSplit.new_item_targets`); "seen": only the others."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if other_users and targets != "all":
        raise ValueError("other_users scores all of them: a new item is new to the partner's own training users")
    if finetuned:
        tuned = run / "finetuned" / spec.name / "model"
        if not (tuned / "model.json").is_file():
            raise FileNotFoundError(
                f"{tuned}: no fine-tuned model of partner {spec.name!r} after {run} (simulations.seeds --finetune and "
                "simulations.experiments write one there)"
            )
    else:
        arrays, head = federations.federated_model(run, spec.name)  # checks that run is a finished run folder
        settings = settings_from_run_config(json.loads((run / "config.json").read_text()))
    if other_users:
        data, split = federations.other_users(spec)
    else:
        data = partner.partner_data(spec, max_len=partner.HEAD.max_len)
        split = data.split
    # a fine-tuned model's catalogue is the partner's, whichever of the domain's users are scored
    models = (
        load_domain_model(tuned, spec.name).members
        if finetuned
        else [partner.build_model(settings, data, adapter_arrays=arrays, head=head)]
    )
    per_user = user_scores(models, split)
    if targets != "all":
        keep = {which: torch.as_tensor(split.new_item_targets(which) == (targets == "new")) for which in per_user}
        per_user = {which: s[keep[which]] for which, s in per_user.items()}
        if few := {which: len(s) for which, s in per_user.items() if len(s) < 2}:
            raise ValueError(
                f"partner {spec.name!r}: {few} users whose target is a {targets} item; a paired comparison needs at "
                "least 2 in each split (leave it out with --partners)"
            )
    return per_user


def user_scores(model: DomainModel | Sequence[DomainModel], split: DomainSplit) -> dict[str, torch.Tensor]:
    """Each valid and test user's NDCG@10 [U] under ``model`` (or several models' averaged scores), in ``split.eval_users`` order."""
    return {which: user_ndcg(model_user_ranks(model, split, which)) for which in SPLITS}


def paired(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Two models' :func:`scores` on the same users: each split's NDCG@10 under both, their
    paired difference (also as a fraction of the baseline's, ``change``), and the no-harm pick."""
    row: dict[str, Any] = {}
    for which in SPLITS:
        diff = paired_difference(ours[which], theirs[which])
        low, high = diff.interval
        base = float(theirs[which].mean())
        row[which] = {
            "users": diff.n,
            "baseline": base,
            "run": float(ours[which].mean()),
            "difference": diff.mean,
            "interval": [low, high],
            "z": diff.z,
            # relative to the baseline's score; None where it scores 0 (e.g. a few users, none hit)
            "change": diff.mean / base if base else None,
            "change-interval": [low / base, high / base] if base else None,
        }
    keep_run = row["valid"]["z"] > Z_ONE_SIDED_5
    row["kept"] = {"model": "run" if keep_run else "baseline", "test": row["test"]["run" if keep_run else "baseline"]}
    return row


def compare(
    spec: PartnerSpec, *, run: Path, baseline: Path, other_users: bool = False, targets: str = "all", finetuned: bool = False
) -> dict[str, Any]:
    """Partner ``spec``'s row: its models after ``run`` and ``baseline`` (:func:`scores`), :func:`paired`."""
    users: dict[str, Any] = {"other_users": other_users, "targets": targets, "finetuned": finetuned}
    return {"partner": spec.name, **paired(scores(run, spec, **users), scores(baseline, spec, **users))}


def change_with_interval(comparison: dict[str, Any]) -> str:
    """One split of :func:`paired` as a table cell: the change as a fraction of the baseline's NDCG@10
    with its 95 % interval, bold where the interval excludes no change; where the baseline scores 0,
    the difference itself."""
    if comparison["change"] is None:
        low, high = comparison["interval"]
        return f"{comparison['difference']:+.4f} ({low:+.4f} to {high:+.4f}); baseline 0"
    low, high = comparison["change-interval"]
    mark = "**" if low > 0 or high < 0 else ""
    return f"{mark}{comparison['change']:+.1%}{mark} ({low:+.1%} to {high:+.1%})"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| partner | test users | baseline NDCG@10 | run NDCG@10 | change (95 % interval) | z | valid z | kept (no-harm rule) | its change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["test"]
        if t["change"] is None:  # the baseline scores 0: the difference itself, no relative change
            low, high = t["interval"]
            change, kept = f"{t['difference']:+.4f} ({low:+.4f} to {high:+.4f}); baseline 0", "-"
        else:
            low, high = t["change-interval"]
            change, kept = f"{t['change']:+.1%} ({low:+.1%} to {high:+.1%})", f"{r['kept']['test'] / t['baseline'] - 1:+.1%}"
        lines.append(
            f"| {r['partner']} | {t['users']} | {t['baseline']:.4f} | {t['run']:.4f} | {change} "
            f"| {t['z']:+.2f} | {r['valid']['z']:+.2f} | {r['kept']['model']} | {kept} |"
        )
    return lines


def scenario_partners(
    parser: argparse.ArgumentParser, scenario: Path, names: list[str] | None, *, two_for: str | None = None
) -> list[PartnerSpec]:
    """The scenario's partners, or only those named by ``--partners`` (an unknown name is a usage error).
    ``two_for``: what needs at least two of them (fewer is a usage error that says so)."""
    specs = read_scenario(parser, scenario)
    if names:
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            parser.error(f"--partners {unknown} not in {scenario} (its partners: {[s.name for s in specs]})")
        specs = [s for s in specs if s.name in names]
    if two_for and len(specs) < 2:
        parser.error(f"{scenario} (with --partners, if given): {two_for} needs two partners, got {[s.name for s in specs]}")
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, required=True, help="the runs' scenario file: each partner's data")
    parser.add_argument("--run", required=True, help="run folder (or pattern with {partner}) whose models are compared")
    parser.add_argument("--baseline", required=True, help="run folder (or pattern with {partner}) of the models compared against")
    parser.add_argument("--partners", nargs="+", help="only these partners (default: every partner of the scenario)")
    whom = parser.add_mutually_exclusive_group()
    whom.add_argument(
        "--other-users",
        action="store_true",
        help="score each partner on its domain's users after its max-users, whom it never saw (a cold-start partner)",
    )
    whom.add_argument(
        "--new-items",
        action="store_true",
        help="score each partner on its users whose target is a new item, one none of its training sequences holds",
    )
    whom.add_argument("--seen-items", action="store_true", help="score each partner on its users whose target is not a new item")
    parser.add_argument(
        "--finetuned",
        action="store_true",
        help="compare each side's fine-tuned model (<run>/finetuned/<partner>/model, from simulations.seeds --finetune or "
        "simulations.experiments) instead of its model after the run",
    )
    parser.add_argument("--out", type=Path, help="folder for compare.md and compare.json")
    args = parser.parse_args(argv)
    specs = scenario_partners(parser, args.scenario, args.partners)
    targets = "new" if args.new_items else "seen" if args.seen_items else "all"
    rows = [
        compare(
            spec,
            run=run_folder(args.run, spec.name),
            baseline=run_folder(args.baseline, spec.name),
            other_users=args.other_users,
            targets=targets,
            finetuned=args.finetuned,
        )
        for spec in specs
    ]
    scored = "other-users" if args.other_users else "all" if targets == "all" else f"{targets}-items"
    models = ", each side's fine-tuned model" if args.finetuned else ""
    lines = [f"`{args.run}` against `{args.baseline}`{models}, test NDCG@10{SCORED[scored]}, paired user by user:", "", *table(rows)]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text("\n".join(lines) + "\n")
        write_json(
            args.out / "compare.json",
            {"run": args.run, "baseline": args.baseline, "users": scored, "finetuned": args.finetuned, "partners": rows},
        )


if __name__ == "__main__":
    main()
