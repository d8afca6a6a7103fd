"""Which partners a simulation has: generated data, or a scenario file of real domains.

A scenario file (TOML), one ``[[partner]]`` table per simulated partner::

    [[partner]]
    name = "amazon2014-toy"                  # optional: default the folder's name; names partners/<name>
    data = "../shared/data/amazon2014-toy"   # relative to the scenario file; must exist
    max-epsilon = 8.0                        # optional: the partner's own cap
    max-delta = 1e-5                         # optional: default 1 / its users
    max-users = 300                          # optional: keep only the first N users (cold start)
    data-format = "tsv"                      # optional: default detected from the files
    privacy-account = "accounts/toy.jsonl"   # optional: makes max-epsilon a cap across runs

A deployed partner gives the same settings as its SuperNode's node config
(:data:`NODE_CONFIG`); both are checked by :func:`partner_options`, which lists
every problem at once. A scenario file holds nothing but ``[[partner]]`` tables.

Simulated partner ``i`` (Flower's ``partition-id``) is the i-th table.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.checks import is_finite_number, is_whole_number
from shared.data.readers import FORMATS
from shared.data.synthetic import SyntheticConfig, generate
from shared.device import DEVICES


@dataclass(frozen=True)
class PartnerSpec:
    name: str
    data: Path
    max_epsilon: float | None = None
    max_users: int | None = None
    # The count of users the partner declares public: its schedule, default delta and reported
    # example counts follow from it, not from its data. None: from its data (which they then reveal).
    public_users: int | None = None
    data_format: str | None = None  # None: detected from the files
    max_delta: float | None = None  # None: 1 / (the partner's users)
    account: Path | None = None  # the privacy account kept across runs (shared.privacy.account)
    device: str | None = None  # a deployed partner's own choice (node config); None: the run's
    withhold_metrics: bool = False  # send its loss and quality metrics as wire.WITHHELD, keeping them itself


# A deployed partner's node config (``flower-supernode --node-config "data-path='...' ..."``).
NODE_CONFIG = {
    "data-path": "the partner's data folder (required)",
    "data-format": f"one of {', '.join(FORMATS)} (default: detected from the files)",
    "domain": "the domain's public name (default: the data folder's name)",
    "max-epsilon": "the partner's own cap on epsilon, over every run on its data; it binds even if the server asks for more, "
    "and the partner declines rounds without DP (default: none, the run's target-epsilon alone)",
    "max-delta": "the largest delta the partner accepts (default: 1 / its users; a delta near that lets a mechanism "
    "reveal about one user in the clear)",
    "max-users": "train on the first N users only (default: all)",
    "public-users": "the number of users the partner declares public (say, rounded): its sample rate, steps, default "
    "delta and max-delta, and the example counts it reports follow from it instead of its data, so that DP covers its "
    "real count (default: none; they then reveal its approximate number of users)",
    "state-dir": "the partner's private folder (required): each run's head, optimizer, accountant and ledger in runs/<run-id>/, "
    "and its privacy account",
    "privacy-account": "the file that counts every run on this data, so that max-epsilon caps them together "
    "(default: privacy-account.jsonl in state-dir; name one file for several SuperNodes on the same data)",
    "device": f"where this partner trains and scores, one of {', '.join(DEVICES)} (default: the run's 'device'): "
    "its hardware is its own to choose, whatever the coordinator asks",
    "withhold-metrics": "true: send the coordinator none of the statistics computed without noise on this partner's users "
    "(each round's training loss, its valid/test NDCG@10 and Recall@10), which no epsilon covers; they are kept in "
    "its state folder (own-metrics.jsonl). Default false",
}
# The keys of NODE_CONFIG that name the partner's own files: its failures tell the coordinator these keys, not the paths
NODE_CONFIG_PATHS = ("data-path", "state-dir", "privacy-account")
SIMULATION_NODE_CONFIG = ("partition-id", "num-partitions")  # set by Flower's simulation engine
ACCOUNT_FILE = "privacy-account.jsonl"  # a deployed partner's default, in its state-dir
SCENARIO_KEYS = (
    "name",
    "data",
    "data-format",
    "max-epsilon",
    "max-delta",
    "max-users",
    "public-users",
    "privacy-account",
    "withhold-metrics",
)


def partner_options(values: dict[str, Any], *, known: tuple[str, ...], base: Path, where: str) -> tuple[dict[str, Any], list[str]]:
    """Checks a partner's optional settings (from a node config or a scenario table):
    returns ``PartnerSpec`` keyword arguments and every problem found, each naming ``where`` and the key."""
    problems = []
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {list(known)}"
            problems.append(f"{where}: unknown key {key!r}; {hint}")
    out: dict[str, Any] = {}
    numbers = (  # key, field, whole numbers only, valid, what is expected
        ("max-epsilon", "max_epsilon", False, lambda v: v > 0, "a finite number above 0"),
        ("max-delta", "max_delta", False, lambda v: 0 < v < 1, "a number in (0, 1)"),
        ("max-users", "max_users", True, lambda v: v >= 1, "a whole number of at least 1"),
        ("public-users", "public_users", True, lambda v: v >= 1, "a whole number of at least 1"),
    )
    for key, name, whole, valid, expected in numbers:
        value = values.get(key)
        if value is None:
            continue
        if not (is_whole_number(value) if whole else is_finite_number(value)) or not valid(value):
            problems.append(f"{where}: {key} must be {expected}, got {value!r}")
        else:
            out[name] = int(value) if whole else float(value)
    for key, name, choices in (("data-format", "data_format", FORMATS), ("device", "device", DEVICES)):
        value = values.get(key)
        if value is None:
            continue
        if value not in choices:
            problems.append(f"{where}: {key} must be one of {list(choices)}, got {value!r}")
        else:
            out[name] = str(value)
    withhold = values.get("withhold-metrics")
    if withhold is not None:
        if not isinstance(withhold, bool):  # a string "false" must not read as true
            problems.append(f"{where}: withhold-metrics must be true or false, got {withhold!r}")
        else:
            out["withhold_metrics"] = withhold
    account = values.get("privacy-account")
    if account is not None:
        if not isinstance(account, str) or not account:
            problems.append(f"{where}: privacy-account must be a file path, got {account!r}")
        elif (base / account).is_dir():
            problems.append(f"{where}: privacy-account {account!r} is a folder; expected a file (created on the first DP round)")
        else:
            out["account"] = (base / account).resolve()
    return out, problems


def partner_from_node_config(node_config: dict[str, Any]) -> PartnerSpec:
    """A deployed partner (node config ``data-path`` and the optional keys of :data:`NODE_CONFIG`)."""
    where = "node config"
    options, problems = partner_options(node_config, known=tuple(NODE_CONFIG), base=Path.cwd(), where=where)
    data, state = node_config.get("data-path"), node_config.get("state-dir")
    if not isinstance(data, str) or not data:
        problems.insert(0, f"{where}: data-path must be the partner's data folder, got {data!r}")
    if not isinstance(state, str) or not state:
        # else the state would go under the coordinator's runs-dir: a path the coordinator picks
        problems.append(
            f"{where}: state-dir must be the partner's private folder (its runs' state, ledgers and privacy account), got {state!r}"
        )
    if problems:
        raise ValueError("invalid node config:\n  " + "\n  ".join(problems))
    options.setdefault("account", (Path(str(state)) / ACCOUNT_FILE).resolve())
    path = Path(str(data))
    return PartnerSpec(str(node_config.get("domain") or path.name), path, **options)


def load_scenario(path: str | Path) -> list[PartnerSpec]:
    """Reads a scenario file; raises ValueError listing every problem, each naming its ``[[partner]]`` table and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scenario file {path} not found (run-config 'scenario' is 'synthetic' or a TOML file)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    partners, problems = [], []
    for key in raw:
        if key != "partner":  # a mistyped [[partners]] would otherwise drop its partners without a word
            problems.append(f"unknown top-level key {key!r}; a scenario holds only [[partner]] tables")
    tables = raw.get("partner")
    if not isinstance(tables, list) or not tables:
        problems.append("expected one or more [[partner]] tables")
        tables = []
    for i, t in enumerate(tables):
        where = f"[[partner]] #{i + 1}"
        if not isinstance(t, dict):
            problems.append(f"{where}: expected a table of settings, got {t!r}")
            continue
        options, found = partner_options(t, known=SCENARIO_KEYS, base=path.parent, where=where)
        problems += found
        if not isinstance(t.get("data"), str) or not t["data"]:
            problems.append(f"{where}: data must be the domain's data folder, got {t.get('data')!r}")
            continue
        data = (path.parent / t["data"]).resolve()
        if not data.is_dir():
            problems.append(f"{where}: data folder {data} not found (a relative path is read from the scenario file's folder)")
        name = t.get("name", data.name)
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            problems.append(f"{where}: name must be one folder name (it names the partner's folder partners/<name>), got {name!r}")
            continue
        partners.append(PartnerSpec(name, data, **options))
    names = [p.name for p in partners]
    if len(set(names)) != len(names):
        problems.append(f"partner names must be unique, got {names}")
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))
    return partners


