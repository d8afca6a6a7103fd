"""The privacy ledger: append-only JSON lines, each chained to the one before by a hash.

One line per round a partner took part in or declined (two where a resumed run
ran a round again: both releases count), written by the partner itself
(``<state-dir>/ledger.jsonl``) and copied verbatim by the coordinator into
``runs/<run-id>/ledger/<partner>.jsonl`` (:meth:`server.run_folder.RunFolder.copy_ledger`)::

    {"seq": 1, "round": 1, "partner": "books", "status": "trained",
     "accountant": "rdp", "delta": 1e-05, "budget_epsilon": 8.0,
     "events": [{"mechanism": "dp-sgd", "noise_multiplier": 0.9, "sample_rate": 0.02, "steps": 50, "max_grad_norm": 1.0}],
     "epsilon": 3.1, "examples": 1012, "note": "", "time": "2026-11-24T20:00:00+0000",
     "prev": "<sha256 of the previous line's text; 64 zeros on the first line>"}

An event is one application of the subsampled Gaussian mechanism, the unit
Opacus' accountants compose: ``dp-sgd`` (a round's training steps) or ``item
counts`` (the popularity prior's counts, released once in the partner's first
round: one step at sample rate 1, sensitivity ``max_grad_norm`` = 1 per user).
``epsilon`` is what the partner's accountant says after all events so far, at
``delta``. :func:`verify` recomputes it from the events and checks the chain, so
an edited, deleted, inserted or reordered line is found and named. Removing lines
at the *end* leaves a valid chain: that is caught against a recorded head (the
number of lines and the last line's hash), which the run's ``summary.json`` keeps
for every partner and which ``fedxrec privacy verify`` prints for an officer to
keep elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.checks import is_finite_number, is_whole_number
from shared.json_files import read_json_object
from shared.privacy.accounting import ACCOUNTANTS, Event, epsilon_of

GENESIS = "0" * 64
STATUSES = ("trained", "declined")
EVENT_FIELDS = ("mechanism", "noise_multiplier", "sample_rate", "steps", "max_grad_norm")
MECHANISMS = ("dp-sgd", "item counts")
FIELDS = (
    "seq",
    "round",
    "partner",
    "status",
    "accountant",
    "delta",
    "budget_epsilon",
    "events",
    "epsilon",
    "examples",
    "note",
    "time",
    "prev",
)


def line_hash(line: str) -> str:
    return hashlib.sha256(line.rstrip("\n").encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Head:
    """Where a ledger ends: how many lines, and the last line's hash."""

    lines: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "hash": self.hash}


def head_of(path: Path) -> Head:
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []
    return Head(len(lines), line_hash(lines[-1]) if lines else GENESIS)


