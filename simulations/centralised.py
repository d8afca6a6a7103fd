"""The federation's centralised counterpart: what sharing the raw data itself would give each partner.

    python -m simulations.centralised --scenario simulations/scenarios/amazon-steam-4k.toml
        [--rounds 3] [--local-epochs 2] [--batch-size 64] [--seed 0] [--partners NAME ...]
        [--share-head] [--out runs/centralised]

A federation without DP can at best approach what the same model learns from
every partner's data in one place; it does not beat it. So when a partner loses
in the federation against training alone, this tells whether any sharing of
this model could lift it: if pooling the data costs that partner too, the loss
is the catalogues', not FedAvg's.

Both arms train the federation's model with a round's training, without DP
(:func:`client.partner.build_model`, ``trains = "adapter"``: the shared adapter,
the partner's private residual and the prior's weight, at
``PRIOR_LR_SCALE`` x lr, the head at its identity start; the exact counts of
the prior; the sampled softmax with uniform negatives; batches of
``batch-size`` users; AdamW), for ``rounds`` x ``local-epochs`` passes over
each partner's users, in one process:

- ``alone``: each partner's model on its own users (the experiments' ``local``
  arm, in one process: the same training, with its batches drawn differently);
- ``pooled``: every partner's model holds one and the same adapter, and all
  partners' batches are shuffled into one order, one optimizer step each, as if
  the raw data were in one place. The adapter thus takes as many steps as all
  partners together; each private part as many as alone.

With ``--share-head`` both arms train the sequence head too (``trains =
"all"``), and the pooled arm shares it like the adapter: whether a head
learnt from every catalogue's histories would be worth sending.

Each partner is scored after every ``local-epochs`` passes (a round's worth),
and its final models user by user against each other
(:func:`simulations.compare_runs.paired`): as trained, and again with each
model's prior weight calibrated on its own valid users
(:func:`shared.training.calibrate_prior`, the model a partner keeps with run
setting ``calibrate-prior``). Writes ``centralised.md`` and ``centralised.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from client import partner
from client.local_training import freeze_untrained, make_optimizer, trim_padding
from shared.device import model_device
from shared.federation.adapter import initial_adapter
from shared.federation.settings import FederationSettings
from shared.model.recommender import DomainModel
from shared.privacy.item_counts import user_weighted_counts
from shared.training import DomainRun, calibrate_prior
from simulations.common import machine, write_report
from simulations.compare_runs import change_with_interval, paired, scenario_partners, user_scores

ARMS = ("alone", "pooled")


def partner_model(settings: FederationSettings, data: partner.PartnerData) -> DomainModel:
    """A partner's model as a federation without DP starts it: the initial adapter, the
    exact counts of its prior, the head at identity (frozen there unless ``settings.trains`` is "all")."""
    arrays = initial_adapter(settings, in_dim=int(data.vectors.shape[1]))
    counts = user_weighted_counts(data.split.train, n_items=data.split.n_items, window=settings.popularity_window)
    model = partner.build_model(settings, data, adapter_arrays=arrays, head=None, counts=torch.as_tensor(counts))
    freeze_untrained(model, settings.trains)
    return model


def train_together(
    models: dict[str, DomainModel],
    data: dict[str, partner.PartnerData],
    settings: FederationSettings,
    *,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, dict[str, torch.Tensor]]]:
    """Trains ``models`` for ``rounds x local-epochs`` passes with one optimizer, the partners'
    batches shuffled into one order. Returns each partner's valid and test NDCG@10 after every
    ``local-epochs`` passes, and its per-user scores (:func:`simulations.compare_runs.user_scores`) after the last.
    Models that hold one adapter object train it together (pooled)."""
    params = list({id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}.values())
    prior = [m.popularity.weight for m in models.values() if m.popularity is not None]
    optimizer = make_optimizer(settings.optimizer, params, lr=settings.lr, fast=prior)
    generator = torch.Generator().manual_seed(settings.seed)  # batches and negatives
    torch.manual_seed(settings.seed)  # dropout
    order = np.random.default_rng(settings.seed)
    history: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    final: dict[str, dict[str, torch.Tensor]] = {}
    arm = "pooled" if len(models) > 1 else "alone"
    started = time.monotonic()
    for epoch in range(1, settings.rounds * settings.local_epochs + 1):
        batches = [
            (name, batch)
            for name in models
            for batch in DataLoader(data[name].examples, batch_size=settings.batch_size, shuffle=True, generator=generator)
        ]
        for i in order.permutation(len(batches)):
            name, (inputs, targets) = batches[i]
            model = models[name]
            model.train()
            inputs, targets = trim_padding(inputs, targets)
            negatives = torch.randint(1, model.features.n_items + 1, (len(inputs), settings.negatives), generator=generator)
            device = model_device(model)
            loss = model(inputs.to(device), targets.to(device), negatives.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % settings.local_epochs == 0:
            for name, model in models.items():
                final[name] = user_scores(model, data[name].split)
                scores = {which: float(s.mean()) for which, s in final[name].items()}
                history[name].append({"round": epoch // settings.local_epochs, "epochs": epoch, **scores})
                log(
                    f"{arm}, epoch {epoch}: {name} valid {scores['valid']:.4f} test {scores['test']:.4f} ({time.monotonic() - started:.0f} s)"
                )
    return history, final


def arm_models(arm: str, data: dict[str, partner.PartnerData], settings: FederationSettings) -> dict[str, DomainModel]:
    """Each partner's model for ``arm``, untrained. Pooled, the partners hold one adapter, and one
    head where the head trains (``settings.trains = "all"``, ``--share-head``)."""
    models = {name: partner_model(settings, d) for name, d in data.items()}
    if arm == "pooled":
        first = next(iter(models.values()))
        for model in models.values():
            model.adapter = first.adapter  # one adapter for all: the pooled model
            if settings.trains == "all":
                model.head = first.head
    return models


def run_arm(
    arm: str,
    models: dict[str, DomainModel],
    data: dict[str, partner.PartnerData],
    settings: FederationSettings,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains one arm's models (:func:`arm_models`) from the start: each partner's history, its
    per-user scores at the end, and (``calibrated``) the factor on its prior's weight that its
    valid users rank best and its per-user scores with it; the models are left so calibrated.
    Pooled, all partners train together; alone, each by itself."""
    groups = [list(models)] if arm == "pooled" else [[name] for name in models]
    arm_scores: dict[str, Any] = {}
    for group in groups:
        history, final = train_together({n: models[n] for n in group}, data, settings, log=log)
        arm_scores.update({n: {"history": history[n], "scores": final[n]} for n in group})
    for name, model in models.items():  # after training: the prior's weight is private, one per partner
        factor, _ = calibrate_prior(DomainRun(data[name].split, model))
        arm_scores[name]["calibrated"] = {"factor": factor, "scores": user_scores(model, data[name].split)}
        log(f"{arm}: {name}'s prior weight calibrated x{factor:g}")
    return arm_scores


