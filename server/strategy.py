"""Flower's FedAvg, plus a record of each partner's reply.

Aggregation is Flower's own (weighted by ``num-examples``). Two additions:
replies of partners that declined a round (budget) are left out of the average
rather than averaged in with weight 0, and every reply's metrics, partner name
and size are kept so that the run folder can hold one line per partner per round.
Rounds are numbered from ``first_round`` so that a resumed run continues its
numbering.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared.federation import wire


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


@dataclass
class PartnerReply:
    node_id: int
    partner: str
    note: str
    metrics: dict[str, Any]
    bytes_received: int = 0
    ledger_line: str = ""  # the partner's own ledger line for the round, copied verbatim


@dataclass
class RoundLog:
    train: list[PartnerReply] = field(default_factory=list)
    evaluate: list[PartnerReply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bytes_sent_each: int = 0


def _reply(msg: Message, *, with_arrays: bool) -> PartnerReply:
    info = (
        msg.content[wire.PARTNER] if wire.PARTNER in msg.content else ConfigRecord({"name": f"node-{msg.metadata.src_node_id}", "note": ""})
    )
    return PartnerReply(
        node_id=msg.metadata.src_node_id,
        partner=str(info["name"]),
        note=str(info.get("note", "")),
        ledger_line=str(info.get("ledger-line", "")),
        metrics=dict(msg.content[wire.METRICS]),
        bytes_received=record_bytes(msg.content.array_records[wire.ARRAYS]) if with_arrays else 0,
    )


class PartnerFedAvg(FedAvg):
    def __init__(self, *, first_round: int = 1, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.offset = first_round - 1
        self.rounds: dict[int, RoundLog] = {}

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round + self.offset, RoundLog())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.round_log(server_round).bytes_sent_each = record_bytes(arrays)
        return super().configure_train(server_round + self.offset, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        log = self.round_log(server_round)
        log.failures += [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        taken = []
        for msg in replies:
            if msg.has_error():
                continue
            reply = _reply(msg, with_arrays=True)
            log.train.append(reply)
            if not reply.metrics.get("declined"):
                taken.append(msg)
        if not taken:  # everybody declined or failed: the adapter stays as it was
            return None, None
        return super().aggregate_train(server_round, taken)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        log = self.round_log(server_round)
        log.failures += [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        log.evaluate += [_reply(m, with_arrays=False) for m in replies if not m.has_error()]
        return super().aggregate_evaluate(server_round, replies)
