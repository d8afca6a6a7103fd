"""Training without DP: one partner alone (``local``) or all domains pooled.

``pooled`` is the centralised, non-private upper bound for the federation: the
same architecture (one shared adapter, a private head per domain) trained on all
domains' raw data in one place. Batches of each domain are interleaved, each
scored against its own catalogue.

Early stopping on the mean valid NDCG@10 over domains (with ``calibrate_prior``,
of each epoch's model with its prior's weight calibrated, as it would be kept); the
best epoch's weights are restored. ``max_minutes`` bounds the training wall time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from shared.allocator import keep_freed_memory
from shared.checks import Problem, SelfChecking, expect
from shared.data.split import DomainSplit
from shared.device import model_device
from shared.evaluation import Scorer, metrics_from_ranks, user_ranks, user_ranks_with_offsets
from shared.model.recommender import DomainModel

LOSSES = ("full", "sampled")


@dataclass
class TrainConfig(SelfChecking):
    epochs: int = field(default=40, metadata={"help": "most passes over the training users"})
    batch_size: int = field(default=128, metadata={"help": "users per batch"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    loss: str = field(default="full", metadata={"help": "'full' softmax over the catalogue, or 'sampled' (per-sample negatives; DP-safe)"})
    negatives: int = field(default=256, metadata={"help": "uniform negatives per user for the sampled loss"})
    patience: int = field(default=5, metadata={"help": "epochs without a better valid NDCG@10 before stopping"})
    lr_patience: int = field(
        default=2, metadata={"help": "halve the learning rate after this many epochs without a better valid NDCG@10 (0: never)"}
    )
    max_minutes: float | None = field(default=None, metadata={"help": "stop training after this many minutes"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, batching and dropout"})
    calibrate_prior: bool = field(
        default=False,
        metadata={
            "help": "scale the popularity prior's weight by the factor (0.25 to 16, PRIOR_SCALES) with the best valid NDCG@10, and "
            "pick the epoch by that calibrated score: for catalogues where popularity predicts a user's latest item more than "
            "their earlier ones (Steam)"
        },
    )

    def problems(self) -> list[Problem]:
        return expect(
            self,
            ("epochs", self.epochs >= 1, "a whole number of at least 1"),
            ("batch_size", self.batch_size >= 1, "a whole number of at least 1"),
            ("lr", self.lr > 0, "above 0"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("loss", self.loss in LOSSES, " or ".join(map(repr, LOSSES))),
            ("negatives", self.negatives >= 1, "a whole number of at least 1"),
            ("patience", self.patience >= 1, "a whole number of at least 1"),
            ("lr_patience", self.lr_patience >= 0, "a whole number of at least 0 (0: never halve)"),
            ("max_minutes", self.max_minutes is None or self.max_minutes > 0, "above 0, or not given for no time cap"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
        )


@dataclass
class DomainRun:
    split: DomainSplit
    model: DomainModel


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def next_item_pairs(seqs: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-item targets), both [B, width] right-padded, from sequences of >= 2 items."""
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, : len(s) - 1] = torch.as_tensor(np.asarray(s[:-1]))
        targets[i, : len(s) - 1] = torch.as_tensor(np.asarray(s[1:]))
    return inputs, targets


