"""A partner's side of a round: who it is, its data, its model, training and evaluation.

Plain functions of plain values (state dicts, dicts of settings), so that the
ClientApp stays a thin Message in / Message out layer and tests call these
directly. What never leaves the partner (its head, optimizer state, accountant
and privacy ledger) lives in its private state folder (:mod:`client.private_state`,
and in Flower's ``Context.state`` between rounds of one process); what a round may
spend is decided before it trains (:mod:`client.round_privacy`). Only the
adapter's arrays and the declared metrics are returned for sending.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from client.local_training import freeze_untrained, train_round, user_sequences
from client.private_state import PRIOR_SCALE, PartnerState, check_same_run, keep_global_adapter, read_kept_adapter
from client.round_privacy import Declined, ledger_entry, ledger_events, plan_round, round_schedule
from shared.checks import number_from_env
from shared.data.split import DomainSplit
from shared.device import training_device
from shared.encoder import TextEncoder, hash_tensors
from shared.federation import wire
from shared.federation.adapter import adapter_config
from shared.federation.scenario import SIMULATION_NODE_CONFIG, PartnerSpec, partner_from_node_config, scenario_partners
from shared.federation.settings import PARTNER_HEAD_HEADS, FederationSettings
from shared.model.adapters import MoEAdapter, adapter_state, load_adapter_weights
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.pipeline import prepare_domain
from shared.privacy import ledger
from shared.privacy.accounting import PartnerAccountant
from shared.training import DomainRun, calibrate_prior, ranking_metrics
from shared.vector_cache import VectorCache

# --------------------------------------------------------------------------- who am I


def resolve_partner(node_config: dict[str, Any], settings: FederationSettings) -> PartnerSpec:
    """Deployment: node config ``data-path`` and the optional keys of ``NODE_CONFIG`` (checked:
    a mistyped ``max-epsilon`` must not silently leave a partner uncapped).
    Simulation: partner ``partition-id`` of the run's scenario."""
    if "data-path" in node_config:
        return partner_from_node_config({k: v for k, v in node_config.items() if k not in SIMULATION_NODE_CONFIG})
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'data-path' (a deployed partner) or 'partition-id' (a simulated one)")
    pid, n = int(node_config["partition-id"]), int(node_config.get("num-partitions", 3))
    partners = scenario_partners(settings.scenario, root=Path(settings.runs_dir) / "_data", n_partners=n, seed=settings.seed)
    if pid >= len(partners):
        raise ValueError(
            f"simulated partner {pid} has no entry: scenario {settings.scenario!r} has {len(partners)} partners; run with num-supernodes={len(partners)}"
        )
    return partners[pid]


def on_own_device(settings: FederationSettings, spec: PartnerSpec) -> FederationSettings:
    """The run's settings with a deployed partner's own device (node config ``device``), if it chose one."""
    return dataclasses.replace(settings, device=spec.device) if spec.device else settings


# --------------------------------------------------------------------------- data (cached per process)


@dataclass
class PartnerData:
    split: DomainSplit
    vectors: torch.Tensor  # [N + 1, d_enc], row 0 = padding
    examples: Any  # TensorDataset of users' sequences
    fingerprint: str

    @cached_property
    def nbytes(self) -> int:
        """About the memory this holds: its tensors and arrays, and its texts and their objects (~100 bytes each)."""
        split = self.split
        arrays = sum(a.nbytes for a in split.train) + split.valid.nbytes + split.test.nbytes
        texts = sum(len(t) for t in split.item_texts) + sum(len(i) for i in split.item_ids) + sum(len(u) for u in split.users)
        objects = 100 * (len(split.train) + 2 * len(split.item_ids) + len(split.users))
        return self.vectors.nbytes + sum(t.nbytes for t in self.examples.tensors) + arrays + texts + objects


_ENCODER: TextEncoder | None = None
# Each process keeps the partners' prepared data it served, up to a memory budget, least recently used out first:
# in a simulation, Ray's few actors serve every partner in turn, so without a bound each would end up holding them all
# (about 40 MB for a full-size amazon2014 domain; preparing it again from the encoder's cache takes seconds).
_DATA: OrderedDict[tuple[str, int | None, str | None], PartnerData] = OrderedDict()
DATA_BUDGET_ENV = "FEDXREC_PARTNER_DATA_MB"
DATA_BUDGET_MB = 1024


