"""A partner's private state folder: what never leaves the partner, kept between rounds and restarts.

The folder holds this run's private head, optimizer state and accountant
(``state.pt``, :class:`PartnerState`), its privacy ledger (``ledger.jsonl``,
written by :func:`client.partner.train`) and the adapter of its model after the
last evaluated round (``global-adapter.safetensors``), the start of a local
fine-tune after the federation (:mod:`client.finetune`). The state and the
adapter are replaced atomically, so a crash leaves the previous ones; the ledger
is only ever appended to (:mod:`shared.privacy.ledger`).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.data.split import DomainSplit
from shared.federation.adapter import adapter_config
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings


def state_dir(node_config: dict[str, Any], settings: FederationSettings, spec: PartnerSpec) -> Path:
    """This run's private state folder: ``<state-dir>/runs/<run-id>`` for a deployed partner
    (one SuperNode serves run after run; the run id is checked to be a plain name), and
    ``<runs-dir>/<run-id>/partners/<name>`` in simulation."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])) / "runs" / settings.run_id
    return Path(settings.runs_dir) / settings.run_id / "partners" / spec.name


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
        if not path.is_file():
            return cls()
        try:
            return cls.from_bytes(path.read_bytes())
        except Exception as err:  # a damaged file: torch.load raises one of many kinds
            raise ValueError(
                f"{path}: this partner's private state cannot be read ({type(err).__name__}: {err}). It holds the run's "
                "accountant (what this run has spent), private head and optimizer, so the run cannot go on without it: "
                "restore the file from a backup, or join a new run (another run-id); what was spent stays on record in "
                "ledger.jsonl beside it and in the partner's privacy account, if it keeps one"
            ) from err


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


# --------------------------------------------------------------------------- the kept adapter


GLOBAL_ADAPTER = "global-adapter.safetensors"
# The kept adapter's metadata key for the factor on the prior's weight the partner was scored
# with (run setting calibrate-prior); absent: the weight as trained.
PRIOR_SCALE = "prior-scale"


def scored_head(head: dict[str, torch.Tensor] | None, meta: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The private ``head`` as the partner was scored with it: the popularity prior's weight
    times the kept adapter's ``prior-scale`` (``meta``), if any."""
    if head is None or PRIOR_SCALE not in meta or "popularity.weight" not in head:
        return head
    return {**head, "popularity.weight": head["popularity.weight"] * float(meta[PRIOR_SCALE])}


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
    which ``mix`` describes: :func:`personal_adapter`; with ``calibrate-prior``, ``mix`` also
    holds the factor on the prior's weight, :func:`scored_head`); the metadata also names the run, the round,
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
