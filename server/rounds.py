"""What the server does at the end of each round: checkpoint, metrics lines, ledger, a printout."""

from __future__ import annotations

from typing import Any

from server.run_folder import RunFolder, quality_figure
from server.strategy import PartnerReply, RoundLog
from shared.federation.wire import EVALUATE_METRICS, NO_DP, TRAIN_METRICS, WITHHELD, WITHHELD_METRICS


def _key(name: str) -> str:
    return name.replace("-", "_")


def round_rows(server_round: int, log: RoundLog) -> list[dict[str, Any]]:
    """One row per partner: its training reply (if sampled) joined with its evaluation reply."""
    rows: dict[str, dict[str, Any]] = {}
    for reply in log.train:
        row = rows.setdefault(reply.partner, {"round": server_round, "partner": reply.partner, "node_id": reply.node_id})
        for name in TRAIN_METRICS:
            value = reply.metrics.get(name)
            row[_key(name)] = None if value == NO_DP and name in ("epsilon", "delta") else value
        _mark_withheld(row, reply)
        row["declined"] = bool(reply.metrics.get("declined"))
        row["rejected"] = bool(reply.rejected)  # left out of the average by the server (server.screening)
        row["failed"] = bool(reply.failed)  # the partner's ClientApp raised, or its SuperNode went offline, instead of replying
        row["note"] = _note(reply, "update")
        row["bytes_sent"] = log.bytes_sent_each
        row["bytes_received"] = reply.bytes_received
    for reply in log.evaluate:
        row = rows.setdefault(
            reply.partner,
            {
                "round": server_round,
                "partner": reply.partner,
                "node_id": reply.node_id,  # Flower's id of the SuperNode: who holds the name (PartnerFedAvg.finish_round)
                "num_examples": 0,
                "steps": 0,
                "declined": False,
                "rejected": False,
                "failed": False,
                "note": "not sampled this round",
            },
        )
        for name in EVALUATE_METRICS:
            if name != "num-examples":
                row[_key(name)] = reply.metrics.get(name)
        _mark_withheld(row, reply)
        if reply.rejected or reply.failed:
            row["note"] = _joined(row["note"], _note(reply, "evaluation"))
    # kept apart from another node of the same name (PartnerFedAvg.finish_round): one note per row
    kept_apart = {reply.partner: reply for reply in [*log.train, *log.evaluate] if reply.kept_apart}
    for name, reply in kept_apart.items():
        rows[name]["note"] = _joined(rows[name]["note"], _clash(reply))
    return list(rows.values())


def _mark_withheld(row: dict[str, Any], reply: PartnerReply) -> None:
    """A statistic the partner withheld (node config withhold-metrics) is recorded as None, and the row says so."""
    withheld = [name for name in WITHHELD_METRICS if reply.metrics.get(name) == WITHHELD]
    for name in withheld:
        row[_key(name)] = None
    row["withheld"] = bool(withheld) or row.get("withheld", False)


def _joined(*notes: str) -> str:
    """A row's notes, the empty ones left out."""
    return "; ".join(filter(None, notes))


def _clash(reply: PartnerReply) -> str:
    return (
        f"another SuperNode gave the name '{reply.given_name}' this round: this one's rows and ledger copy are kept apart as '{reply.partner}'; "
        f"give each SuperNode a name of its own (domain='<name>' in its --node-config)"
    )


def _note(reply: PartnerReply, what: str) -> str:
    """The partner's note, and why its reply was left out, if it was."""
    why = ""
    if reply.failed:
        why = f"the partner's {what} failed: {reply.failed}"
    elif reply.rejected:
        more = f" (and {len(reply.rejected) - 5} more)" if len(reply.rejected) > 5 else ""
        why = f"the server rejected this {what}: {'; '.join(reply.rejected[:5])}{more}"
    return _joined(reply.note, why)


def end_round(run: RunFolder, server_round: int, arrays: dict[str, Any], log: RoundLog, *, encoder_bytes: int) -> list[dict[str, Any]]:
    run.save_adapter(server_round, arrays)
    uncopied = {reply.partner: run.copy_ledger(reply.partner, reply.ledger) for reply in log.train if reply.ledger}
    rows = round_rows(server_round, log)
    for row in rows:
        row["note"] = _joined(row["note"], uncopied.get(row["partner"], ""))
    run.append_metrics(rows)
    print(f"\nround {server_round}")
    width = max([24, *(len(row["partner"]) for row in rows)])  # a name kept apart by node id is long
    print(f"  {'partner':<{width}} {'loss':>7} {'epsilon':>8} {'valid NDCG@10':>14} {'test NDCG@10':>13} {'sent B':>9} {'received B':>11}")
    for row in rows:
        eps, loss = row.get("epsilon"), row.get("loss")  # None: not trained this round, or withheld
        valid, test = (quality_figure(row, f"{which}_ndcg@10", missing=0.0) for which in ("valid", "test"))
        print(
            f"  {row['partner']:<{width}} {'-' if loss is None else format(loss, '.3f'):>7} {'-' if eps is None else format(eps, '.3f'):>8} "
            f"{valid:>14} {test:>13} {row.get('bytes_sent', 0):>9,} {row.get('bytes_received', 0):>11,}"
            + (f"  ({row['note']})" if row.get("note") else "")
        )
    print(
        f"  the full encoder would be {encoder_bytes:,} bytes; each partner sent and received {log.bytes_sent_each / encoder_bytes:.2%} of that"
    )
    return rows
