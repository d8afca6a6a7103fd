"""A partner's side of a round: its data, its private state, training and evaluation.

Plain functions of plain values (state dicts, dicts of settings), so that the
ClientApp stays a thin Message in / Message out layer and tests call these
directly. Everything private stays here: the head, the optimizer state and the
privacy ledger live in the partner's state folder (and in Flower's
``Context.state`` between rounds of one process); only the adapter's arrays and
the declared metrics are returned for sending.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from client.local_training import DPPlan, freeze_untrained, poisson_schedule, train_round, user_sequences
from shared.data.split import DomainSplit
from shared.encoder import TextEncoder, hash_tensors
from shared.federation.adapter import adapter_config
from shared.federation.scenario import SIMULATION_NODE_CONFIG, PartnerSpec, partner_from_node_config, scenario_partners
from shared.federation.settings import FederationSettings
from shared.model.adapters import MoEAdapter, adapter_state, load_adapter_weights
from shared.model.head import HeadConfig
from shared.model.recommender import DomainModel, ItemFeatures
from shared.pipeline import prepare_domain
from shared.privacy import account, ledger
from shared.privacy.accounting import Budget, Event, PartnerAccountant, calibrate_noise, partner_budget, release_fits
from shared.privacy.item_counts import release_item_counts, user_weighted_counts
from shared.training import ranking_metrics
from shared.vector_cache import VectorCache

NO_DP = -1.0  # epsilon and delta reported when DP is off


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


def state_dir(node_config: dict[str, Any], settings: FederationSettings, spec: PartnerSpec) -> Path:
    """This run's private state folder: ``<state-dir>/runs/<run-id>`` for a deployed partner
    (one SuperNode serves run after run; the run id is checked to be a plain name), and
    ``<runs-dir>/<run-id>/partners/<name>`` in simulation."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])) / "runs" / settings.run_id
    return Path(settings.runs_dir) / settings.run_id / "partners" / spec.name


# --------------------------------------------------------------------------- data (cached per process)


@dataclass
class PartnerData:
    split: DomainSplit
    vectors: torch.Tensor  # [N + 1, d_enc], row 0 = padding
    examples: Any  # TensorDataset of users' sequences
    fingerprint: str


_ENCODER: TextEncoder | None = None
_DATA: dict[tuple[str, int | None, str | None], PartnerData] = {}


def encoder() -> TextEncoder:
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = TextEncoder()
    return _ENCODER


def partner_data(spec: PartnerSpec, *, max_len: int) -> PartnerData:
    key = (str(spec.data), spec.max_users, spec.data_format)
    if key not in _DATA:
        enc = encoder()
        prepared = prepare_domain(spec.data, encoder=enc, cache=VectorCache(), progress=False, name=spec.name, format=spec.data_format)
        split = prepared.split.select_users(slice(spec.max_users)) if spec.max_users else prepared.split  # a cold-start partner
        _DATA[key] = PartnerData(split, torch.as_tensor(prepared.vectors), user_sequences(split, max_len=max_len), enc.fingerprint)
    return _DATA[key]


# --------------------------------------------------------------------------- private state


@dataclass
class PartnerState:
    """What never leaves the partner. Saved after every round it takes part in."""

    head: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    accountant: dict[str, Any] = field(default_factory=lambda: {"history": []})
    noise_multiplier: float | None = None
    last_round: int = 0
    # The run this state belongs to: its ledger's rounds, its accountant and its
    # noise multiplier are that run's plan ("" in a state saved before any round).
    run_id: str = ""
    # Set by any round trained without DP: its head (and counts) then depend on every
    # user, and DP rounds from this state would see them all through it.
    trained_without_dp: bool = False
    # With personal-mix: the adapter this partner trained in its last round (the one it
    # sent), the "own" side of its mix with the next global adapter.
    own_adapter: dict[str, torch.Tensor] | None = None

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.__dict__, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> PartnerState:
        return cls(**torch.load(io.BytesIO(blob), weights_only=False))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".state.pt.{os.getpid()}"
        tmp.write_bytes(self.to_bytes())
        tmp.replace(folder / "state.pt")  # atomic: a crash leaves the previous state

    @classmethod
    def load(cls, folder: Path) -> PartnerState:
        path = folder / "state.pt"
        return cls.from_bytes(path.read_bytes()) if path.is_file() else cls()


