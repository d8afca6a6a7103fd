"""What crosses the wire between a partner and the coordinator, and nothing more.

Flower's record keys are fixed: ``"arrays"`` (the adapter's weights, exactly its
state dict), ``"metrics"`` (exactly the names below) and ``"config"`` (the
server's instructions). A partner's reply also carries ``"partner"``: its
public name, a human-readable note (why it declined a round, for example) and,
under DP, its privacy-ledger line for the round (:mod:`shared.privacy.ledger`),
which holds only what the metrics already say plus the hash chain.
"""

from __future__ import annotations

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