def encoder() -> TextEncoder:
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = TextEncoder()
    return _ENCODER


def partner_data(spec: PartnerSpec, *, max_len: int, device: str | torch.device = "cpu") -> PartnerData:
    """The partner's split, item vectors and training sequences, prepared once and kept while the
    process's budget allows (``$FEDXREC_PARTNER_DATA_MB``, default 1024; the partner in use is always kept).
    Texts missing from the vector cache are encoded on ``device`` (the partner's training device)."""
    key = (str(spec.data), spec.max_users, spec.data_format)
    if key in _DATA:
        _DATA.move_to_end(key)
        return _DATA[key]
    budget = data_budget()
    enc = encoder()
    enc.use(device)
    prepared = prepare_domain(spec.data, encoder=enc, cache=VectorCache(), progress=False, name=spec.name, format=spec.data_format)
    split = prepared.split.select_users(slice(spec.max_users)) if spec.max_users else prepared.split  # a cold-start partner
    _DATA[key] = PartnerData(split, torch.as_tensor(prepared.vectors), user_sequences(split, max_len=max_len), enc.fingerprint)
    while len(_DATA) > 1 and sum(d.nbytes for d in _DATA.values()) > budget:
        _DATA.popitem(last=False)
    return _DATA[key]


def data_budget() -> int:
    """Bytes of prepared partner data one process keeps: ``$FEDXREC_PARTNER_DATA_MB`` megabytes (default 1024)."""
    mb = number_from_env(DATA_BUDGET_ENV, expected="megabytes (0 keeps only the partner in use)")
    return int((DATA_BUDGET_MB if mb is None else mb) * (1 << 20))


# --------------------------------------------------------------------------- the model


HEAD = HeadConfig(n_layers=2, n_heads=PARTNER_HEAD_HEADS, max_len=50, dropout=0.2)


# The prior's weight starts at 0 (no prior until the partner's data says so) and
# learns faster than the rest (client.local_training.PRIOR_LR_SCALE): where it
# belongs differs by domain (with last-2 counts at noise 3, near 0.5 on both
# Scientific and office; with whole-history counts office's was near 0).
PRIOR_START = 0.0
PRIOR_KEYS = ("log_counts", "counts_noise")


def build_model(
    settings: FederationSettings,
    data: PartnerData,
    *,
    adapter_arrays: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor] | None,
    counts: torch.Tensor | None = None,
    counts_noise: float = 0.0,
    leave_one_out: bool = True,
) -> DomainModel:
    """The partner's model, on the run's device (``settings.device``): the server's adapter and the private ``head`` state.

    ``counts`` [N + 1] (released with ``counts_noise``, or exact with 0) give the
    popularity prior and replace counts stored in ``head``; without them the prior
    is the one stored in ``head``, if any."""
    adapter = checked_adapter(settings, data, adapter_arrays)
    stored = head is not None and PRIOR_KEYS[0] in head
    if counts is not None and head is not None:
        head = {k: v for k, v in head.items() if k not in PRIOR_KEYS}
    elif counts is None and stored:
        counts = torch.zeros(data.split.n_items + 1)  # the stored counts replace these below
    model = DomainModel(
        adapter=adapter,
        features=ItemFeatures(vectors=data.vectors),
        head_config=HEAD,
        item_counts=counts,
        popularity_start=PRIOR_START,
        counts_noise=counts_noise,
        leave_one_out=leave_one_out,  # the federation's counts are user-weighted (shared.privacy.item_counts)
        counts_window=settings.popularity_window,
        private_residual=settings.private_residual,
    )
    if head is not None:
        missing, unexpected = model.load_state_dict(head, strict=False)
        fresh = ("adapter.", "popularity.", *PRIOR_KEYS)  # sent by the server / new with the prior
        missing = [k for k in missing if not k.startswith(fresh)]
        if unexpected or missing:
            hint = "private-residual" if any(k.startswith("residual.") for k in [*missing, *unexpected]) else "the model settings"
            raise ValueError(
                f"the stored private head does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                f"it was trained with other settings ({hint})"
            )
    return model.to(training_device(settings.device))


