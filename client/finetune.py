"""After the federation: a partner's local fine-tune, which never leaves the partner.

The start is the partner's federated model: the last global adapter the
coordinator sent (kept in the state folder, :func:`client.private_state.keep_global_adapter`)
with the partner's private head and popularity prior. With run setting
``calibrate-prior`` the partner was scored with its prior's weight scaled: the
"before" figures are that model's, but training starts from the weight as trained
and calibrates it again, judging each epoch by its calibrated score (no training
step uses a calibrated weight, :func:`shared.training.calibrate_prior`). ``fedxrec train``'s recipe
trains it on the partner's own data: head and adapter, full softmax, exact item
counts, learning-rate halving and early stopping on valid NDCG@10. This is the
simplest personalised federated learning ("FedAvg + local fine-tuning", e.g.
Yu, Bagdasaryan & Shmatikov, "Salvaging Federated Learning by Local
Adaptation", 2020). In the experiments (docs/experiments.md) it beats training alone on
both domains (thousands of users each); on a 300-user partner it did not: early
stopping on 300 users' valid items picks an epoch by noise (a note says so below
``FEW_VALID_USERS``).

Nothing is sent, so it spends nothing of the federation's privacy budget. The
fine-tuned model is trained without DP, like any model a partner trains alone:
it is for the partner's own use and must not be shared. The state folder is only
read: a later DP round from it stays possible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client import partner
from client.local_training import freeze_untrained
from client.private_state import GLOBAL_ADAPTER, PRIOR_SCALE, PartnerState, catalogue_fingerprint, read_kept_adapter, scored_head
from shared.device import training_device
from shared.federation.adapter import adapter_config
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings
from shared.pipeline import ModelConfig, save_domain_model, write_model_index
from shared.privacy.item_counts import user_weighted_counts
from shared.training import DomainRun, TrainConfig, evaluate_model, keep_ensemble_or_best, seed_everything, train

FINETUNE_MODES = ("best", "recipe", "continue")

# Below this many validation users, early stopping picks an epoch by noise (README, cold start).
FEW_VALID_USERS = 1000


def run_state_folder(state_dir: Path, run_id: str | None, *, log: Callable[[str], None] = print) -> Path:
    """The run's own state folder: ``state_dir`` itself (a simulated partner's, or one run's),
    or for a deployed partner's ``state-dir`` its ``runs/<run_id>`` (default: the latest run)."""
    runs = state_dir / "runs"
    if (state_dir / "state.pt").is_file() and run_id is None:
        return state_dir
    if not runs.is_dir():
        if run_id is not None:
            raise FileNotFoundError(f"{runs} not found: --run-id goes with a deployed partner's state-dir, which keeps each run there")
        return state_dir  # federated_start names what is missing
    trained = sorted((p for p in runs.iterdir() if (p / "state.pt").is_file()), key=lambda p: (p / "state.pt").stat().st_mtime)
    if run_id is not None:
        if not (runs / run_id / "state.pt").is_file():
            raise FileNotFoundError(f"{runs / run_id}: no trained state of run {run_id!r}; runs here: {[p.name for p in trained]}")
        return runs / run_id
    if not trained:
        raise FileNotFoundError(f"{runs}: no run has trained yet")
    if len(trained) > 1:
        log(f"fine-tuning run {trained[-1].name!r}, the latest of {len(trained)} in {runs} (--run-id to pick another)")
    return trained[-1]


def federated_start(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], PartnerState]:
    """The adapter of the partner's final federated model (arrays, metadata) and the private state kept in its state folder."""
    state_file, adapter_file = state_dir / "state.pt", state_dir / GLOBAL_ADAPTER
    problems = []
    if not state_file.is_file():
        problems.append(
            f"{state_file} not found: --state-dir must be a partner's state folder (its node config state-dir) after it trained"
        )
    if not adapter_file.is_file():
        problems.append(
            f"{adapter_file} not found: a partner keeps the coordinator's adapter when it evaluates a round "
            "(a state folder from before this version, or a run without evaluation, has none)"
        )
    if problems:
        raise FileNotFoundError("; ".join(problems))
    state = PartnerState.load(state_dir)
    if state.head is None:
        raise ValueError(f"{state_file} holds no private head: the partner never trained a round")
    arrays, meta = read_kept_adapter(state_dir)
    assert arrays is not None  # its file was checked above
    if meta.get("kind", "moe") != "moe":
        raise ValueError(f"{adapter_file}: adapter kind {meta.get('kind')!r}; the federation's adapter is 'moe'")
    return arrays, meta, state


