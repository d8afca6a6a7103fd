"""A partner's privacy account: what its users' data has spent over every run.

A run's ledger (:mod:`shared.privacy.ledger`) and its accountant cover one run:
a state folder holds one run, and a partner's ``max-epsilon`` binds within it.
But DP guarantees compose across runs on the same data, and a coordinator can
always start another run. A partner that names an account (node config
``privacy-account``, a file kept across runs) makes its ``max-epsilon`` a cap
over its data's whole lifetime: every run reserves each round's releases in the
account *before* training, under a file lock, and a round that would take the
composed epsilon of all runs over the cap is declined. Two runs at once cannot
both take the last of the budget.

One JSON line per reservation, hash-chained like the ledger::

    {"seq": 3, "run": "run-b", "round": 1, "accountant": "rdp", "order": 2.6, "delta": 1e-05, "cap": 8.0,
     "events": [{"mechanism": "dp-sgd", "noise_multiplier": 0.9, "sample_rate": 0.02, "steps": 50, "max_grad_norm": 1.0}],
     "epsilon": 6.1, "time": "...", "prev": "<sha256 of line 2>"}

``epsilon`` is the lifetime figure after the line: every event of every run so
far, composed by RDP at one Rényi ``order`` and one delta. The account's first
line fixes both (a later run with another delta is counted at the account's; the
events themselves do not depend on delta). The order is fixed because runs are
chosen one after another (a coordinator picks a run's settings after seeing the
runs before, and a new run's noise depends on what the account has left): such a
sequence composes as RDP at an order fixed in advance (Feldman & Zrnic, NeurIPS
2021, a Rényi filter), not at the best order for what was spent, nor by PRV. The
first line's order is the best one for the first run's whole plan, so that run
is counted exactly as its own accountant counts it. An account written before
orders were fixed has no ``order`` field; it keeps its first line's accountant
and best order, and says so (:func:`summary`). A reservation is never taken
back: a round reserved and then lost to a crash still counts, so the account may
overstate what was released, never understate it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.checks import is_finite_number
from shared.privacy import ledger
from shared.privacy.accounting import Event, best_order, epsilon_of
from shared.privacy.ledger import GENESIS, line_hash

FIELDS = ("seq", "run", "round", "accountant", "order", "delta", "cap", "events", "epsilon", "time", "prev")
UNORDERED_FIELDS = tuple(f for f in FIELDS if f != "order")  # an account written before orders were fixed
ACCOUNT_RULES: tuple[ledger.Rule, ...] = (
    *ledger.line_rules("round", "accountant", "delta", "epsilon", "time"),
    ("run", lambda v: isinstance(v, str), "the run's id (text)"),
    ("cap", lambda v: v is None or (is_finite_number(v) and v > 0), "null (no cap) or a finite number above 0"),
)
ORDER_RULES: tuple[ledger.Rule, ...] = (
    ("accountant", lambda v: v == "rdp", "'rdp' (an account counts by RDP at its order)"),
    ("order", lambda v: is_finite_number(v) and v > 1, "a Rényi order, a finite number above 1"),
)


def _line_problems(entry: dict[str, Any]) -> list[str]:
    """Everything wrong with one account line's fields (its place in the chain is checked beside)."""
    rules = (*ACCOUNT_RULES, *ORDER_RULES) if "order" in entry else ACCOUNT_RULES
    return ledger.rule_problems(entry, rules) + ledger.event_problems(entry["events"])


class AccountError(ValueError):
    """The account file is unreadable or its chain is broken (names the file and line)."""


@dataclass(frozen=True)
class Reservation:
    granted: bool
    before: float  # lifetime epsilon before this round
    after: float  # lifetime epsilon with this round's events (granted or not)
    cap: float | None
    runs: int  # distinct runs in the account, this one included


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []


def read(path: Path) -> list[dict[str, Any]]:
    """The account's lines, checked: fields, numbering and hash chain (``AccountError`` names the first bad line)."""
    return _checked(path, _lines(path))


