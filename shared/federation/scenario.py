"""Which partners a simulation has: generated data, or a scenario file of real domains.

A scenario file (TOML), one ``[[partner]]`` table per simulated partner::

    [[partner]]
    name = "amazon2014-toy"                  # optional: default the folder's name
    data = "../shared/data/amazon2014-toy"   # relative to the scenario file
    max-epsilon = 8.0                        # optional: the partner's own cap
    max-users = 300                          # optional: keep only the first N users (cold start)

Simulated partner ``i`` (Flower's ``partition-id``) is the i-th table.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shared.data.synthetic import SyntheticConfig, generate


@dataclass(frozen=True)
class PartnerSpec:
    name: str
    data: Path
    max_epsilon: float | None = None
    max_users: int | None = None


def load_scenario(path: str | Path) -> list[PartnerSpec]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} not found (run-config 'scenario' is 'synthetic' or a TOML file)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    partners, problems = [], []
    tables = raw.get("partner")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{path}: expected one or more [[partner]] tables")
    for i, t in enumerate(tables):
        unknown = set(t) - {"name", "data", "max-epsilon", "max-users"}
        if unknown:
            problems.append(f"[[partner]] #{i + 1}: unknown key(s) {sorted(unknown)}; expected name, data, max-epsilon, max-users")
        if "data" not in t:
            problems.append(f"[[partner]] #{i + 1}: missing key 'data' (the domain's data folder)")
            continue
        data = (path.parent / t["data"]).resolve()
        partners.append(PartnerSpec(t.get("name", data.name), data, t.get("max-epsilon"), t.get("max-users")))
    names = [p.name for p in partners]
    if len(set(names)) != len(names):
        problems.append(f"partner names must be unique, got {names}")
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))
    return partners


def synthetic_scenario(root: Path, *, partners: int = 3, seed: int = 0) -> list[PartnerSpec]:
    """Generated domains under ``root`` (written once; the files are deterministic)."""
    config = SyntheticConfig(domains=partners, seed=seed)
    folder = root / f"synthetic-{partners}-{seed}"
    if not (folder / ".complete").is_file():
        tmp = root / f".synthetic-{partners}-{seed}.{id(config)}"
        generate(tmp, config)
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(folder)
        except OSError:  # another partner process won the race; its files are identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return [PartnerSpec(p.name, p) for p in sorted(folder.iterdir()) if p.is_dir()]


def scenario_partners(scenario: str, *, root: Path, n_partners: int, seed: int = 0) -> list[PartnerSpec]:
    if scenario == "synthetic":
        return synthetic_scenario(root, partners=n_partners, seed=seed)
    return load_scenario(scenario)
