"""The coordinator's list of partners: which SuperNode is which partner.

Without a list, a partner is named by its own reply (``domain`` in its node
config), so one partner could report under another's name. With SuperNode
authentication (``flower-superlink --enable-supernode-auth``) Flower fixes each
partner's node id to the key the coordinator registered, and prints that id
(``flwr supernode register <key>.pub <federation>``; ``flwr supernode list``
shows them again). The list binds each partner's name to that id::

    # partners.toml
    [partners]
    books = "12899461359462064038"   # in quotes: Flower's node ids go beyond TOML's integers
    games = "4085417313785291311"

Given as run config ``partners-file``, it makes the server
(:class:`server.strategy.PartnerFedAvg`) sample only listed SuperNodes (a
stranger never receives the adapter and does not count towards
``min-partners``) and record every reply under its node's listed name; a reply
that gives another name is left out of the round, with why. The run folder
records the list's SHA-256, so a privacy officer can tell whose ledger is whose
and on what authority. The file is read once, when a run starts or resumes.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.run_folder import ledger_file_name

MAX_NODE_ID = 2**64 - 1  # Flower's node ids are unsigned 64-bit
EXAMPLE = 'books = "12899461359462064038"'


class PartnerListError(ValueError):
    pass


@dataclass(frozen=True)
class PartnerList:
    path: Path
    sha256: str
    names: dict[int, str]  # node id -> partner name

    def name_of(self, node_id: int) -> str | None:
        return self.names.get(node_id)

    def record(self) -> dict[str, Any]:
        """What the run folder keeps of the list (summary.json, manifest.json); node ids as text, as JSON readers lose digits beyond 2**53."""
        return {
            "bound_by": "partners-file",
            "file": str(self.path),
            "sha256": self.sha256,
            "partners": {str(node): name for node, name in sorted(self.names.items())},
        }


def load_partner_list(path: str | Path) -> PartnerList:
    """Reads and checks the list; raises :class:`PartnerListError` naming every problem, with its line."""
    path = Path(path)
    if not path.is_file():
        raise PartnerListError(
            f"partners-file {str(path)!r} not found (run config 'partners-file': the coordinator's TOML list of partners, "
            f"[partners] then one line per partner such as {EXAMPLE}; a relative path is taken from the ServerApp's working folder)"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PartnerListError(f"{path}: not valid TOML: {err}") from err
    lines = text.splitlines()
    problems = [f"{path}{_line(lines, key)}: unknown key {key!r}; expected only the table [partners]" for key in raw if key != "partners"]
    table = raw.get("partners")
    if not isinstance(table, dict) or not table:
        problems.append(f"{path}: expected a [partners] table with one line per partner, such as {EXAMPLE}")
        table = {}
    names: dict[int, str] = {}
    files: dict[str, str] = {}
    for name, value in table.items():
        where = f"{path}{_line(lines, name)}"
        node = _node_id(value)
        if node is None:
            problems.append(
                f"{where}: {name} = {value!r}: expected the node id that 'flwr supernode register' printed for this partner's key, "
                f"a whole number from 1 to {MAX_NODE_ID}, in quotes ({EXAMPLE})"
            )
            continue
        if node in names:
            problems.append(f"{where}: node id {node} is listed for both {names[node]!r} and {name!r}; one SuperNode is one partner")
            continue
        file = ledger_file_name(name)
        if file in files:
            problems.append(f"{where}: {name!r} and {files[file]!r} would share the ledger copy ledger/{file}; rename one")
        files[file] = name
        names[node] = name
    if problems:
        raise PartnerListError("invalid partners-file:\n  " + "\n  ".join(problems))
    return PartnerList(path=path.resolve(), sha256=hashlib.sha256(data).hexdigest(), names=names)


def _node_id(value: object) -> int | None:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_NODE_ID:
        return value
    return None


def _line(lines: list[str], key: str) -> str:
    """' line N' for the line that sets ``key`` (bare or quoted), or nothing where it cannot be found."""
    pattern = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=|\s*\[\s*{re.escape(key)}\s*\]")
    for number, line in enumerate(lines, start=1):
        if pattern.match(line):
            return f" line {number}"
    return ""
