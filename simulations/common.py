"""Helpers shared by the benchmark scripts: where the real data is, table printing."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from shared.federation.scenario import PartnerSpec, load_scenario

REAL_DATA = Path(os.environ.get("FEDXREC_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_domain(name: str) -> Path:
    folder = REAL_DATA / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: the benchmarks read ../shared/data (or set FEDXREC_REAL_DATA)")
    return folder


def read_scenario(parser: argparse.ArgumentParser, path: Path, *, flag: str = "--scenario") -> list[PartnerSpec]:
    """The partners of a scenario file; any problem in it is a usage error naming ``flag``, raised before
    anything runs (a scenario read only at the end of a long experiment would fail hours in)."""
    try:
        specs = load_scenario(path)
    except (OSError, ValueError) as err:
        parser.error(f"{flag}: {err}")
    withholding = [spec.name for spec in specs if spec.withhold_metrics]
    if withholding:  # every script here compares partners' scores, which these would not report
        parser.error(
            f"{flag}: {path}: partner(s) {', '.join(withholding)} withhold their scores (withhold-metrics = true), which this "
            "script compares; leave the key out of the scenario for experiments"
        )
    return specs


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def write_report(folder: Path, name: str, lines: list[str], data: object) -> None:
    """Prints a script's Markdown ``lines`` and writes them to ``folder/<name>.md``, its ``data`` to ``<name>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    write_json(folder / f"{name}.json", data)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    print(f"\nwrote {path}")
