"""Flower's FedAvg (or its robust FedMedian / FedTrimmedAvg), plus a check and a record of each partner's reply.

Aggregation is Flower's own: FedAvg weighted by ``num-examples``, or, with run
config ``aggregation``, the coordinate-wise median or trimmed mean, which no one
partner can pull far (:func:`make_strategy`). Three additions:
replies that break the wire contract are left out with what was wrong
(:mod:`server.screening`), instead of stopping the round or reaching every
partner through the average; replies of partners that declined a round (budget)
are left out of the average rather than averaged in with weight 0; and every
reply's metrics, partner name and size are kept so that the run folder can hold
one line per partner per round. With the coordinator's list of partners
(:mod:`server.partner_list`) only listed SuperNodes are sampled, and names are
the list's, not the replies'. Before a round's training and its evaluation the
strategy waits for ``min-partners`` SuperNodes at most ``partners-timeout``
seconds (:class:`TooFewPartners`), where Flower's sampling would wait forever.
Rounds are numbered from ``first_round`` so that a resumed run continues its
numbering.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from server.partner_list import PartnerList
from server.screening import evaluate_reply_problems, train_reply_problems
from shared.checks import is_finite_number
from shared.federation import wire
from shared.federation.settings import FederationSettings


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


@dataclass
class PartnerReply:
    node_id: int
    partner: str
    note: str
    metrics: dict[str, Any]
    bytes_received: int = 0
    ledger: str = ""  # the partner's own privacy ledger of the run; the run's copy takes the lines it lacks, verbatim
    rejected: list[str] = field(default_factory=list)  # why the server left the reply out (server.screening)
    failed: str = ""  # Flower's error reason, where the partner's ClientApp raised or its SuperNode went offline instead of replying
    given_name: str | None = None  # the name the reply gave
    kept_apart: bool = False  # another SuperNode gave the same name this round and holds it (PartnerFedAvg.finish_round)


@dataclass
class RoundLog:
    train: list[PartnerReply] = field(default_factory=list)
    evaluate: list[PartnerReply] = field(default_factory=list)
    bytes_sent_each: int = 0


def _reply(msg: Message, *, partner: str, problems: list[str], declared: tuple[str, ...]) -> PartnerReply:
    """What the run folder keeps of a reply; of a rejected one, only the declared metrics that are finite numbers."""
    content = msg.content
    info = dict(content.config_records[wire.PARTNER]) if wire.PARTNER in content.config_records else {}
    note, lines = info.get("note"), info.get("ledger")
    metrics = dict(content.metric_records[wire.METRICS]) if wire.METRICS in content.metric_records else {}
    if problems:  # what the partner reported (its epsilon, say) stays on record where it is well-formed
        metrics = {k: v for k, v in metrics.items() if k in declared and is_finite_number(v)}
    arrays = content.array_records.get(wire.ARRAYS)
    return PartnerReply(
        node_id=msg.metadata.src_node_id,
        partner=partner,
        note=note if isinstance(note, str) else "",
        ledger=lines if isinstance(lines, str) else "",
        metrics=metrics,
        bytes_received=record_bytes(arrays) if arrays is not None else 0,
        rejected=problems,
        given_name=_given_name(msg),
    )


def _given_name(msg: Message) -> str | None:
    """The name a reply gives its partner, if any (a failure's is in its error text: ``wire.read_failure``)."""
    if msg.has_error() or wire.PARTNER not in msg.content.config_records:
        return None
    name = msg.content.config_records[wire.PARTNER].get("name")
    return name if isinstance(name, str) and name else None


class TooFewPartners(RuntimeError):
    """Fewer than ``min-partners`` SuperNodes were connected within ``partners-timeout``: the run stops."""


class PartnerFedAvg(FedAvg):
    def __init__(
        self,
        *,
        first_round: int = 1,
        holders: dict[str, int] | None = None,
        partner_list: PartnerList | None = None,
        partners_timeout: float = FederationSettings.partners_timeout,
        **fedavg: Any,
    ) -> None:
        """``holders``: partner name -> node id, as the run's earlier rounds had them (a resumed run).
        ``partner_list``: the coordinator's list; None: partners name themselves.
        ``partners_timeout``: seconds to wait for enough SuperNodes before a round's step."""
        super().__init__(**fedavg)
        self.partners_timeout = partners_timeout
        self.offset = first_round - 1
        self.rounds: dict[int, RoundLog] = {}
        self.sent: dict[str, torch.Tensor] = {}  # this round's global adapter, which replies are checked against
        # node id -> partner name, as finish_round settled it (a resumed run: as its earlier rounds had it)
        self.names: dict[int, str] = {node: name for name, node in (holders or {}).items()}
        self.holders: dict[str, int] = dict(holders or {})  # partner name -> the node that holds it in this run (finish_round)
        self.partner_list = partner_list
        self.unlisted_seen: set[int] = set()  # connected SuperNodes not on the list, each reported once

    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round + self.offset, RoundLog())

    def finish_round(self, server_round: int) -> RoundLog:
        """The round's log with each reply under its partner's name for the run.

        A name is one partner's records (rows, ledger copy), so two SuperNodes that give the same
        name in one round (both mounted their data at ``/data``, say) must not share them: the
        name stays with the node that held it in earlier rounds (else the first to give it), and
        the other node's records are kept apart as ``<name>@node-<id>``. A node that gives a name
        nobody else gave this round takes it over: a restarted SuperNode comes back with a new id.
        With the coordinator's list of partners, every node's name is the list's (``node-<id>`` if unlisted).
        """
        log = self.round_log(server_round)
        replies = [*log.train, *log.evaluate]
        if self.partner_list is not None:  # the coordinator's list names every node; no reply can claim another's name
            for reply in replies:
                reply.partner = self.names[reply.node_id] = self.partner_list.name_of(reply.node_id) or f"node-{reply.node_id}"
            return log
        claims: dict[str, list[int]] = {}
        for reply in replies:
            if reply.given_name and reply.node_id not in (nodes := claims.setdefault(reply.given_name, [])):
                nodes.append(reply.node_id)
        for name, nodes in claims.items():
            holder = self.holders.get(name)
            self.holders[name] = holder = holder if holder in nodes else nodes[0]
            for node in nodes:
                self.names[node] = name if node == holder else f"{name}@node-{node}"
        for reply in replies:
            reply.partner = self.names.get(reply.node_id, reply.partner)
            reply.kept_apart = reply.given_name is not None and reply.partner != reply.given_name
        return log

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.round_log(server_round).bytes_sent_each = record_bytes(arrays)
        self.sent = arrays.to_torch_state_dict()
        ready = self._ready(grid, min_nodes=self.min_train_nodes, step=f"round {server_round + self.offset}'s training")
        return super().configure_train(server_round + self.offset, arrays, config, ready)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        ready = self._ready(grid, min_nodes=self.min_evaluate_nodes, step=f"round {server_round + self.offset}'s evaluation")
        return super().configure_evaluate(server_round + self.offset, arrays, config, ready)

    def _ready(self, grid: Grid, *, min_nodes: int, step: str) -> Grid:
        """The grid as FedAvg's sampling sees it (:meth:`_listed`), once as many SuperNodes as that
        sampling waits for are connected on it (:meth:`await_partners`)."""
        listed = self._listed(grid)
        self.await_partners(listed, needed=max(self.min_available_nodes, min_nodes), step=step)
        return listed

    def await_partners(self, grid: Grid, *, needed: int, step: str) -> None:
        """Returns once ``needed`` SuperNodes are connected (with a partner list: listed ones), so that
        Flower's sampling, which waits for as many without a limit, samples at once; raises
        :class:`TooFewPartners` if they are not within ``partners_timeout`` seconds."""
        deadline = time.monotonic() + self.partners_timeout
        said = False
        while (connected := len(list(grid.get_node_ids()))) < needed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TooFewPartners(
                    f"{step}: {connected} SuperNode(s) connected, {needed} needed (run config min-partners), after waiting "
                    f"{self.partners_timeout:g} s (run config partners-timeout). The run stops here; start it again with the "
                    "same run-id to resume after its last finished round, once they are back or with a lower min-partners"
                )
            if not said:
                print(
                    f"{step}: waiting for {needed} SuperNodes ({connected} connected), at most {self.partners_timeout:g} s (run config partners-timeout)"
                )
                said = True
            time.sleep(min(1.0, left))

    def _listed(self, grid: Grid) -> Grid:
        """The grid as FedAvg's sampling sees it: with a partner list, only the listed SuperNodes."""
        return grid if self.partner_list is None else cast(Grid, _ListedNodes(grid, self))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        passed = self._screen(replies, self.round_log(server_round).train, train=True)
        taken = [m for m in passed if not m.content.metric_records[wire.METRICS]["declined"]]
        if not taken:  # everybody declined, failed or was rejected: the adapter stays as it was
            return None, None
        return super().aggregate_train(server_round, taken)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        taken = self._screen(replies, self.round_log(server_round).evaluate, train=False)
        return super().aggregate_evaluate(server_round, taken) if taken else None

    def _screen(self, replies: Iterable[Message], into: list[PartnerReply], *, train: bool) -> list[Message]:
        """Logs each reply into ``into`` (a failure, or the partner's reply with its contract problems); returns those without problems.
        Names are finish_round's to settle, once the round's replies are in."""
        passed = []
        for msg in replies:
            node = msg.metadata.src_node_id
            partner = f"node-{node}"  # until finish_round names it
            if msg.has_error():
                given, reason = wire.read_failure(msg.error.reason or f"error code {msg.error.code}")
                into.append(PartnerReply(node, partner, "", {}, failed=reason, given_name=given))
                continue
            problems = train_reply_problems(msg.content, sent=self.sent) if train else evaluate_reply_problems(msg.content)
            problems = [*self._name_problems(msg), *problems]
            reply = _reply(msg, partner=partner, problems=problems, declared=wire.TRAIN_METRICS if train else wire.EVALUATE_METRICS)
            into.append(reply)
            if not reply.rejected:
                passed.append(msg)
        return passed

    def _name_problems(self, msg: Message) -> list[str]:
        """Against the coordinator's list: is the node listed, and does its reply give the listed name?"""
        if self.partner_list is None:
            return []
        node, given = msg.metadata.src_node_id, _given_name(msg)
        listed = self.partner_list.name_of(node)
        if listed is None:
            return [f"SuperNode {node} is not on the coordinator's list of partners ({self.partner_list.path})"]
        if given is not None and given != listed:
            return [
                f"the reply gives the name {given!r}, but SuperNode {node} is listed as {listed!r} in {self.partner_list.path.name}; "
                f"the partner should set domain='{listed}' in its --node-config, or the coordinator correct its list"
            ]
        return []


