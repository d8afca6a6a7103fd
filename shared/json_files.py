"""JSON files that fedxrec wrote and reads back (a model's ``model.json``, a run's ``config.json``
and ``summary.json``): one that was damaged or replaced is an error naming the file and what is
wrong, never a bare ``JSONDecodeError`` or a ``KeyError`` from deep inside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, *, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` it should be, in words), with every ``required`` key;
    ``ValueError`` naming the file otherwise."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(value).__name__}")
    missing = [key for key in required if key not in value]
    if missing:
        raise ValueError(f"{path}: {', '.join(map(repr, missing))} missing: not {what}, or written by an older fedxrec")
    return value
