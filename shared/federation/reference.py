"""Every run setting and every partner (node) setting, with its default and what it does.

Written from the definitions the code checks against (the help of each ``FederationSettings`` field and
``scenario.NODE_CONFIG``, whose help names each key's default), so that ``fedxrec settings`` and the reference tables in docs/federation.md say what a
run accepts. ``make docs`` writes the docs' copy (:func:`with_tables`) and a test keeps it equal to this output.
"""

from __future__ import annotations

import dataclasses
import textwrap

from shared.federation.scenario import NODE_CONFIG
from shared.federation.settings import FederationSettings, run_config_key

# The docs' copy of the tables sits between these two lines of docs/federation.md.
DOCS_START = "<!-- settings reference: written by `make docs` (fedxrec settings --write); tests/test_docs.py checks it -->"
DOCS_END = "<!-- end of settings reference -->"


def toml_literal(value: object) -> str:
    """A default as it is written in ``[tool.flwr.app.config]`` and in ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def run_settings() -> list[tuple[str, str, str]]:
    """(key, default as TOML, help) of every run setting, in the order ``[tool.flwr.app.config]`` lists them."""
    return [(run_config_key(f.name), toml_literal(f.default), str(f.metadata["help"])) for f in dataclasses.fields(FederationSettings)]


def as_text() -> str:
    """Both groups for a terminal: one key per line, its help after it."""
    lines = ['run settings ([tool.flwr.app.config]; flwr run . --run-config "key=value ..."):']
    lines += [f"  {key} = {default}\n{_wrapped(text)}" for key, default, text in run_settings()]
    lines += ["", 'partner settings (a SuperNode\'s --node-config "key=value ..."):']
    lines += [f"  {key}\n{_wrapped(text)}" for key, text in NODE_CONFIG.items()]
    return "\n".join(lines)


def _wrapped(text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False)


def _cell(text: str) -> str:
    """Help text as a table cell: a | would end the cell, and <run-id> would be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def as_markdown() -> str:
    """Both groups as two Markdown tables (what docs/federation.md holds between ``DOCS_START`` and ``DOCS_END``)."""
    lines = ["**Run settings** (`[tool.flwr.app.config]`):", "", "| key | default | what it does |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {_cell(text)} |" for key, default, text in run_settings()]
    lines += ["", "**Partner settings** (a SuperNode's `--node-config`):", "", "| key | what it does |", "|---|---|"]
    lines += [f"| `{key}` | {_cell(text)} |" for key, text in NODE_CONFIG.items()]
    return "\n".join(lines)


def with_tables(text: str, *, where: str) -> str:
    """``text`` (a Markdown page, ``where`` names it in errors) with the lines between ``DOCS_START`` and
    ``DOCS_END`` replaced by :func:`as_markdown`; everything else is kept byte for byte."""
    missing = [marker for marker in (DOCS_START, DOCS_END) if text.count(marker) != 1]
    if missing:
        raise ValueError(
            f"{where}: expected each of these lines exactly once, around the settings tables: "
            + "; ".join(f"{marker} (found {text.count(marker)})" for marker in missing)
        )
    head, rest = text.split(DOCS_START)
    if DOCS_END not in rest:
        raise ValueError(f"{where}: the line {DOCS_END} comes before {DOCS_START}; it must follow it")
    _, tail = rest.split(DOCS_END)
    if not (head == "" or head.endswith("\n")) or not (tail == "" or tail.startswith("\n")):
        raise ValueError(f"{where}: the settings reference markers must each be on a line of their own")
    return f"{head}{DOCS_START}\n{as_markdown()}\n{DOCS_END}{tail}"
