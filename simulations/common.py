"""Helpers shared by the benchmark scripts: where the real data is, their common flags, table printing."""

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


def add_federation_flags(parser: argparse.ArgumentParser, *, local_epochs: int) -> None:
    """--rounds, --local-epochs and --batch-size: the run settings every experiment's federations share."""
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds of each federation (run setting rounds; default: 3)")
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=local_epochs,
        help=f"passes over a partner's users per round (run setting local-epochs; default: {local_epochs})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="expected users per step (run setting batch-size; Poisson under DP; default: 64)"
    )


def add_out_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", default=default, help=f"folder for what the script writes (default: {default})")


def add_domain_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """--domain: one folder of the real data (:func:`real_domain`)."""
    parser.add_argument("--domain", default=default, help=f"a folder of ../shared/data (default: {default})")


def add_scenario_flag(parser: argparse.ArgumentParser, default: str) -> None:
    """--scenario: the scenario file a script's federations run (:func:`read_scenario` checks it)."""
    parser.add_argument("--scenario", default=default, help=f"scenario file: each partner's data (default: {default})")


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