def checked_adapter(settings: FederationSettings, data: PartnerData, arrays: dict[str, torch.Tensor]) -> MoEAdapter:
    """The adapter of ``arrays``, refused with every problem named unless they are this run's
    adapter (names, shapes, dtypes) with finite weights: the coordinator is not trusted that far."""
    adapter = MoEAdapter(int(data.vectors.shape[1]), adapter_config(settings))
    load_adapter_weights(adapter, arrays, source="the server's arrays")
    return adapter


def has_private_residual(head: dict[str, torch.Tensor] | None) -> bool:
    """Whether a stored private head holds a private residual (its run had ``private-residual`` on)."""
    return head is not None and "residual.weight" in head


# The global adapter's weights a partner tries with personal-mix = "valid", largest
# first: a tie keeps more of the federation.
GLOBAL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)


def personal_adapter(
    settings: FederationSettings, data: PartnerData, *, arrays: dict[str, torch.Tensor], state: PartnerState, folder: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter a partner starts its round from and is scored with, and the global adapter's weight in it.

    With ``personal-mix = "valid"``: ``own + w x (global - own)``, ``own`` the adapter the
    partner trained in its last round, ``w`` the one of :data:`GLOBAL_WEIGHTS` with the best
    validation NDCG@10 (adaptive local aggregation: Zhang et al., "FedALA", AAAI 2023, learn
    such weights per element; Deng et al., "APFL", 2020, mix a local and a global model). At
    ``w = 0`` the partner trains on as if alone. Otherwise (and before its first round) the
    global adapter as it came.

    The second item describes the mix (``global-weight``, its validation NDCG@10 and
    Recall@10, and what it was made from); it goes into the kept adapter's metadata
    (:func:`client.private_state.keep_global_adapter`), so that the evaluation reports those scores and the next
    round takes the mix its evaluation chose, instead of scoring it again."""
    own = state.own_adapter
    if settings.personal_mix == "off" or own is None:
        return arrays, {"global-weight": "1.0"}
    if own.keys() != arrays.keys() or any(own[k].shape != arrays[k].shape for k in arrays):
        raise ValueError("the partner's own adapter in its private state does not match the server's arrays (another adapter config?)")
    made_from = {"global-sha256": arrays_digest(arrays), "own-round": str(state.last_round), "run-id": settings.run_id}
    kept, meta = read_kept_adapter(folder)
    if kept is not None and all(meta.get(k) == v for k, v in made_from.items()):
        return kept, meta
    best: tuple[dict[str, float], float, dict[str, torch.Tensor]] | None = None
    for weight in GLOBAL_WEIGHTS:
        mixed = {k: own[k] + weight * (arrays[k] - own[k]) for k in arrays}
        valid = ranking_metrics(build_model(settings, data, adapter_arrays=mixed, head=state.head), data.split, "valid")
        if best is None or valid["ndcg@10"] > best[0]["ndcg@10"]:
            best = (valid, weight, mixed)
    assert best is not None
    # the chosen mix's validation metrics (repr: exact), so its evaluation need not score it again
    scores = {f"valid-{m}": repr(best[0][m]) for m in ("ndcg@10", "recall@10")}
    return best[2], {"global-weight": str(best[1]), **scores, **made_from}


def arrays_digest(arrays: dict[str, torch.Tensor]) -> str:
    """SHA-256 over an adapter's arrays (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    hash_tensors(digest, arrays)
    return digest.hexdigest()


# --------------------------------------------------------------------------- one round


@dataclass
class TrainReply:
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float]
    note: str
    ledger: str  # the partner's privacy ledger of the run, every line so far ("" if it has none: a run without DP)


