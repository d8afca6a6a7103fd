"""Settings objects that say everything wrong with them at once.

Each config dataclass lists its problems as ``(field, what is wrong)`` pairs and
refuses to be built with any (Opacus' validators are the model: collect every
problem, say what was expected). The command line turns each field into the flag
that set it (:class:`shared.cli.FlagProblems`), so ``--epochs 0 --lr -1`` is
answered with both flags, before anything is read or trained. The federation's
run config has its own check (:func:`shared.federation.settings.settings_from_run_config`),
whose messages name its kebab-case keys.
"""

from __future__ import annotations

import math
import os
from typing import Any

Problem = tuple[str, str]  # (field, "must be <what is expected>, got <value>")


class SelfChecking:
    """Base of a settings dataclass that refuses to be built with bad values: it lists them in ``problems``."""

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[Problem]:
        raise NotImplementedError


def is_finite_number(value: Any) -> bool:
    """A finite number, not a bool: TOML and ``json`` read ``nan`` and ``inf``, and ``True`` is an int in Python."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_whole_number(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def number_from_env(name: str, *, expected: str) -> float | None:
    """The number in environment variable ``name`` (None where it is unset or empty); raises naming the
    variable and ``expected`` unless it is a finite number of at least 0."""
    given = os.environ.get(name, "")
    if not given:
        return None
    try:
        value = float(given)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"${name} is {given!r}: expected {expected}, a number of at least 0")
    return value


def expect(config: Any, *rules: tuple[str, bool, str]) -> list[Problem]:
    """``(field, holds, what is expected)`` for each rule: the problems of the rules that do not hold."""
    return [(name, f"must be {expected}, got {getattr(config, name)!r}") for name, holds, expected in rules if not holds]


class ConfigError(ValueError):
    """A settings object with problems; ``problems`` keeps them by field."""

    def __init__(self, owner: str, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(f"invalid {owner}: " + "; ".join(f"{name} {text}" for name, text in problems))


def listed(problems: list[str], *, several: str) -> str:
    """One problem as it is; several one per line under ``several`` ("3 flags are wrong:")."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} {several}:\n  " + "\n  ".join(problems)


def check(config: SelfChecking) -> None:
    """Raises :class:`ConfigError` naming every problem of ``config``."""
    problems = config.problems()
    if problems:
        raise ConfigError(type(config).__name__, problems)
