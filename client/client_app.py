"""fedxrec ClientApp: Message in, a plain call into :mod:`client.partner`, Message out.

Only the adapter's arrays (``"arrays"``), the declared metrics (``"metrics"``)
and the partner's public name, note and privacy-ledger line (``"partner"``) are sent back; see
:mod:`shared.federation.wire`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import partner
from client.private_state import newest_state, state_dir
from shared.device import hand_back_gpu_memory
from shared.federation import wire
from shared.federation.scenario import NODE_CONFIG_PATHS
from shared.federation.settings import settings_from_run_config

app = ClientApp()

STATE_KEY = "fedxrec-partner"


@contextmanager
def _partner_call(msg: Message, context: Context) -> Iterator[dict[str, Any]]:
    """The keyword arguments of this message's call into :mod:`client.partner` (settings,
    server_round, spec, arrays, state, folder). A failure in reading them or in the call is
    raised with the partner's name, and its folders by their node config keys only
    (:func:`wire.failure_text`): Flower passes the coordinator nothing else of it."""
    node_config = dict(context.node_config)
    with _failure_told(node_config):
        config = dict(msg.content.config_records[wire.CONFIG])
        server_round = int(config.pop("server-round"))  # type: ignore[arg-type]
        settings = settings_from_run_config(config)
        spec = partner.resolve_partner(node_config, settings)
    with _failure_told(node_config, spec.name):
        folder = state_dir(node_config, settings, spec)
        blob = context.state[STATE_KEY]["blob"] if STATE_KEY in context.state else None
        state = newest_state(blob, folder)  # type: ignore[arg-type]
        arrays = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
        try:
            yield {"settings": settings, "server_round": server_round, "spec": spec, "arrays": arrays, "state": state, "folder": folder}
        finally:
            hand_back_gpu_memory()  # for the partners that share this GPU


@contextmanager
def _failure_told(node_config: dict[str, Any], name: str | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        private = {key: str(node_config[key]) for key in NODE_CONFIG_PATHS if node_config.get(key)}
        raise RuntimeError(wire.failure_text(name, err, private_paths=private)) from err


@app.train()
def train(msg: Message, context: Context) -> Message:
    with _partner_call(msg, context) as call:
        reply, new_state = partner.train(**call)
    context.state[STATE_KEY] = ConfigRecord({"blob": new_state.to_bytes()})
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(reply.arrays),
            wire.METRICS: MetricRecord(dict(reply.metrics)),
            wire.PARTNER: ConfigRecord({"name": call["spec"].name, "note": reply.note, "ledger": reply.ledger}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    with _partner_call(msg, context) as call:
        metrics = partner.evaluate_global(**call)
    content = RecordDict({wire.METRICS: MetricRecord(dict(metrics)), wire.PARTNER: ConfigRecord({"name": call["spec"].name, "note": ""})})
    return Message(content=content, reply_to=msg)