def train(
    *,
    settings: FederationSettings,
    server_round: int,
    spec: PartnerSpec,
    arrays: dict[str, torch.Tensor],
    state: PartnerState,
    folder: Path,
) -> tuple[TrainReply, PartnerState]:
    """Local training from the global adapter; returns the reply and the new private state.

    A partner declines a round (replies with the adapter it received, unchanged, and
    a note saying why) that would take it over its budget: the run's
    (``min(target-epsilon, max-epsilon)``), or its privacy account's over all runs;
    a round at a delta above its ``max-delta`` (default 1 / its users); and, with
    a ``max-epsilon``, every round of a run without DP (the checks:
    :func:`client.round_privacy.plan_round`). Either way the round's line is appended
    to the partner's privacy ledger."""
    settings = on_own_device(settings, spec)
    check_same_run(state, settings, folder)
    device = training_device(settings.device)  # a partner without the GPU asked for fails here, before it plans or spends anything
    if settings.dp and state.trained_without_dp:
        raise ValueError(
            f"the private state in {folder} was trained without DP (round {state.last_round}); a DP round from it "
            "would see every user through its head and counts, so no guarantee would hold. Give this run a fresh "
            "state folder (node config state-dir, or a new run-id), or run it without dp"
        )
    data = partner_data(spec, max_len=HEAD.max_len, device=device)
    checked_adapter(settings, data, arrays)  # before anything is planned, reserved or spent
    schedule = round_schedule(settings, spec, n_users=len(data.examples))
    budget, sample_rate = schedule.budget, schedule.sample_rate
    accountant = PartnerAccountant(budget, state.accountant)
    ledger_path = folder / "ledger.jsonl"

    def decline(note: str, sigma: float = 0.0) -> tuple[TrainReply, PartnerState]:
        # The counts (if drawn) are dropped unused: nothing that depends on them leaves.
        spent = accountant.epsilon()
        metrics = as_sent(
            _train_metrics(0, 0.0, 0, spent, budget.delta, sigma, sample_rate, declined=True),
            spec=spec,
            folder=folder,
            server_round=server_round,
        )
        ledger.append(ledger_path, ledger_entry(spec, settings, budget, server_round, [], spent, 0, note))
        return TrainReply(arrays, metrics, note, _whole_ledger(ledger_path)), state

    privacy = plan_round(
        settings=settings,
        spec=spec,
        split=data.split,
        state=state,
        schedule=schedule,
        accountant=accountant,
        server_round=server_round,
    )
    if isinstance(privacy, Declined):
        return decline(privacy.note, privacy.noise_multiplier)

    start, _ = personal_adapter(settings, data, arrays=arrays, state=state, folder=folder)
    model = build_model(settings, data, adapter_arrays=start, head=state.head, counts=privacy.counts, counts_noise=privacy.counts_noise)
    freeze_untrained(model, settings.trains)
    outcome, optimizer_state = train_round(
        model,
        data.examples,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer_kind=settings.optimizer,
        negatives=settings.negatives,
        seed=settings.seed * 100_003 + server_round,
        dp=privacy.dp,
        optimizer_state=state.optimizer,
        proximal_mu=settings.proximal_mu,
    )
    examples = reported_examples(spec, settings, sampled=outcome.examples)
    if settings.dp:
        assert state.noise_multiplier is not None
        events = ledger_events(privacy.released, state.noise_multiplier, sample_rate, outcome.steps, settings.max_grad_norm)
        # The ledger line is written before the state: a crash in between leaves the
        # ledger ahead of the state (it overstates, never understates, what was spent).
        ledger.append(
            ledger_path,
            ledger_entry(spec, settings, budget, server_round, events, accountant.epsilon(), examples, privacy.note),
        )
    new_state = PartnerState(
        model.private_state(),
        optimizer_state,
        accountant.state_dict(),
        state.noise_multiplier,
        server_round,
        settings.run_id,
        trained_without_dp=state.trained_without_dp or not settings.dp,
        own_adapter=adapter_state(model.adapter) if settings.personal_mix != "off" else None,
    )
    new_state.save(folder)
    metrics = _train_metrics(
        examples,
        outcome.loss,
        outcome.steps,
        accountant.epsilon() if settings.dp else wire.NO_DP,
        budget.delta if settings.dp else wire.NO_DP,
        state.noise_multiplier or 0.0,
        sample_rate,
    )
    metrics = as_sent(metrics, spec=spec, folder=folder, server_round=server_round)
    return TrainReply(adapter_state(model.adapter), metrics, "", _whole_ledger(ledger_path)), new_state