def table(names: list[str], arms: dict[str, dict[str, Any]], rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per partner: its test NDCG@10 alone and pooled after each round, the final change
    as trained, and the change with each side's prior weight calibrated (``rows[name]["calibrated"]``)."""
    rounds = len(arms["alone"][names[0]]["history"])
    lines = [
        "| partner | "
        + " | ".join(f"alone / pooled, round {r + 1}" for r in range(rounds))
        + " | change in test NDCG@10 (95 % interval) | z | change in valid NDCG@10 "
        + "| prior's factor, alone / pooled | calibrated: change in test NDCG@10 (95 % interval) | z |",
        "|---|" + "---|" * (rounds + 6),
    ]
    for name in names:
        steps = [
            f"{a['test']:.4f} / {p['test']:.4f}"
            for a, p in zip(arms["alone"][name]["history"], arms["pooled"][name]["history"], strict=True)
        ]
        test, valid, calibrated = rows[name]["test"], rows[name]["valid"], rows[name]["calibrated"]["test"]
        factors = " / ".join(f"{arms[arm][name]['calibrated']['factor']:g}" for arm in ARMS)
        lines.append(
            f"| {name} | {' | '.join(steps)} | {change_with_interval(test)} | {test['z']:+.2f} | {valid['change']:+.1%} "
            f"| {factors} | {change_with_interval(calibrated)} | {calibrated['z']:+.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", type=Path, required=True, help="scenario file: each partner's data")
    parser.add_argument("--rounds", type=int, default=3, help="a federation's rounds: the models are scored after each")
    parser.add_argument("--local-epochs", type=int, default=2, help="passes over each partner's users per round")
    parser.add_argument("--batch-size", type=int, default=64, help="users per step")
    parser.add_argument("--seed", type=int, default=0, help="initial adapter, batches, negatives and dropout")
    parser.add_argument("--partners", nargs="+", help="only these partners (default: every partner of the scenario)")
    parser.add_argument(
        "--share-head",
        action="store_true",
        help="train the sequence head too, in both arms, and share it in the pooled one (default: the head stays at identity)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/centralised"), help="folder for centralised.md and centralised.json")
    args = parser.parse_args(argv)
    specs = scenario_partners(parser, args.scenario, args.partners, two_for="pooling")
    settings = FederationSettings(
        dp=False,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        trains="all" if args.share_head else "adapter",
    )
    started = time.monotonic()
    data = {s.name: partner.partner_data(s, max_len=partner.HEAD.max_len) for s in specs}  # read once, for both arms
    arms = {arm: run_arm(arm, arm_models(arm, data, settings), data, settings) for arm in ARMS}
    names = [s.name for s in specs]
    rows = {
        name: {
            **paired(arms["pooled"][name]["scores"], arms["alone"][name]["scores"]),
            "calibrated": paired(arms["pooled"][name]["calibrated"]["scores"], arms["alone"][name]["calibrated"]["scores"]),
        }
        for name in names
    }
    minutes = (time.monotonic() - started) / 60
    lines = [
        f"`{args.scenario}`, {args.rounds} rounds x {args.local_epochs} local epochs, seed {args.seed}, without DP, "
        f"{'the head trained too (shared when pooled)' if args.share_head else 'the head at identity'}; "
        f"test NDCG@10 of each partner's model trained alone / pooled with the others' data after each round, "
        f"and the final change, paired user by user (bold: the interval excludes 0), as trained and with each model's "
        f"prior weight calibrated on its valid users. {machine()}, {minutes:.0f} min.",
        "",
        *table(names, arms, rows),
    ]
    write_report(
        args.out,
        "centralised",
        lines,
        {
            "scenario": str(args.scenario),
            "settings": {
                "rounds": args.rounds,
                "local-epochs": args.local_epochs,
                "batch-size": args.batch_size,
                "seed": args.seed,
                "share-head": args.share_head,
            },
            "partners": {
                n: {
                    "history": {arm: arms[arm][n]["history"] for arm in ARMS},
                    "prior-factor": {arm: arms[arm][n]["calibrated"]["factor"] for arm in ARMS},
                    **rows[n],
                }
                for n in names
            },
            "minutes": minutes,
        },
    )


if __name__ == "__main__":
    main()