def check_same_run(state: PartnerState, settings: FederationSettings, folder: Path) -> None:
    """A state folder holds one run: its ledger counts that run's rounds, its noise fits that run's plan."""
    if state.run_id and state.run_id != settings.run_id:
        raise ValueError(
            f"the private state in {folder} belongs to run {state.run_id!r} (its privacy ledger, accountant and head); "
            f"this is run {settings.run_id!r}, whose rounds would break that ledger's chain and whose plan its noise "
            f"multiplier was not calibrated for. Keep each run's state in its own folder (a deployed partner's "
            f"state-dir does: runs/<run-id>), or resume run {state.run_id!r} (run-id)"
        )


def newest_state(in_memory: bytes | None, folder: Path) -> PartnerState:
    """Context.state within a process, the state folder after a restart: whichever is newer."""
    on_disk = PartnerState.load(folder)
    if in_memory is None:
        return on_disk
    memory = PartnerState.from_bytes(in_memory)
    return memory if memory.last_round >= on_disk.last_round else on_disk


# --------------------------------------------------------------------------- the model


HEAD = HeadConfig(n_layers=2, n_heads=2, max_len=50, dropout=0.2)


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
    """The partner's model: the server's adapter and the private ``head`` state.

    ``counts`` [N + 1] (released with ``counts_noise``, or exact with 0) give the
    popularity prior and replace counts stored in ``head``; without them the prior
    is the one stored in ``head``, if any."""
    adapter = MoEAdapter(int(data.vectors.shape[1]), adapter_config(settings))
    load_adapter_weights(adapter, adapter_arrays, source="the server's arrays")
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
    return model


def has_private_residual(head: dict[str, torch.Tensor] | None) -> bool:
    """Whether a stored private head holds a private residual (its run had ``private-residual`` on)."""
    return head is not None and "residual.weight" in head


def prior_counts(
    settings: FederationSettings, data: PartnerData, budget: Budget, *, lifetime: Lifetime | None = None
) -> tuple[torch.Tensor | None, float, list[Event], str]:
    """The popularity prior's counts for a partner's first round: (counts, noise, events, note).

    Without DP: exact training counts. Under DP: a user-level DP release, paid from
    the partner's budget (``events``), unless it would take more than half of it
    (or of what its privacy account has left, with a ``lifetime`` cap)."""
    if not settings.popularity_prior:
        return None, 0.0, [], ""
    if not settings.dp:  # exact, counted as the DP release counts them
        exact = user_weighted_counts(data.split.train, n_items=data.split.n_items, window=settings.popularity_window)
        return torch.as_tensor(exact), 0.0, [], ""
    sigma = settings.popularity_noise
    if not release_fits(budget=budget, counts_noise=sigma):
        note = f"no popularity prior: releasing item counts at noise {sigma:g} would take over half of epsilon {budget.epsilon:g}"
        return None, 0.0, [], note
    if lifetime is not None and not release_fits(budget=lifetime.budget, counts_noise=sigma, spent=lifetime.spent):
        note = f"no popularity prior: releasing item counts at noise {sigma:g} would take over half of what is left of this partner's lifetime epsilon {lifetime.budget.epsilon:g}"
        return None, 0.0, [], note
    # Fresh OS entropy, not the run's seed: the coordinator knows the seed.
    counts, event = release_item_counts(
        data.split.train,
        n_items=data.split.n_items,
        window=settings.popularity_window,
        noise_multiplier=sigma,
        rng=np.random.default_rng(),
    )
    return torch.as_tensor(counts), sigma, [event], ""


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
    (:func:`keep_global_adapter`), so that the evaluation reports those scores and the next
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