def reported_examples(spec: PartnerSpec, settings: FederationSettings, *, sampled: int) -> int:
    """The users a round trained on, as the partner reports them (FedAvg's weight, the ledger's
    ``examples``): those its steps sampled, or, with ``public-users``, the declared count x the
    local epochs (what it samples on average if that is its real count), which nothing of its
    data moves."""
    return spec.public_users * settings.local_epochs if spec.public_users else sampled


def _whole_ledger(path: Path) -> str:
    """What a training reply sends of the partner's ledger: every line so far, so the run's copy can catch up."""
    return path.read_text(encoding="utf-8") if path.is_file() else ""


OWN_METRICS = "own-metrics.jsonl"  # a withholding partner's statistics, in its state folder


def as_sent(metrics: dict[str, float], *, spec: PartnerSpec, folder: Path, server_round: int) -> dict[str, float]:
    """The metrics as the partner sends them. With node config ``withhold-metrics``, each statistic it
    computed without noise on its users (:data:`wire.WITHHELD_METRICS`) goes as :data:`wire.WITHHELD`,
    and the figures are appended to ``own-metrics.jsonl`` in its state folder instead."""
    if not spec.withhold_metrics:
        return metrics
    kept = {name: value for name, value in metrics.items() if name in wire.WITHHELD_METRICS}
    folder.mkdir(parents=True, exist_ok=True)  # a run's first round may be declined before anything else is written
    with (folder / OWN_METRICS).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"round": server_round, **kept}) + "\n")
    return {name: wire.WITHHELD if name in wire.WITHHELD_METRICS else value for name, value in metrics.items()}


def _train_metrics(
    examples: int, loss: float, steps: int, epsilon: float, delta: float, noise: float, rate: float, *, declined: bool = False
) -> dict[str, float]:
    return {
        "num-examples": int(examples),
        "loss": float(loss),
        "steps": int(steps),
        "epsilon": float(epsilon),
        "delta": float(delta),
        "noise-multiplier": float(noise),
        "sample-rate": float(rate),
        "declined": int(declined),
    }


def evaluate_global(
    *,
    settings: FederationSettings,
    server_round: int,
    spec: PartnerSpec,
    arrays: dict[str, torch.Tensor],
    state: PartnerState,
    folder: Path,
) -> dict[str, float]:
    """Valid and test NDCG@10 / Recall@10 of the global adapter (with ``personal-mix``, the
    partner's mix of it: :func:`personal_adapter`) with the private head (with
    ``calibrate-prior``, its prior's weight scaled: :func:`shared.training.calibrate_prior`),
    and the global adapter's weight in it.

    The adapter is also kept in the state folder (:func:`client.private_state.keep_global_adapter`)."""
    settings = on_own_device(settings, spec)
    check_same_run(state, settings, folder)
    data = partner_data(spec, max_len=HEAD.max_len, device=training_device(settings.device))
    checked_adapter(settings, data, arrays)  # before it is kept
    adapter, mix = personal_adapter(settings, data, arrays=arrays, state=state, folder=folder)
    model = build_model(settings, data, adapter_arrays=adapter, head=state.head)
    if settings.calibrate_prior:  # scoring only: the state's head, which the next round trains, keeps its weight
        factor, _ = calibrate_prior(DomainRun(data.split, model))
        # a mix's scores were of the weight as trained
        mix = {**{k: v for k, v in mix.items() if not k.startswith(("valid-", "test-"))}, PRIOR_SCALE: repr(factor)}
    keep_global_adapter(folder, adapter, settings=settings, server_round=server_round, split=data.split, mix=mix)
    users = spec.public_users or len(data.split.eval_users("test"))  # the average's weight
    out: dict[str, float] = {"num-examples": users, "global-weight": float(mix["global-weight"])}
    for which in ("valid", "test"):
        names = (f"{which}-ndcg@10", f"{which}-recall@10")
        if all(n in mix for n in names):  # scored while choosing the mix
            out.update({n: float(mix[n]) for n in names})
            continue
        m = ranking_metrics(model, data.split, which)
        out[names[0]], out[names[1]] = m["ndcg@10"], m["recall@10"]
    return as_sent(out, spec=spec, folder=folder, server_round=server_round)