def summary_entry(path: Path, *, summary: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]] | None:
    """For ``runs/<id>/ledger/<file>.jsonl``: the partner's name in the run's ``summary.json``, and its entry
    (``summary``: that file already read, by a caller that looks up every ledger of the run).

    The summary says which ledger file is whose (``ledger_file``): the name inside the lines is
    the partner's own, and two SuperNodes may have given the same one (the server then keeps
    their records apart). A summary written before ``ledger_file`` is matched by that name.
    """
    summary_path = path.parent.parent / "summary.json"
    if path.parent.name != "ledger" or not path.is_file() or (summary is None and not summary_path.is_file()):
        return None
    if summary is None:
        summary = read_run_summary(summary_path)
    partners: dict[str, dict[str, Any]] = summary.get("partners", {})
    for name, entry in partners.items():
        if entry.get("ledger_file") == f"ledger/{path.name}":
            return name, entry
    try:
        name = json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])["partner"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None  # verify names the broken first line
    if not isinstance(name, str):
        return None  # likewise
    legacy = partners.get(name)
    return (name, legacy) if legacy is not None and "ledger_file" not in legacy else None


def read_run_summary(path: Path) -> dict[str, Any]:
    """A run's ``summary.json``, checked for what a privacy check reads from it: each partner's
    ``ledger_head`` (where its ledger must end) and ``ledger_file``, and who named the partners."""
    summary = read_json_object(path, what="the run's summary")
    partners = summary.get("partners", {})
    problems = []
    if not isinstance(partners, dict) or not all(isinstance(entry, dict) for entry in partners.values()):
        problems.append("partners: expected an object holding one object per partner")
        partners = {}
    for name, entry in partners.items():
        head = entry.get("ledger_head")
        if head is not None and not (
            isinstance(head, dict) and set(head) == {"lines", "hash"} and is_whole_number(head["lines"]) and is_hash(head["hash"])
        ):
            problems.append(f'partners.{name}.ledger_head {head!r}: expected {{"lines": a whole number, "hash": 64 hex digits}}')
        if "ledger_file" in entry and not (
            isinstance(entry["ledger_file"], str) and re.fullmatch(r"ledger/[^/]+\.jsonl", entry["ledger_file"])
        ):
            problems.append(
                f"partners.{name}.ledger_file {entry['ledger_file']!r}: expected the ledger's path in the run folder, ledger/<file>.jsonl"
            )
    if not isinstance(summary.get("partner_names", {}), dict):
        problems.append(f"partner_names {summary['partner_names']!r}: expected an object")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return summary


def names_line(names: dict[str, Any]) -> str:
    """Who named a run's partners, in words (summary.md and this report): the coordinator's list, or each partner."""
    if names.get("bound_by") == "partners-file":
        return (
            f"from the coordinator's list {Path(str(names.get('file'))).name} (SHA-256 {str(names.get('sha256'))[:16]}...), "
            "each bound to the SuperNode registered with that partner's key"
        )
    return "as each partner gave it (a SuperNode's domain, a simulated partner's scenario name), not bound to a registered SuperNode"


def recorded_head(path: Path) -> Head | None:
    """The head a run's ``summary.json`` recorded for ``runs/<id>/ledger/<partner>.jsonl``, if any."""
    return head_in(summary_entry(path))


def head_in(found: tuple[str, dict[str, Any]] | None) -> Head | None:
    """The head recorded in a partner's ``summary.json`` entry (:func:`summary_entry`), if any."""
    recorded = found[1].get("ledger_head") if found else None
    return Head(**recorded) if recorded else None


def make_entry(
    *,
    round: int,
    partner: str,
    status: str,
    accountant: str,
    delta: float,
    budget_epsilon: float,
    events: list[dict[str, Any]],
    epsilon: float,
    examples: int,
    note: str = "",
) -> dict[str, Any]:
    """A ledger entry without its place in the chain (``seq`` and ``prev`` are set on append)."""
    return {
        "round": int(round),
        "partner": partner,
        "status": status,
        "accountant": accountant,
        "delta": float(delta),
        "budget_epsilon": float(budget_epsilon),
        "events": [event_record(e) for e in events],
        "epsilon": float(epsilon),
        "examples": int(examples),
        "note": note,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """An event as a ledger (or privacy account) line holds it: exactly ``EVENT_FIELDS``, typed."""
    return {k: _event_value(k, event[k]) for k in EVENT_FIELDS}


def _event_value(key: str, value: Any) -> Any:
    return str(value) if key == "mechanism" else int(value) if key == "steps" else float(value)


def append(path: Path, entry: dict[str, Any]) -> str:
    """Appends ``entry`` after the ledger's current head; returns the line written (no newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = head_of(path)
    chained = {"seq": head.lines + 1, **{k: v for k, v in entry.items() if k not in ("seq", "prev")}, "prev": head.hash}
    problems = line_problems(chained)
    if problems:  # a line verify would refuse is never written: the ledger stays verifiable
        raise ValueError(f"not writing a ledger line to {path}: " + "; ".join(problems))
    line = json.dumps({k: chained[k] for k in FIELDS}, separators=(", ", ": "))
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return line


def append_line(path: Path, line: str) -> None:
    """Appends a line written by a partner, verbatim (the coordinator's copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")


def events_of(entries: list[dict[str, Any]]) -> list[Event]:
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for x in entries for e in x["events"]]


# --------------------------------------------------------------------------- verification


@dataclass
class Verification:
    path: Path
    ok: bool = True
    lines: int = 0
    head: str = GENESIS
    first_bad_line: int | None = None
    problems: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    epsilon: float = 0.0  # recomputed after the last good line

    def fail(self, line: int | None, message: str) -> None:
        self.ok = False
        if self.first_bad_line is None:
            self.first_bad_line = line
        where = f"{self.path}, line {line}" if line else str(self.path)
        self.problems.append(f"{where}: {message}")


def is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# (field, holds for a good value, what is expected): every field a line or an event holds is
# checked before any of it is used, so a damaged line is named, never raised on or trusted
Rule = tuple[str, Callable[[Any], bool], str]
WHOLE_FROM_1 = "a whole number of at least 1"
LINE_RULES: tuple[Rule, ...] = (
    ("seq", lambda v: is_whole_number(v) and v >= 1, WHOLE_FROM_1),
    ("round", lambda v: is_whole_number(v) and v >= 1, WHOLE_FROM_1),
    ("partner", lambda v: isinstance(v, str) and v != "", "the partner's name"),
    ("status", lambda v: v in STATUSES, f"one of {list(STATUSES)}"),
    ("accountant", lambda v: v in ACCOUNTANTS, f"one of {list(ACCOUNTANTS)}"),
    ("delta", lambda v: is_finite_number(v) and 0 < v < 1, "0 < delta < 1"),
    ("budget_epsilon", is_finite_number, "a finite number"),
    ("epsilon", lambda v: is_finite_number(v) and v >= 0, "a finite number of at least 0"),
    ("examples", lambda v: is_whole_number(v) and v >= 0, "a whole number of at least 0"),
    ("note", lambda v: isinstance(v, str), "text"),
    ("time", lambda v: isinstance(v, str), "text"),
    ("prev", is_hash, "the SHA-256 of the line before, 64 hex digits"),
)
EVENT_RULES: tuple[Rule, ...] = (
    ("mechanism", lambda v: v in MECHANISMS, f"one of {list(MECHANISMS)}"),
    ("noise_multiplier", lambda v: is_finite_number(v) and v > 0, "a finite number above 0"),
    ("sample_rate", lambda v: is_finite_number(v) and 0 < v <= 1, "0 < sample_rate <= 1"),
    ("steps", lambda v: is_whole_number(v) and v >= 0, "a whole number of at least 0"),
    ("max_grad_norm", lambda v: is_finite_number(v) and v > 0, "a finite number above 0"),
)


def line_rules(*names: str) -> tuple[Rule, ...]:
    """The rules of a ledger line's fields ``names``, for records that hold the same fields."""
    by_name = {rule[0]: rule for rule in LINE_RULES}
    return tuple(by_name[name] for name in names)


def rule_problems(values: dict[str, Any], rules: tuple[Rule, ...], *, where: str = "") -> list[str]:
    """``where field value: expected ...`` for each of ``rules`` that ``values`` breaks."""
    return [f"{where}{name} {values[name]!r}: expected {expected}" for name, holds, expected in rules if not holds(values[name])]


def line_problems(entry: Any) -> list[str]:
    """Everything wrong with one ledger line's fields (its place in the chain is :func:`verify`'s)."""
    if not isinstance(entry, dict):
        return ["is not a JSON object"]
    problems = [f"field {k!r} is missing" for k in FIELDS if k not in entry]
    problems += [f"unexpected field {k!r}" for k in entry if k not in FIELDS]
    if problems:
        return problems
    problems = rule_problems(entry, LINE_RULES)
    problems += event_problems(entry["events"])
    if entry["status"] == "declined" and entry["events"]:
        problems.append("a declined round lists DP events; a declined round releases nothing")
    return problems


def event_problems(events: Any) -> list[str]:
    """What is wrong with a line's ``events`` (shared by the ledger and the privacy account)."""
    if not isinstance(events, list) or not all(isinstance(e, dict) and set(e) == set(EVENT_FIELDS) for e in events):
        return [f"events: expected a list of objects with exactly {list(EVENT_FIELDS)}"]
    return [p for n, e in enumerate(events, start=1) for p in rule_problems(e, EVENT_RULES, where=f"event {n} ")]


def verify(path: str | Path, *, head: Head | None = None, tolerance: float = 1e-6) -> Verification:
    """Checks the chain, the fields and every recorded epsilon; ``head``: where the ledger must end.

    Epsilon is recomputed from the events of all lines so far with the accountant
    named on the line; ``tolerance`` is relative.
    """
    path = Path(path)
    result = Verification(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        recorded = f": the run recorded {head.lines} line(s) of it, ending in {head.hash[:16]}..." if head else ""
        result.fail(None, "no such ledger file" + recorded)
        return result
    except UnicodeDecodeError as err:
        result.fail(None, f"not UTF-8 text ({err.reason} at byte {err.start})")
        return result
    if text and not text.endswith("\n"):
        result.fail(text.count("\n") + 1, "the last line is incomplete (no newline): the file was cut off")
    prev, rounds = GENESIS, -1
    hashes = {line_hash(line): n for n, line in enumerate(text.splitlines(), start=1)}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            result.fail(number, f"not valid JSON ({err.msg} at column {err.colno})")
            break
        shape = line_problems(entry)
        if shape:
            result.fail(number, "; ".join(shape))
            break
        if entry["seq"] != number:
            result.fail(
                number, f"seq is {entry['seq']}, expected {number}: a line before it was removed or inserted, or lines were reordered"
            )
            break
        if entry["prev"] != prev:
            if entry["prev"] in hashes and hashes[entry["prev"]] != number - 1:
                result.fail(number, f"its prev is the hash of line {hashes[entry['prev']]}, not of line {number - 1}: lines were reordered")
            else:
                result.fail(
                    number - 1,
                    f"its hash is not the prev recorded on line {number}: line {number - 1} was edited, or line {number} was edited or moved",
                )
            break
        if entry["round"] < rounds:  # one round twice: the coordinator resumed the run and ran it again
            result.fail(number, f"round {entry['round']} after round {rounds}: rounds must not decrease")
            break
        first = result.entries[0] if result.entries else entry
        if (entry["partner"], entry["accountant"], entry["delta"]) != (first["partner"], first["accountant"], first["delta"]):
            result.fail(number, "partner, accountant or delta differs from line 1: one ledger is one partner under one accountant")
            break
        recomputed = epsilon_of(events_of([*result.entries, entry]), delta=entry["delta"], accountant=entry["accountant"])
        if abs(recomputed - entry["epsilon"]) > tolerance * max(1.0, recomputed):
            result.fail(number, f"epsilon is recorded as {entry['epsilon']:.6g} but its events give {recomputed:.6g}")
            break
        result.entries.append(entry)
        result.epsilon, prev, rounds = recomputed, line_hash(line), entry["round"]
    result.lines, result.head = len(result.entries), prev
    if result.ok and head is not None and (head.lines, head.hash) != (result.lines, result.head):
        if head.lines > result.lines:
            result.fail(
                result.lines + 1,
                f"the ledger ends after line {result.lines}, but its recorded head has {head.lines} lines: it was truncated",
            )
        elif head.lines == result.lines:
            result.fail(
                result.lines, f"the last line's hash differs from the recorded head ({head.hash[:12]}…): line {result.lines} was edited"
            )
        else:
            result.fail(
                head.lines + 1, f"the ledger has {result.lines} lines, its recorded head {head.lines}: lines were appended after the head"
            )
    return result
