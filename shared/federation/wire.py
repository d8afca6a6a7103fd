"""What crosses the wire between a partner and the coordinator, and nothing more.

Flower's record keys are fixed: ``"arrays"`` (the adapter's weights, exactly its
state dict), ``"metrics"`` (exactly the names below) and ``"config"`` (the
server's instructions). A partner's reply also carries ``"partner"``: its
public name, a human-readable note (why it declined a round, for example) and,
under DP, its privacy-ledger line for the round (:mod:`shared.privacy.ledger`),
which holds only what the metrics already say plus the hash chain.
"""

from __future__ import annotations

import json
import re

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
PARTNER_FIELDS = ("name", "note", "ledger-line")  # ledger-line: on train replies under DP, the round's privacy-ledger line

# A ClientApp that raises reaches the coordinator as Flower's error text alone (Ray's adds its traceback):
# a partner's failure starts with this and its name in JSON quotes, so the server can name its row.
FAILURE = "fedxrec partner "
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_text(name: str, err: BaseException) -> str:
    return f"{FAILURE}{json.dumps(name)} failed: {type(err).__name__}: {err}"


def read_failure(reason: str) -> tuple[str | None, str]:
    """From the error text Flower passed on: the partner's name (None where it gave none) and its
    failure on one line (its own words where it gave them, not Flower's or Ray's wrapping)."""
    text, name = _ANSI.sub("", reason), None
    start = text.rfind(FAILURE)
    if start >= 0:
        try:
            found, end = json.JSONDecoder().raw_decode(text, start + len(FAILURE))
        except ValueError:
            found = None
        if isinstance(found, str) and text.startswith(" failed: ", end):
            name, text = found, text[end + len(" failed: ") :].removesuffix("'>")
    return name, " ".join(text.split())