def synthetic_scenario(root: Path, *, partners: int = 3, seed: int = 0) -> list[PartnerSpec]:
    """Generated domains under ``root`` (written once; the files are deterministic)."""
    if partners < 1:
        raise ValueError(f"scenario 'synthetic' needs at least 1 partner, and {partners} were asked for")
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


def supernodes_note(*, scenario: str, partners: int, supernodes: int) -> str | None:
    """In a simulation, simulated partner ``i`` is the scenario's ``i``-th entry: where the SuperNodes
    do not match the scenario's partners, what happens and what to run instead (None: they match)."""
    if scenario == "synthetic" or supernodes == partners:
        return None  # generated data: as many partners as SuperNodes
    fix = f'run it with --federation-config "num-supernodes={partners}"'
    if supernodes < partners:
        return (
            f"scenario {scenario} has {partners} partners, and {supernodes} SuperNodes are connected: in a simulation only the "
            f"first {supernodes} take part (Flower simulates 2 unless told otherwise); {fix}"
        )
    return (
        f"scenario {scenario} has {partners} partners, and {supernodes} SuperNodes are connected: in a simulation the "
        f"{supernodes - partners} beyond them have no entry and fail every round; {fix}"
    )


def scenario_partners(scenario: str, *, root: Path, n_partners: int, seed: int = 0) -> list[PartnerSpec]:
    if scenario == "synthetic":
        return synthetic_scenario(root, partners=n_partners, seed=seed)
    return load_scenario(scenario)