def head_state(model: DomainModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("adapter.")}


# --------------------------------------------------------------------------- one round


@dataclass
class TrainReply:
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float]
    note: str
    ledger_line: str  # this round's line of the partner's privacy ledger ("" without DP)


# A run whose rounds the privacy account could fund only at over twice the run's own
# noise is declined: its adapter updates would be mostly noise, spending what is left
# of the partner's budget on making the federation's average worse.
MAX_NOISE_RAISE = 2.0


@dataclass(frozen=True)
class Lifetime:
    """A capped partner's privacy account: its cap over all runs (at the account's delta
    and accountant) and the events every run has reserved so far."""

    budget: Budget
    spent: list[Event]
    runs: int

    def noise_for(self, *, sample_rate: float, steps: int, first: list[Event]) -> float:
        """The noise multiplier that fits ``steps`` steps (after the ``first`` events) into what is left; inf if nothing is."""
        try:
            return calibrate_noise(budget=self.budget, sample_rate=sample_rate, steps=steps, spent=[*self.spent, *first])
        except ValueError:
            return math.inf


def lifetime_of(spec: PartnerSpec, budget: Budget) -> Lifetime | None:
    if spec.account is None or spec.max_epsilon is None:
        return None
    entries = account.read(spec.account)
    delta, kind = account.terms(entries, delta=budget.delta, accountant=budget.accountant)
    return Lifetime(Budget(spec.max_epsilon, delta, kind), account.events_of(entries), len({x["run"] for x in entries}))


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
    a ``max-epsilon``, every round of a run without DP."""
    check_same_run(state, settings, folder)
    if settings.dp and state.trained_without_dp:
        raise ValueError(
            f"the private state in {folder} was trained without DP (round {state.last_round}); a DP round from it "
            "would see every user through its head and counts, so no guarantee would hold. Give this run a fresh "
            "state folder (node config state-dir, or a new run-id), or run it without dp"
        )
    data = partner_data(spec, max_len=HEAD.max_len)
    n_users = len(data.examples)
    sample_rate, per_epoch = poisson_schedule(n_users, settings.batch_size)
    steps = settings.local_epochs * per_epoch
    budget = partner_budget(
        server_epsilon=settings.target_epsilon,
        partner_cap=spec.max_epsilon,
        delta=settings.delta,
        n_users=n_users,
        accountant=settings.accountant,
    )
    accountant = PartnerAccountant(budget, state.accountant)
    ledger_path = folder / "ledger.jsonl"

    def decline(note: str, sigma: float = 0.0) -> tuple[TrainReply, PartnerState]:
        # The counts (if drawn) are dropped unused: nothing that depends on them leaves.
        spent = accountant.epsilon()
        metrics = _train_metrics(0, 0.0, 0, spent, budget.delta, sigma, sample_rate, declined=True)
        line = ledger.append(ledger_path, _ledger_entry(spec, settings, budget, server_round, [], spent, 0, note))
        return TrainReply(arrays, metrics, note, line), state

    max_delta = spec.max_delta if spec.max_delta is not None else 1.0 / n_users
    if settings.dp and budget.delta > max_delta:
        return decline(
            f"declined round {server_round}: this run's delta {budget.delta:.3g} is above this partner's max-delta "
            f"{max_delta:.3g} (at a delta near 1 / users, a mechanism may reveal about one user in the clear)"
        )
    if not settings.dp and spec.max_epsilon is not None:
        return decline(
            f"declined round {server_round}: this run trains without DP (dp = false), which no epsilon bounds; "
            f"this partner caps its epsilon at {spec.max_epsilon:g}"
        )
    # what the account has left matters where a run plans: its count release and its noise
    planning = settings.dp and (state.head is None or state.noise_multiplier is None)
    lifetime = lifetime_of(spec, budget) if planning else None
    counts: torch.Tensor | None = None
    counts_noise, released, note = 0.0, list[Event](), ""
    if state.head is None:  # the first round: the prior's counts (a DP release under DP)
        counts, counts_noise, released, note = prior_counts(settings, data, budget, lifetime=lifetime)
    plan: DPPlan | None = None
    if settings.dp:
        if state.noise_multiplier is None:  # calibrated once, for every planned round
            state.noise_multiplier = calibrate_noise(
                budget=budget, sample_rate=sample_rate, steps=settings.rounds * steps, spent=[*accountant.events, *released]
            )
            if lifetime is not None:  # and no lower than what the account has left allows
                left = f"this partner's lifetime epsilon {lifetime.budget.epsilon:g} over {lifetime.runs + 1} run(s)"
                needed = lifetime.noise_for(sample_rate=sample_rate, steps=settings.rounds * steps, first=released)
                if needed > MAX_NOISE_RAISE * state.noise_multiplier:
                    run_sigma, state.noise_multiplier = state.noise_multiplier, None
                    return decline(
                        f"declined round {server_round}: too little is left of {left} (it would take noise multiplier "
                        f"{needed:.3g}, over {MAX_NOISE_RAISE:g} x this run's {run_sigma:.3f})"
                    )
                if needed > state.noise_multiplier:
                    note = "; ".join(
                        [*filter(None, [note]), f"noise multiplier {needed:.4f}, not {state.noise_multiplier:.4f}: what is left of {left}"]
                    )
                    state.noise_multiplier = needed
        sigma = state.noise_multiplier
        if not accountant.can_afford(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, first=released):
            after = accountant.epsilon_after(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, first=released)
            return decline(
                f"declined round {server_round}: epsilon would reach {after:.3f}, above this partner's budget "
                f"{budget.epsilon:g} (spent {accountant.epsilon():.3f})",
                sigma,
            )
        if spec.account is not None:  # reserved before training, under the account's lock
            got = account.reserve(
                spec.account,
                run=settings.run_id,
                server_round=server_round,
                events=_events(released, sigma, sample_rate, steps, settings.max_grad_norm),
                cap=spec.max_epsilon,
                delta=budget.delta,
                accountant=budget.accountant,
            )
            if not got.granted:
                return decline(
                    f"declined round {server_round}: this partner's lifetime epsilon over {got.runs} run(s) would reach "
                    f"{got.after:.3f}, above its cap {spec.max_epsilon:g} (spent {got.before:.3f})",
                    sigma,
                )
        for event in released:
            accountant.record(event)
        plan = DPPlan(sigma, settings.max_grad_norm, accountant)

    start, _ = personal_adapter(settings, data, arrays=arrays, state=state, folder=folder)
    model = build_model(settings, data, adapter_arrays=start, head=state.head, counts=counts, counts_noise=counts_noise)
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
        dp=plan,
        optimizer_state=state.optimizer,
        proximal_mu=settings.proximal_mu,
    )
    line = ""
    if settings.dp:
        assert state.noise_multiplier is not None
        events = _events(released, state.noise_multiplier, sample_rate, outcome.steps, settings.max_grad_norm)
        # The ledger line is written before the state: a crash in between leaves the
        # ledger ahead of the state (it overstates, never understates, what was spent).
        line = ledger.append(
            ledger_path,
            _ledger_entry(spec, settings, budget, server_round, events, accountant.epsilon(), outcome.examples, note),
        )
    new_state = PartnerState(
        head_state(model),
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
        outcome.examples,
        outcome.loss,
        outcome.steps,
        accountant.epsilon() if settings.dp else NO_DP,
        budget.delta if settings.dp else NO_DP,
        state.noise_multiplier or 0.0,
        sample_rate,
    )
    return TrainReply(adapter_state(model.adapter), metrics, "", line), new_state


def _events(released: list[Event], sigma: float, sample_rate: float, steps: int, max_grad_norm: float) -> list[dict[str, Any]]:
    """A round's releases as ledger events: the item counts (if any), then the DP-SGD steps."""
    counts = [
        {"mechanism": "item counts", "noise_multiplier": s, "sample_rate": q, "steps": n, "max_grad_norm": 1.0} for s, q, n in released
    ]
    return [
        *counts,
        {"mechanism": "dp-sgd", "noise_multiplier": sigma, "sample_rate": sample_rate, "steps": steps, "max_grad_norm": max_grad_norm},
    ]


