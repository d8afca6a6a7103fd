"""fedxrec ClientApp: Message in, a plain call into :mod:`client.partner`, Message out.

Only the adapter's arrays (``"arrays"``), the declared metrics (``"metrics"``)
and the partner's public name, note and privacy-ledger line (``"partner"``) are sent back; see
:mod:`shared.federation.wire`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import partner
from client.private_state import newest_state, state_dir
from shared.federation import wire
from shared.federation.scenario import PartnerSpec
from shared.federation.settings import FederationSettings, settings_from_run_config

app = ClientApp()

STATE_KEY = "fedxrec-partner"


def _partner(msg: Message, node_config: dict[str, Any]) -> tuple[FederationSettings, int, PartnerSpec]:
    config = dict(msg.content.config_records[wire.CONFIG])
    server_round = int(config.pop("server-round"))  # type: ignore[arg-type]
    settings = settings_from_run_config(config)
    return settings, server_round, partner.resolve_partner(node_config, settings)


def _state(msg: Message, context: Context, folder: Path) -> tuple[Any, ...]:
    blob = context.state[STATE_KEY]["blob"] if STATE_KEY in context.state else None
    state = newest_state(blob, folder)  # type: ignore[arg-type]
    arrays = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
    return state, arrays


@contextmanager
def _failure_told(node_config: dict[str, Any], name: str | None = None) -> Iterator[None]:
    """A failure's text names the partner (Flower passes the coordinator nothing else of it), and
    its folders by their node config keys only: see :func:`wire.failure_text`."""
    try:
        yield
    except Exception as err:
        raise RuntimeError(wire.failure_text(name, err, node_config=node_config)) from err


@app.train()
def train(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    with _failure_told(node_config):
        settings, server_round, spec = _partner(msg, node_config)
    with _failure_told(node_config, spec.name):
        folder = state_dir(node_config, settings, spec)
        state, arrays = _state(msg, context, folder)
        reply, new_state = partner.train(settings=settings, server_round=server_round, spec=spec, arrays=arrays, state=state, folder=folder)
    context.state[STATE_KEY] = ConfigRecord({"blob": new_state.to_bytes()})
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(reply.arrays),
            wire.METRICS: MetricRecord(dict(reply.metrics)),
            wire.PARTNER: ConfigRecord({"name": spec.name, "note": reply.note, "ledger-line": reply.ledger_line}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    with _failure_told(node_config):
        settings, server_round, spec = _partner(msg, node_config)
    with _failure_told(node_config, spec.name):
        folder = state_dir(node_config, settings, spec)
        state, arrays = _state(msg, context, folder)
        metrics = partner.evaluate_global(
            settings=settings, server_round=server_round, spec=spec, arrays=arrays, state=state, folder=folder
        )
    content = RecordDict({wire.METRICS: MetricRecord(dict(metrics)), wire.PARTNER: ConfigRecord({"name": spec.name, "note": ""})})
    return Message(content=content, reply_to=msg)