def _checked(path: Path, lines: list[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    prev = GENESIS
    for n, line in enumerate(lines, start=1):
        where = f"{path}, line {n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise AccountError(f"{where}: not a JSON object ({err.msg}); was the file edited by hand?") from err
        # the first line may have either form; every later line has the first's
        forms = [FIELDS, UNORDERED_FIELDS] if not entries else [FIELDS if "order" in entries[0] else UNORDERED_FIELDS]
        if not isinstance(entry, dict) or tuple(entry) not in forms:
            got = list(entry) if isinstance(entry, dict) else type(entry).__name__
            raise AccountError(f"{where}: expected the fields {list(forms[0])}, got {got}")
        if entry["seq"] != len(entries) + 1:
            raise AccountError(f"{where}: seq is {entry['seq']}, expected {len(entries) + 1}: a line was removed, added or moved")
        if entry["prev"] != prev:
            raise AccountError(f"{where}: prev is not the hash of the line before: that line, or this one, was edited or moved")
        problems = _line_problems(entry)
        if problems:
            raise AccountError(f"{where}: " + "; ".join(problems))
        entries.append(entry)
        prev = line_hash(line)
    return entries


def events_of(entries: list[dict[str, Any]], *, run: str | None = None) -> list[Event]:
    """The (noise, sample rate, steps) events of every line (or of one run's lines)."""
    return ledger.events_of([x for x in entries if run is None or x["run"] == run])


@dataclass(frozen=True)
class Terms:
    """How an account counts: at ``delta``, by RDP at ``order`` (None: an account written before
    orders were fixed, counted by its ``accountant`` at the best order)."""

    delta: float
    accountant: str
    order: float | None

    def spent_on(self, events: list[Event]) -> float:
        """Epsilon of ``events`` as the account counts them."""
        return epsilon_of(events, delta=self.delta, accountant=self.accountant, order=self.order)


def terms(entries: list[dict[str, Any]], *, delta: float, order: float | None = None) -> Terms:
    """The account's terms: its first line's, or for a new account the caller's delta and ``order``
    (None: not chosen yet, as while a first run plans: the best order)."""
    if not entries:
        return Terms(delta, "rdp", order)
    first = entries[0]
    return Terms(float(first["delta"]), str(first["accountant"]), float(first["order"]) if "order" in first else None)


def counting(result: dict[str, Any]) -> str:
    """How a :func:`summary` was counted, in words: "RDP at order 2.6", or an old account's caveat."""
    if result["order"] is not None:
        return f"RDP at order {result['order']:g} (fixed by the account's first line)"
    return f"{result['accountant']} at its best order (an account written before orders were fixed: not a proven cap over runs)"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for one reservation (``path``.lock beside it; POSIX advisory lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def reserve(
    path: Path,
    *,
    run: str,
    server_round: int,
    events: list[dict[str, Any]],
    cap: float | None,
    delta: float,
    plan: list[Event] | None = None,
) -> Reservation:
    """Appends this round's ``events`` if the lifetime epsilon with them stays within ``cap``
    (``None``: no cap, always granted and recorded). Read, check and append happen under one lock.

    A new account is fixed at the Rényi order that is best for ``plan``, the reserving run's
    whole plan (its every round's events; None: this round's ``events``)."""
    new = ledger.events_of([{"events": events}])
    with locked(path):
        lines = _lines(path)
        entries = _checked(path, lines)
        t = terms(entries, delta=delta, order=None if entries else best_order(plan or new, delta=delta))
        spent = events_of(entries)
        before, after = t.spent_on(spent), t.spent_on([*spent, *new])
        runs = len({x["run"] for x in entries} | {run})
        if cap is not None and after > cap + 1e-9:
            return Reservation(False, before, after, cap, runs)
        entry = {
            "seq": len(entries) + 1,
            "run": run,
            "round": int(server_round),
            "accountant": t.accountant,
            **({"order": t.order} if t.order is not None else {}),
            "delta": t.delta,
            "cap": cap,
            "events": [ledger.event_record(e) for e in events],
            "epsilon": after,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "prev": line_hash(lines[-1]) if lines else GENESIS,
        }
        problems = _line_problems(entry)
        if problems:  # a line read() would refuse is never written
            raise ValueError(f"not reserving in {path}: " + "; ".join(problems))
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, separators=(", ", ": ")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # reserved before any training: it must survive a crash
        return Reservation(True, before, after, cap, runs)


def summary(path: Path, *, head: tuple[int, str] | None = None) -> dict[str, Any]:
    """The account checked and summed up, for ``fedxrec privacy account``: per run and over
    the lifetime, epsilon by the account's accountant, each line's recorded epsilon recomputed
    from the events (``AccountError`` names the first line that does not add up), and
    the independent figures for the lifetime: RDP by direct integration at the account's order,
    and dp-accounting's RDP and PLD."""
    return checked_summary(path, head=head)[0]


def checked_summary(path: Path, *, head: tuple[int, str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`summary` and the account's lines it checked, from one read of the file."""
    from shared.privacy.independent import integrated_epsilon, pld_epsilon, rdp_epsilon

    lines = _lines(path)
    entries = _checked(path, lines)
    if not entries:
        raise AccountError(f"{path}: no privacy account here (the file is missing or empty)")
    t = terms(entries, delta=0.0)
    for n in range(len(entries)):
        recomputed = t.spent_on(events_of(entries[: n + 1]))
        if abs(recomputed - float(entries[n]["epsilon"])) > 1e-6 * max(1.0, recomputed):
            raise AccountError(
                f"{path}, line {n + 1}: epsilon {entries[n]['epsilon']} is not what its events and the lines before give ({recomputed:.6f})"
            )
    last = line_hash(lines[-1])
    # an account only grows: the recorded line must still be there, unchanged
    if head is not None and (head[0] > len(lines) or head[0] < 1 or line_hash(lines[head[0] - 1]) != head[1]):
        raise AccountError(
            f"{path}: line {head[0]} is not the one recorded ({head[1][:12]}...): lines were removed at the end, or replaced"
        )
    runs: dict[str, dict[str, Any]] = {}
    for x in entries:
        r = runs.setdefault(x["run"], {"rounds": [], "first": x["time"], "last": x["time"]})
        r["rounds"].append(x["round"])
        r["last"] = x["time"]
    for name, r in runs.items():
        r["epsilon"] = t.spent_on(events_of(entries, run=name))
    events = events_of(entries)
    caps = [x["cap"] for x in entries if x["cap"] is not None]
    result = {
        "account": str(path),
        "accountant": t.accountant,
        "order": t.order,  # None: written before orders were fixed (best order: not a proven filter over runs)
        "delta": t.delta,
        "cap": caps[-1] if caps else None,
        "epsilon": float(entries[-1]["epsilon"]),
        "independent_epsilon": {
            "integrated_rdp": integrated_epsilon(events, delta=t.delta, order=t.order),
            "dp_accounting_rdp": rdp_epsilon(events, delta=t.delta),
            "dp_accounting_pld": pld_epsilon(events, delta=t.delta),
        },
        "runs": runs,
        "lines": len(entries),
        "head": f"{len(entries)}:{last}",
    }
    return result, entries
