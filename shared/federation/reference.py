"""Every run setting and every partner (node) setting, with its default and what it does.

Written from the definitions the code checks against (the help of each ``FederationSettings`` field and
``scenario.NODE_CONFIG``, whose help names each key's default), so that ``fedxrec settings`` and the reference tables in docs/federation.md say what a
run accepts, and a test keeps the docs' copy equal to this output.
"""

from __future__ import annotations

import dataclasses
import textwrap

from shared.federation.scenario import NODE_CONFIG
from shared.federation.settings import FederationSettings, run_config_key

# The docs' copy of the tables sits between these two lines of docs/federation.md.
DOCS_START = "<!-- settings reference: written by `fedxrec settings --markdown`; tests/test_docs.py checks it -->"
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
