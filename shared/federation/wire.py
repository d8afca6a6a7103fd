"""What crosses the wire between a partner and the coordinator, and nothing more.

Flower's record keys are fixed: ``"arrays"`` (the adapter's weights, exactly its
state dict), ``"metrics"`` (exactly the names below) and ``"config"`` (the
server's instructions). A partner's reply also carries ``"partner"``: its
public name, a human-readable note (why it declined a round, for example) and,
on a training reply, its privacy ledger of the run (:mod:`shared.privacy.ledger`):
every line so far, each holding only what that round's metrics said plus the
hash chain. The whole ledger, not the round's line, so that the run's copy
catches up on a line it missed (the coordinator stopped after the partner wrote
it, before the round ended) with the partner's next reply.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
PARTNER = "partner"

TRAIN_METRICS = (
    "num-examples",  # users sampled this round (0 when declined); FedAvg's weight
    "loss",
    "steps",
    "epsilon",  # spent so far over the whole run, after this round
    "delta",
    "noise-multiplier",
    "sample-rate",
    "declined",  # 1 when the partner skipped the round to stay within its budget
)
EVALUATE_METRICS = (
    "num-examples",
    "valid-ndcg@10",
    "valid-recall@10",
    "test-ndcg@10",
    "test-recall@10",
    "global-weight",  # the global adapter's weight in the partner's model: 1 unless personal-mix chose less
)
# The statistics a partner computes on its users without noise (no epsilon covers them). A partner with
# node config withhold-metrics sends each as WITHHELD instead (the keys stay: the contract is the same).
WITHHELD_METRICS = ("loss", "valid-ndcg@10", "valid-recall@10", "test-ndcg@10", "test-recall@10")
WITHHELD = -1.0
NO_DP = -1.0  # "epsilon" and "delta" of a run without DP
PARTNER_FIELDS = ("name", "note", "ledger")  # ledger: on train replies, the partner's privacy ledger of the run ("" if none)

# A ClientApp that raises reaches the coordinator as Flower's error text alone (Ray's adds its traceback):
# a partner's failure starts with this and its name in JSON quotes, so the server can name its row.
FAILURE = "fedxrec partner "
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# Any absolute path a deployed partner's failure names, other than its own folders (which go by their
# node config keys), keeps its last part only ("…/reviews.csv"): a user name or a mount point in a
# folder says something about the partner the coordinator has no need of.
_FOLDERS = re.compile(r"(?<![\w.:~<>/-])/(?:[^\s/'\"]+/)+")


def failure_text(name: str | None, err: BaseException, *, private_paths: Mapping[str, str] | None = None) -> str:
    """The text a partner's ClientApp raises to the coordinator: its name (None before it is known) and
    its error in its own words. ``private_paths`` (label → path: a deployed partner's own folders)
    are written as ``<label>`` and any other absolute path is cut to its last part; the partner's own
    log keeps the full error (the original is chained to the raise). Without them (a simulated
    partner, whose files are the researcher's own) the text keeps every path."""
    text = f"{type(err).__name__}: {err}"
    private = _absolute_forms(private_paths or {})
    for path, label in private:
        text = re.sub(re.escape(path) + r"(?![\w.-])", f"<{label}>", text)  # not /srv/data in /srv/data2
    return f"{FAILURE}{json.dumps(name)} failed: {_FOLDERS.sub('…/', text) if private else text}"


def _absolute_forms(private_paths: Mapping[str, str]) -> list[tuple[str, str]]:
    """(absolute path, its label), longest first so that a file in a labelled folder keeps its own label."""
    found: dict[str, str] = {}
    for label, value in private_paths.items():
        # as given and as resolved: the code may have followed a symbolic link or not
        for form in (os.path.abspath(value), str(Path(value).resolve())):
            found.setdefault(form.rstrip("/") or "/", label)
    return sorted(found.items(), key=lambda item: -len(item[0]))


def read_failure(reason: str) -> tuple[str | None, str]:
    """From the error text Flower passed on: the partner's name (None where it gave none) and its
    failure on one line (its own words where it gave them, not Flower's or Ray's wrapping)."""
    text, name = _ANSI.sub("", reason), None
    start = text.rfind(FAILURE)
    if start >= 0:
        try:
            found, end = json.JSONDecoder().raw_decode(text, start + len(FAILURE))
        except ValueError:
            pass
        else:  # a name, or null where the partner failed before it knew its name
            if (found is None or isinstance(found, str)) and text.startswith(" failed: ", end):
                name, text = found, text[end + len(" failed: ") :].removesuffix("'>")
    return name, " ".join(text.split())
