"""Data problems, collected rather than raised one at a time.

Readers and validators append every problem they find to a :class:`Problems`
collector and raise one :class:`DataError` at the end, so that a partner fixing a
file sees the whole list at once instead of one traceback per attempt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file.

    ``file`` is the file's path as given, ``line`` the 1-based line (the header is
    line 1; for Parquet files, the 1-based row), ``field`` the column or key.
    """

    file: str
    message: str
    line: int | None = None
    field: str | None = None
    kind: str = "invalid"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        field = f" field '{self.field}':" if self.field else ""
        return f"{where}:{field} {self.message}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Problems:
    """An ordered collection of :class:`Problem` s."""

    def __init__(self) -> None:
        self._items: list[Problem] = []

    def add(
        self,
        file: object,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        kind: str = "invalid",
    ) -> None:
        self._items.append(Problem(str(file), message, line, field, kind))

    def extend(self, other: Problems) -> None:
        self._items.extend(other._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        """Raises every problem, each file's in line order (the checks find them in several passes)."""
        if self._items:
            raise DataError(sorted(self._items, key=lambda p: (p.file, p.line or 0)))


class DataError(Exception):
    """Raised with every problem found in a data folder."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(self.summary())

    def summary(self, *, per_kind: int = 20) -> str:
        """Human-readable list, at most ``per_kind`` lines for each kind of problem."""
        shown: Counter[str] = Counter()
        total: Counter[str] = Counter(p.kind for p in self.problems)
        lines = [f"{len(self.problems)} problem(s) found:"]
        for p in self.problems:
            shown[p.kind] += 1
            if shown[p.kind] <= per_kind:
                lines.append(f"  {p}")
        for kind, n in total.items():
            if n > per_kind:
                lines.append(f"  ... and {n - per_kind} more '{kind}' problem(s) (use --json for all)")
        return "\n".join(lines)