class PartnerFedMedian(PartnerFedAvg, FedMedian):
    """PartnerFedAvg's checks and records in front of Flower's FedMedian (Yin et al., ICML 2018)."""


class PartnerFedTrimmedAvg(PartnerFedAvg, FedTrimmedAvg):
    """PartnerFedAvg's checks and records in front of Flower's FedTrimmedAvg (Yin et al., ICML 2018)."""


def make_strategy(
    settings: FederationSettings, *, first_round: int = 1, holders: dict[str, int] | None = None, partner_list: PartnerList | None = None
) -> PartnerFedAvg:
    """The run's strategy: ``settings.aggregation`` picks Flower's average; every partner is evaluated each round."""
    kind: type[PartnerFedAvg] = {"fedavg": PartnerFedAvg, "median": PartnerFedMedian, "trimmed-mean": PartnerFedTrimmedAvg}[
        settings.aggregation
    ]
    return kind(
        first_round=first_round,
        holders=holders,
        partner_list=partner_list,
        partners_timeout=settings.partners_timeout,
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=settings.min_partners,
        min_evaluate_nodes=settings.min_partners,
        min_available_nodes=settings.min_partners,
        **({"beta": settings.trim_fraction} if settings.aggregation == "trimmed-mean" else {}),
    )


class _ListedNodes:
    """A grid whose ``get_node_ids`` (all FedAvg's sampling calls) gives only the listed SuperNodes."""

    def __init__(self, grid: Grid, strategy: PartnerFedAvg) -> None:
        self.grid, self.strategy = grid, strategy

    def get_node_ids(self) -> list[int]:
        assert self.strategy.partner_list is not None
        connected = list(self.grid.get_node_ids())
        listed = [node for node in connected if self.strategy.partner_list.name_of(node) is not None]
        for node in sorted(set(connected) - set(listed) - self.strategy.unlisted_seen):
            print(f"SuperNode {node} is connected but not on the list of partners ({self.strategy.partner_list.path}): it is not sampled")
            self.strategy.unlisted_seen.add(node)
        return listed