def training_batches(
    split: DomainSplit, rng: np.random.Generator, *, batch_size: int, max_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of users: (inputs, next-item targets), both [B, L] right-padded."""
    users = np.array([u for u, s in enumerate(split.train) if len(s) >= 2])
    rng.shuffle(users)
    for start in range(0, len(users), batch_size):
        seqs = [split.train[u][-(max_len + 1) :] for u in users[start : start + batch_size]]
        yield next_item_pairs(seqs, max(len(s) for s in seqs) - 1)


def averaged_scorer(models: Sequence[DomainModel]) -> Scorer:
    """Full-catalogue scores averaged over ``models`` (each put in eval mode): s(u, i) = 1/M sum_m s_m(u, i).

    With several models fine-tuned from one start under different seeds this is a
    seed ensemble (Lakshminarayanan et al., "Simple and Scalable Predictive
    Uncertainty Estimation using Deep Ensembles", 2017): the members' errors
    differ, so the average ranks better than the typical member. The members must
    share one catalogue (the same item order); the scores averaged are the logits
    (cosine / temperature + prior). One model: its own scores."""
    if not models:
        raise ValueError("averaged_scorer needs at least one model")
    if len({m.features.n_items for m in models}) > 1:
        raise ValueError(f"the models score different catalogues ({sorted({m.features.n_items for m in models})} items)")
    for m in models:
        m.eval()
    with torch.no_grad():
        catalogues = [m.catalogue() for m in models]  # [N, d] each, computed once

    @torch.no_grad()
    def score(seqs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        total = models[0].score_all(seqs, lengths, catalogues[0])  # [B, N]
        for m, c in zip(models[1:], catalogues[1:], strict=True):
            total += m.score_all(seqs, lengths, c)
        return total / len(models)

    return score


def model_user_ranks(model: DomainModel | Sequence[DomainModel], split: DomainSplit, which: str) -> torch.Tensor:
    """Each evaluated user's full-catalogue rank of its ``which`` target [U] under ``model``
    (put in eval mode), or under the average of several models' scores (:func:`averaged_scorer`)."""
    models = [model] if isinstance(model, DomainModel) else list(model)
    return user_ranks(averaged_scorer(models), split, which, max_len=models[0].max_len, device=model_device(models[0]))


def ranking_metrics(model: DomainModel | Sequence[DomainModel], split: DomainSplit, which: str) -> dict[str, float]:
    """Full-catalogue ranking metrics of ``model`` (or of several models' averaged scores) on ``split``'s valid or test users."""
    return metrics_from_ranks(model_user_ranks(model, split, which))


def evaluate_model(run: DomainRun, which: str) -> dict[str, float]:
    return ranking_metrics(run.model, run.split, which)


Metrics = dict[str, dict[str, float]]  # {"valid": {...}, "test": {...}}


def keep_ensemble_or_best(
    members: Sequence[tuple[int, DomainRun, Metrics]], split: DomainSplit, *, log: Callable[[str], None] = print
) -> tuple[list[DomainRun], Metrics, Metrics | None, str]:
    """Which of one domain's seed runs ``(seed, run, metrics)`` to keep: all of them, recommending by their
    averaged scores (:func:`averaged_scorer`), or the best one alone, whichever has the higher valid NDCG@10
    (ties: the ensemble; between members, the first seed). Chosen on valid users only, so test stays unseen.

    Returns (the runs to save, their valid/test metrics, the ensemble's metrics or None for one seed,
    ``"ensemble"`` or ``"seed S"``)."""
    seed, run, metrics = max(members, key=lambda m: m[2]["valid"]["ndcg@10"])
    if len(members) == 1:
        return [run], metrics, None, f"seed {seed}"
    runs = [r for _, r, _ in members]
    ensemble = {w: ranking_metrics([r.model for r in runs], split, w) for w in ("valid", "test")}
    keep_all = ensemble["valid"]["ndcg@10"] >= metrics["valid"]["ndcg@10"]
    each = ", ".join(f"{s} {m['valid']['ndcg@10']:.4f}" for s, _, m in members)
    log(
        f"{split.name}: valid NDCG@10 of seeds {each}; of their averaged scores {ensemble['valid']['ndcg@10']:.4f}: kept "
        + (f"the ensemble of {len(runs)}" if keep_all else f"seed {seed} alone")
    )
    if keep_all:
        return runs, ensemble, ensemble, "ensemble"
    return [run], metrics, ensemble, f"seed {seed}"


# Factors calibrate_prior tries on the trained weight of the popularity prior: steps of
# about 20 % near 1, where the Amazon domains' best factors lie (0.35 to 1.2), wider above.
PRIOR_SCALES = (0.25, 0.35, 0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


@torch.no_grad()
def valid_ndcg_by_prior_scale(run: DomainRun, *, scales: Sequence[float] = PRIOR_SCALES) -> dict[float, float]:
    """Valid NDCG@10 of ``run``'s model with its popularity prior's trained weight scaled by each
    factor of ``scales`` and by 1 ({} for a model without the prior); the model is left as it was.

    One pass over the valid users: the text scores are the same under every factor."""
    model = run.model
    if model.popularity is None or model.log_counts is None:
        return {}
    model.eval()
    weight = model.popularity.weight  # [1, 1]
    trained = weight.detach().clone()
    prior = trained.reshape(()) * model.log_counts[1:]  # [N], the prior as trained
    factors = sorted({*scales, 1.0})
    weight.zero_()  # score_all then gives the text scores alone
    try:
        catalogue = model.catalogue()  # [N, d]
        scorer = partial(model.score_all, catalogue=catalogue)
        offsets = torch.tensor(factors, device=prior.device).unsqueeze(1) * prior  # [F, N]
        ranks = user_ranks_with_offsets(scorer, run.split, "valid", offsets, max_len=model.max_len, device=model_device(model))
    finally:
        weight.copy_(trained)
    return {f: metrics_from_ranks(r)["ndcg@10"] for f, r in zip(factors, ranks, strict=True)}


@torch.no_grad()
def scale_prior_weight(model: DomainModel, factor: float) -> None:
    """Multiplies the trained weight of ``model``'s popularity prior by ``factor`` (a calibration's choice)."""
    assert model.popularity is not None, "a model without the popularity prior has no weight to scale"
    model.popularity.weight.mul_(factor)


def best_prior_scale(by_scale: dict[float, float]) -> float:
    """The factor of :func:`valid_ndcg_by_prior_scale`'s result with the best valid NDCG@10;
    ties go to 1, the weight as trained."""
    return max(by_scale, key=lambda f: (by_scale[f], f == 1.0))


@torch.no_grad()
def calibrate_prior(run: DomainRun, *, scales: Sequence[float] = PRIOR_SCALES) -> tuple[float, dict[float, float]]:
    """Scales the trained weight of the popularity prior by the factor among ``scales`` with the
    best valid NDCG@10 (1, the weight as trained, unless another is strictly better); returns
    the factor and each factor's valid NDCG@10 ({} for a model without the prior).

    Training fits the weight over every next-item position of the histories under a sampled
    softmax, but a user's valid and test items are their latest, ranked against the whole
    catalogue: on Steam (4,000 users) a weight 8 times the trained one lifts valid NDCG@10
    from 0.0285 to 0.0352, on beauty 0.6 times it from 0.0317 to 0.0325, and beside an
    averaged adapter 0.5 times it from 0.0305 to 0.0327 (docs/experiments.md, "The prior's
    weight"). Valid users only, so test stays unseen; after training, never in it: the
    weight does not take part in any later training step or release, so it is for a model
    that stays with its partner (``fedxrec train``, ``fedxrec finetune``, and a partner's
    kept model in a federation with ``calibrate-prior``).
    """
    by_scale = valid_ndcg_by_prior_scale(run, scales=scales)
    if not by_scale:
        return 1.0, {}
    best = best_prior_scale(by_scale)
    scale_prior_weight(run.model, best)
    return best, by_scale


def train(runs: list[DomainRun], config: TrainConfig, *, log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Trains all ``runs`` together; returns one history record per epoch (epoch 0 = untrained).

    With ``config.calibrate_prior``, each epoch is judged by its models' valid NDCG@10 with
    their prior's weight calibrated on valid users (:func:`calibrate_prior`; each record also
    holds the weight as trained's), so the epoch kept is the best model as it is kept, not the
    best before calibrating; the kept epoch's weight is then scaled by its factor, and the last
    record (``"epoch": "prior"``) says by what. One pass over the valid users ranks every
    factor, in place of the epoch's plain valid scoring."""
    keep_freed_memory()
    rng = np.random.default_rng(config.seed)
    params = list({id(p): p for r in runs for p in r.model.parameters() if p.requires_grad}.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict[str, object]] = []
    started = time.monotonic()
    deadline = started + 60 * config.max_minutes if config.max_minutes else float("inf")

    def record(epoch: int, loss: float | None) -> float:
        # with calibrate_prior, an epoch is judged as it would be kept: its prior's weight calibrated
        valid, judged, factors = {}, {}, {}
        for r in runs:
            name = r.split.name
            by_scale = valid_ndcg_by_prior_scale(r) if config.calibrate_prior else {}
            if by_scale:
                factors[name] = best_prior_scale(by_scale)
                valid[name], judged[name] = by_scale[1.0], by_scale[factors[name]]
            else:
                valid[name] = judged[name] = evaluate_model(r, "valid")["ndcg@10"]
        score = float(np.mean(list(judged.values())))
        entry: dict[str, object] = {
            "epoch": epoch,
            "loss": loss,
            "valid_ndcg@10": valid,
            "mean_valid_ndcg@10": float(np.mean(list(valid.values()))),
        }
        if config.calibrate_prior:
            entry |= {"prior_scale": factors, "calibrated_valid_ndcg@10": judged, "mean_calibrated_valid_ndcg@10": score}
        entry["seconds"] = round(time.monotonic() - started, 1)
        history.append(entry)
        log(
            f"epoch {epoch:3d}  loss {'-' if loss is None else f'{loss:.4f}'}  valid NDCG@10 "
            + "  ".join(f"{k} {v:.4f}" + (f" (x{factors[k]:g}: {judged[k]:.4f})" if k in factors else "") for k, v in valid.items())
            + f"  ({history[-1]['seconds']}s)"
        )
        return score

    best_score = record(0, None)
    best_state = [copy.deepcopy(r.model.state_dict()) for r in runs]
    best_epoch, stale = 0, 0
    for epoch in range(1, config.epochs + 1):
        for r in runs:
            r.model.train()
        work = [
            (i, b)
            for i, r in enumerate(runs)
            for b in training_batches(r.split, rng, batch_size=config.batch_size, max_len=r.model.max_len)
        ]
        order = rng.permutation(len(work))
        losses = []
        for j in order:
            i, (inputs, targets) = work[j]
            model = runs[i].model
            device = model_device(model)
            inputs, targets = inputs.to(device), targets.to(device)
            if config.loss == "full":
                loss = model.full_loss(inputs, targets)
            else:
                # drawn on the CPU: the same draws on any device
                negatives = torch.randint(1, model.features.n_items + 1, (targets.shape[0], config.negatives))
                loss = model.sampled_loss(inputs, targets, negatives.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
            if time.monotonic() > deadline:
                break
        score = record(epoch, float(np.mean(losses)))
        if score > best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = [copy.deepcopy(r.model.state_dict()) for r in runs]
        else:
            stale += 1
            if config.lr_patience and stale % config.lr_patience == 0:
                for group in optimizer.param_groups:
                    group["lr"] /= 2
                log(f"learning rate halved to {optimizer.param_groups[0]['lr']:.2e}")
        if stale >= config.patience or time.monotonic() > deadline:
            break
    for r, state in zip(runs, best_state, strict=True):
        r.model.load_state_dict(state)
    log(f"best epoch {best_epoch} (mean {'calibrated ' if config.calibrate_prior else ''}valid NDCG@10 {best_score:.4f})")
    if config.calibrate_prior:  # the factors the kept epoch was judged by
        kept: dict[str, Any] = next(h for h in history if h["epoch"] == best_epoch)
        for r in runs:
            name = r.split.name
            if name in kept["prior_scale"]:  # only a model with the prior has a factor
                factor = kept["prior_scale"][name]
                scale_prior_weight(r.model, factor)
                log(
                    f"{name}: popularity prior's weight x{factor:g} (valid NDCG@10 "
                    f"{kept['valid_ndcg@10'][name]:.4f} -> {kept['calibrated_valid_ndcg@10'][name]:.4f})"
                )
        history.append({"epoch": "prior", "prior_scale": kept["prior_scale"], "seconds": round(time.monotonic() - started, 1)})
    return history
