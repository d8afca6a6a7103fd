"""The coordinator's check of each partner's reply before it is averaged or logged.

Flower's FedAvg trusts what it receives: one reply with other array names stops
the whole round (``InconsistentMessageReplies``), weights of 0 in every reply
divide by zero, and one NaN reaches every partner through the average. A reply
is taken only if it is what :mod:`shared.federation.wire` declares: the records
named there and no others; under ``"arrays"`` the names, shapes and dtypes of
the adapter the server sent, all finite; under ``"metrics"`` exactly the
declared names, each one finite number; ``num-examples`` (FedAvg's weight) a
whole number, at least 1 unless the partner declined a training round. Any
other reply is left out of the round and logged with what was wrong, and the
run goes on with the others.

What this cannot check is whether a well-formed update is honest (a partner can
still overstate ``num-examples`` or send weights trained to harm): that takes
robust aggregation, which FedAvg is not; run config ``aggregation`` gives
Flower's coordinate-wise median or trimmed mean (:func:`server.strategy.make_strategy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import RecordDict

from shared.checks import is_finite_number, is_whole_number
from shared.federation import wire
from shared.model.adapters import state_problems


def train_reply_problems(content: RecordDict, *, sent: dict[str, torch.Tensor]) -> list[str]:
    """Every way a training reply differs from the wire contract, given the adapter ``sent``."""
    problems = _record_problems(content, arrays=True)
    if wire.ARRAYS in content.array_records:
        problems += state_problems(content.array_records[wire.ARRAYS].to_torch_state_dict(), sent)
    if wire.METRICS in content.metric_records:
        metrics = dict(content.metric_records[wire.METRICS])
        problems += _metric_problems(metrics, wire.TRAIN_METRICS)
        declined, examples = metrics.get("declined"), metrics.get("num-examples")
        if declined not in (0, 1):
            problems.append(f"metric 'declined' is {declined!r}, expected 0 or 1")
        elif declined == 0 and isinstance(examples, int) and examples < 1:
            problems.append(f"num-examples is {examples} in a round the partner trained: expected at least 1 (FedAvg's weight)")
    return problems


def evaluate_reply_problems(content: RecordDict) -> list[str]:
    """Every way an evaluation reply differs from the wire contract."""
    problems = _record_problems(content, arrays=False)
    if wire.METRICS in content.metric_records:
        metrics = dict(content.metric_records[wire.METRICS])
        problems += _metric_problems(metrics, wire.EVALUATE_METRICS)
        examples = metrics.get("num-examples")
        if isinstance(examples, int) and examples == 0:
            problems.append("num-examples is 0: an evaluation over no users scores nothing (and weighs nothing in the average)")
    return problems


def _record_problems(content: RecordDict, *, arrays: bool) -> list[str]:
    of_kind: dict[str, Mapping[str, object]] = {
        wire.ARRAYS: content.array_records,
        wire.METRICS: content.metric_records,
        wire.PARTNER: content.config_records,
    }
    required = (wire.ARRAYS, wire.METRICS) if arrays else (wire.METRICS,)
    allowed = (*required, wire.PARTNER)
    problems = [f"no {name!r} record" for name in required if name not in content]
    problems += [f"unexpected record {name!r}" for name in content if name not in allowed]
    problems += [f"record {name!r} is of another kind than declared" for name in allowed if name in content and name not in of_kind[name]]
    if wire.PARTNER in content.config_records:
        info = dict(content.config_records[wire.PARTNER])
        problems += [f"unexpected partner field {k!r}" for k in info if k not in wire.PARTNER_FIELDS]
        problems += [f"partner field {k!r} is not text" for k, v in info.items() if k in wire.PARTNER_FIELDS and not isinstance(v, str)]
    return problems


def _metric_problems(metrics: dict[str, Any], declared: tuple[str, ...]) -> list[str]:
    problems = [f"no metric {name!r}" for name in declared if name not in metrics]
    problems += [f"unexpected metric {name!r}" for name in metrics if name not in declared]
    for name, value in metrics.items():
        if not is_finite_number(value):
            problems.append(f"metric {name!r} is {value!r}, expected one finite number")
    examples = metrics.get("num-examples")
    if examples is not None and not (is_whole_number(examples) and examples >= 0):
        problems.append(f"num-examples is {examples!r}, expected a whole number of users, 0 or more")
    return problems
