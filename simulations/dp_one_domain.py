"""DP-SGD on one real domain alone: test NDCG@10 at a budget, for a batch size and learning rate.

    python -m simulations.dp_one_domain [--domain amazon2018-scientific] [--epsilon 8]
        [--batch-size 64] [--lr 1e-3] [--epochs 6] [--optimizer adamw|sgd] [--out runs/dp-one-domain]

The partner's own DP training (``client.local_training.train_round``: Opacus,
Poisson sampling over users, adapter and head under one DP optimizer), with the
noise calibrated for all ``--epochs`` at once, as a federation calibrates it for
all its rounds. Prints the untrained model's score beside the trained one: the
question is whether DP training beats the text-similarity start at all.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from client.local_training import DPPlan, train_round
from client.partner import HEAD, partner_data
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import OPTIMIZERS, FederationSettings
from shared.privacy.accounting import Budget, PartnerAccountant, calibrate_noise, poisson_schedule
from shared.training import ranking_metrics
from simulations.bench_dp_step import model_for
from simulations.common import add_domain_flag, add_out_flag, machine, real_domain, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_domain_flag(parser, "amazon2018-scientific")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the privacy budget of the whole training (default: 8)")
    parser.add_argument("--batch-size", type=int, default=64, help="expected users per Poisson batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 0.001)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the users, planned in advance as DP needs (default: 6)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="the optimizer DP-SGD wraps (default: adamw)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-user gradient clipping norm (default: 1)")
    add_out_flag(parser, "runs/dp-one-domain")
    args = parser.parse_args()

    data = partner_data(PartnerSpec(args.domain, real_domain(args.domain), None, None), max_len=HEAD.max_len)
    settings = FederationSettings(batch_size=args.batch_size, lr=args.lr)
    model = model_for(data, settings)

    def test_ndcg() -> float:
        return ranking_metrics(model, data.split, "test")["ndcg@10"]

    untrained = test_ndcg()
    n_users = len(data.examples)
    rate, per_epoch = poisson_schedule(users=n_users, batch_size=args.batch_size)
    budget = Budget(args.epsilon, 1.0 / (10 * n_users))
    sigma = calibrate_noise(budget=budget, sample_rate=rate, steps=args.epochs * per_epoch)
    accountant = PartnerAccountant(budget)
    started = time.monotonic()
    outcome, _ = train_round(
        model,
        data.examples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        negatives=settings.negatives,
        seed=0,
        dp=DPPlan(sigma, args.max_grad_norm, accountant),
        optimizer_kind=args.optimizer,
    )
    seconds = time.monotonic() - started
    trained = test_ndcg()
    print(
        f"{args.domain}: epsilon {accountant.epsilon():.2f} (target {args.epsilon:g}), batch {args.batch_size}, {args.optimizer} lr {args.lr:g}, "
        f"noise {sigma:.3f}, {outcome.steps} steps, {seconds:.0f} s; test NDCG@10 untrained {untrained:.4f} -> DP-trained {trained:.4f}  [{machine()}]"
    )
    write_json(
        Path(args.out) / f"{args.domain}-eps{args.epsilon:g}-b{args.batch_size}-{args.optimizer}-lr{args.lr:g}.json",
        {
            **vars(args),
            "noise_multiplier": sigma,
            "steps": outcome.steps,
            "epsilon_spent": accountant.epsilon(),
            "untrained": untrained,
            "trained": trained,
            "seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