def _ledger_entry(
    spec: PartnerSpec,
    settings: FederationSettings,
    budget: Budget,
    server_round: int,
    events: list[dict[str, Any]],
    epsilon: float,
    examples: int,
    note: str,
) -> dict[str, Any]:
    return ledger.make_entry(
        round=server_round,
        partner=spec.name,
        status="trained" if events else "declined",
        accountant=budget.accountant,
        delta=budget.delta,
        budget_epsilon=budget.epsilon,
        events=events,
        epsilon=epsilon,
        examples=examples,
        note=note,
    )


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


GLOBAL_ADAPTER = "global-adapter.safetensors"


def catalogue_fingerprint(split: DomainSplit) -> str:
    """SHA-256 of the items (id and text) in index order: the private head's counts are indexed by it."""
    digest = hashlib.sha256()
    for item, text in zip(split.item_ids, split.item_texts, strict=True):
        digest.update(f"{item}\t{text}\n".encode())
    return digest.hexdigest()


def keep_global_adapter(
    folder: Path,
    arrays: dict[str, torch.Tensor],
    *,
    settings: FederationSettings,
    server_round: int,
    split: DomainSplit,
    mix: dict[str, str],
) -> None:
    """Keeps the adapter of the partner's model after ``server_round`` in the state folder,
    as the start of a local fine-tune after the federation (``fedxrec finetune``).

    It is the one the coordinator sent (with ``personal-mix``, the partner's mix of it,
    which ``mix`` describes: :func:`personal_adapter`); the metadata also names the run, the round,
    the adapter's config and the catalogue the partner's private head belongs to (it
    never leaves the state folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "run-id": settings.run_id,
        "round": str(server_round),
        "domain": split.name,
        "items": str(split.n_items),
        "catalogue": catalogue_fingerprint(split),
        **mix,
        **{k: str(v) for k, v in asdict(adapter_config(settings)).items()},
    }
    tmp = folder / f".{GLOBAL_ADAPTER}.{os.getpid()}"
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp), metadata=meta)
    tmp.replace(folder / GLOBAL_ADAPTER)  # atomic, as the state


def read_kept_adapter(folder: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
    """The adapter :func:`keep_global_adapter` kept in ``folder``, and its metadata; (None, {}) if there is none."""
    path = folder / GLOBAL_ADAPTER
    if not path.is_file():
        return None, {}
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118 (safe_open is not a dict)


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
    partner's mix of it: :func:`personal_adapter`) with the private head, and the global
    adapter's weight in it.

    The adapter is also kept in the state folder (:func:`keep_global_adapter`)."""
    check_same_run(state, settings, folder)
    data = partner_data(spec, max_len=HEAD.max_len)
    adapter, mix = personal_adapter(settings, data, arrays=arrays, state=state, folder=folder)
    keep_global_adapter(folder, adapter, settings=settings, server_round=server_round, split=data.split, mix=mix)
    model = build_model(settings, data, adapter_arrays=adapter, head=state.head)
    out: dict[str, float] = {"num-examples": len(data.split.eval_users("test")), "global-weight": float(mix["global-weight"])}
    for which in ("valid", "test"):
        names = (f"{which}-ndcg@10", f"{which}-recall@10")
        if all(n in mix for n in names):  # scored while choosing the mix
            out.update({n: float(mix[n]) for n in names})
            continue
        m = ranking_metrics(model, data.split, which)
        out[names[0]], out[names[1]] = m["ndcg@10"], m["recall@10"]
    return out