def finetune(
    *,
    state_dir: Path,
    data: Path,
    out: Path,
    config: TrainConfig,
    domain: str | None = None,
    max_users: int | None = None,
    run_id: str | None = None,
    mode: str = "best",
    seeds: int = 1,
    device: str = "auto",
    calibrate_as_run: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tunes the partner's federated model on ``data`` (its first ``max_users``
    users, as node config ``max-users``); saves it under ``out/model`` (for
    ``fedxrec recommend``) and returns valid/test metrics before and after.
    ``state_dir`` is a run's state folder or a deployed partner's ``state-dir``
    (then its run ``run_id``, default the latest).

    ``mode``: ``"recipe"`` trains head and adapter with ``config`` as given
    (``fedxrec train``'s recipe: full softmax, whole-history item counts);
    ``"continue"`` goes on with the federation's own training, locally: the
    adapter and the prior's weight (the head stays as the federation left it),
    sampled softmax, the federation's last-``popularity-window`` item counts
    (exact, with each user's own share left out). In the five-domain
    runs (4,000 users each) the recipe's first epochs pulled the federated model
    down and early stopping kept it; ``continue`` improved it; on Scientific and
    office the recipe did better. ``"best"`` (the default) runs both and keeps the
    one with the higher valid NDCG@10 on the partner's own users (twice the time).

    ``seeds`` > 1: a seed ensemble. The chosen mode is trained again from the same
    start with seeds ``config.seed + 1`` .. ``config.seed + seeds - 1``; the saved
    model averages the members' scores (:func:`shared.training.averaged_scorer`)
    if that scores higher on the partner's valid users than its best member,
    else it is that member. On Scientific after the DP federation single fine-tunes
    spread from 0.0622 to 0.0661 test NDCG@10 by seed alone, and validation could
    not tell the good draws; the ensemble beat every member on validation and
    test (docs/experiments.md). It costs ``seeds`` fine-tunes and as many scorings
    per recommendation, and nothing of the privacy budget.

    ``device``: where the models train and score (:func:`shared.device.training_device`).

    ``calibrate_as_run``: a partner that the federation scored with its prior's weight
    calibrated (run setting ``calibrate-prior``) calibrates it after the fine-tune too,
    whatever ``config.calibrate_prior`` says (``fedxrec finetune`` without either flag);
    False: only as ``config.calibrate_prior`` says (``--no-calibrate-prior`` keeps the weight
    as trained)."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"mode {mode!r}: expected one of {FINETUNE_MODES}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    state_dir = run_state_folder(state_dir, run_id, log=log)
    arrays, meta, state = federated_start(state_dir)
    settings = FederationSettings(
        moe_n_experts=int(meta.get("n_experts", 4)),
        moe_dim=int(meta.get("dim", 128)),
        private_residual=partner.has_private_residual(state.head),
        device=device,
    )
    spec = PartnerSpec(domain or data.name, data, max_users=max_users)
    own = partner.partner_data(spec, max_len=partner.HEAD.max_len, device=training_device(device))
    if meta.get("catalogue") != catalogue_fingerprint(own.split):
        raise ValueError(
            f"--data {data}: not the catalogue the model in {state_dir} was trained on ({meta.get('domain')!r}, "
            f"{int(meta.get('items', 0)):,} items; this folder: {own.split.name!r}, {own.split.n_items:,} items): "
            "give the data folder this partner trained on"
        )
    n_valid = len(own.split.eval_users("valid"))
    if n_valid < FEW_VALID_USERS:
        log(
            f"note: only {n_valid} users' valid items pick the epoch; on so few, early stopping follows noise (in the "
            "README's cold-start runs a fine-tune on 300 users scored below the federated model on the domain's other users)"
        )
    # the start as the federation scored it (calibrate-prior: the prior's weight scaled) ...
    federated = partner.build_model(settings, own, adapter_arrays=arrays, head=scored_head(state.head, meta))
    before = {w: evaluate_model(DomainRun(own.split, federated), w) for w in ("valid", "test")}
    # ... but trained from the weight as trained, which the federation's training fitted: trained from the
    # scaled one (Steam: x8), its first epoch pulled the weight back and valid NDCG@10 halved
    head = state.head
    if calibrate_as_run and PRIOR_SCALE in meta and not config.calibrate_prior:
        log(
            f"the federation scored this partner with its prior's weight x{float(meta[PRIOR_SCALE]):g} (run setting "
            "calibrate-prior): the fine-tune judges each epoch with the weight calibrated again, as with --calibrate-prior"
        )
        config = dataclasses.replace(config, calibrate_prior=True)
    modes = ("recipe", "continue") if mode == "best" else (mode,)
    tried: dict[str, tuple[DomainRun, dict[str, dict[str, float]]]] = {}
    for m in modes:
        if len(modes) > 1:
            log(f"mode {m}:")
        run = _train_mode(m, settings=settings, own=own, arrays=arrays, head=head, config=config, log=log)
        tried[m] = run, {w: evaluate_model(run, w) for w in ("valid", "test")}
    # chosen on the partner's own valid users only (ties: the first, recipe)
    chosen = max(tried, key=lambda m: tried[m][1]["valid"]["ndcg@10"])
    if len(modes) > 1:
        scores = ", ".join(f"{m} {r[1]['valid']['ndcg@10']:.4f}" for m, r in tried.items())
        log(f"kept mode {chosen!r} (valid NDCG@10: {scores})")
    members = [(config.seed, *tried[chosen])]
    for seed in range(config.seed + 1, config.seed + seeds):
        log(f"ensemble member {seed - config.seed + 1} of {seeds} (mode {chosen}, seed {seed}):")
        member = _train_mode(
            chosen, settings=settings, own=own, arrays=arrays, head=head, config=dataclasses.replace(config, seed=seed), log=log
        )
        members.append((seed, member, {w: evaluate_model(member, w) for w in ("valid", "test")}))
    kept, after, ensemble, kept_label = keep_ensemble_or_best(members, own.split, log=log)

    model_config = ModelConfig(adapter=adapter_config(settings), head=partner.HEAD, private_residual=settings.private_residual)
    model_dir = out / "model"
    save_domain_model(model_dir / own.split.name, kept, model_config)
    source = {"state_dir": str(state_dir.resolve()), "run_id": meta.get("run-id", ""), "round": int(meta.get("round", 0))}
    write_model_index(
        model_dir,
        mode="finetune",
        config=model_config,
        encoder=partner.encoder(),
        domains=[own.split.name],
        data=[data],
        members=len(kept),
        federated=source,
    )
    return {
        "domain": own.split.name,
        "valid_users": n_valid,
        "federated": before,
        "fine-tuned": after,
        "mode": chosen,
        "modes": {m: r[1] for m, r in tried.items()},
        "seeds": [{"seed": seed, **metrics} for seed, _, metrics in members],
        "ensemble": ensemble,
        "kept": kept_label,
        "from": source,
    }


def _train_mode(
    mode: str,
    *,
    settings: FederationSettings,
    own: partner.PartnerData,
    arrays: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor] | None,
    config: TrainConfig,
    log: Callable[[str], None],
) -> DomainRun:
    """One fine-tune of the federated model (see :func:`finetune`); counts are exact: this model is never sent."""
    if mode == "continue":
        counts = user_weighted_counts(own.split.train, n_items=own.split.n_items, window=settings.popularity_window)
        model = partner.build_model(settings, own, adapter_arrays=arrays, head=head, counts=torch.as_tensor(counts))
        freeze_untrained(model, "adapter")
        config = dataclasses.replace(config, loss="sampled")  # the leave-one-out counts need it
    else:
        exact = torch.as_tensor(own.split.item_popularity())
        model = partner.build_model(settings, own, adapter_arrays=arrays, head=head, counts=exact, leave_one_out=False)
    run = DomainRun(own.split, model)
    seed_everything(config.seed)  # dropout and batches: a fine-tune is reproducible from --seed
    train([run], config, log=log)
    return run
