"""The run folder ``runs/<run-id>/``: everything a run leaves behind, and how it resumes.

::

    config.json                 the resolved run settings
    manifest.json               package versions, encoder and data fingerprints, seeds, git commit (as the run
                                began; each resume adds its time, commit and versions under "resumed")
    metrics.jsonl               one line per round per partner (training and evaluation)
    ledger/<partner>.jsonl      each partner's hash-chained privacy ledger lines as it sent them (shared.privacy.ledger)
    adapter/round-<N>.safetensors   the global adapter after round N
    summary.md, summary.json    final per-partner results
    partners/<name>/            simulation only: each simulated partner's private state folder
                                (head, optimizer, accountant); a deployed partner keeps its own

A run resumes from its last saved round: the newest ``adapter/round-N`` is the
starting point and rounds N+1 ... are run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.federation.settings import FederationSettings
from shared.json_files import read_json_object
from shared.privacy import ledger

PACKAGES = ("fedxrec", "flwr", "torch", "opacus", "transformers", "peft", "numpy", "pandas", "safetensors", "grpcio", "ray")


# The run-config keys a resumed run may change: more rounds (the first, which may only grow); other
# hardware; other waits; fewer partners after one is gone (no partner plans its privacy on it).
MAY_CHANGE_ON_RESUME = ("rounds", "device", "round-timeout", "partners-timeout", "min-partners")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over a data folder's file names and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "adapter").mkdir(parents=True, exist_ok=True)
        (root / "ledger").mkdir(exist_ok=True)

    # ------------------------------------------------------------- start / resume
    @classmethod
    def open(cls, settings: FederationSettings) -> RunFolder:
        return cls(Path(settings.runs_dir) / settings.run_id)

    def last_round(self) -> int:
        rounds = [
            int(m.group(1))
            for p in (self.root / "adapter").glob("round-*.safetensors")
            if (m := re.fullmatch(r"round-(\d+)\.safetensors", p.name))
        ]
        return max(rounds, default=0)

    def adapter(self, server_round: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / "adapter" / f"round-{server_round}.safetensors"))

    def write_config(self, settings: FederationSettings) -> None:
        path = self.root / "config.json"
        if path.is_file():
            # a key the stored config lacks was added to fedxrec after the run began: its default is what the run used
            previous = {**FederationSettings().to_run_config(), **read_json_object(path, what="the run's resolved config")}
            changed = {
                k: (previous.get(k), v)
                for k, v in settings.to_run_config().items()
                if previous.get(k) != v and k not in MAY_CHANGE_ON_RESUME
            }
            if changed:
                *others, last = (f"'{k}'" for k in MAY_CHANGE_ON_RESUME[1:])
                raise ValueError(
                    f"run {self.root} exists with other settings {changed}; resume with the same settings (only 'rounds' may "
                    f"grow, and {', '.join(others)} and {last} change) or choose another run-id"
                )
        path.write_text(json.dumps(settings.to_run_config(), indent=2))

    def write_manifest(
        self, *, settings: FederationSettings, encoder_fingerprint: str, data: dict[str, Path], names: dict[str, Any] | None = None
    ) -> None:
        """Writes ``manifest.json`` when the run begins. A resume keeps what the run began with and
        adds itself under ``"resumed"`` (when, which commit, which packages); it is refused where the
        encoder or a partner's data is not what the run began with, as its rounds would then mix two
        experiments under one run id."""
        versions: dict[str, str | None] = {}
        for name in PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        fingerprints = {name: folder_fingerprint(path) for name, path in data.items() if path.is_dir()}
        now: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": versions,
            "git_commit": git_commit(),
            "encoder_fingerprint": encoder_fingerprint,
            "data_fingerprints": fingerprints,
            "seeds": {"adapter_init": settings.seed, "local_sampling": f"seed * 100003 + round ({settings.seed} * 100003 + r)"},
            "partner_names": names or SELF_DECLARED,  # the coordinator's list as read when the run started or resumed
        }
        path = self.root / "manifest.json"
        if not path.is_file():
            path.write_text(json.dumps(now, indent=2))
            return
        began = read_json_object(path, what="the run's manifest")
        changed = []
        if began.get("encoder_fingerprint", encoder_fingerprint) != encoder_fingerprint:
            changed.append(f"the encoder (fingerprint {began['encoder_fingerprint'][:12]}... then, {encoder_fingerprint[:12]}... now)")
        for name, fingerprint in fingerprints.items():
            then = began.get("data_fingerprints", {}).get(name, fingerprint)
            if then != fingerprint:
                changed.append(f"the data of partner {name!r} in {data[name]} (fingerprint {then[:12]}... then, {fingerprint[:12]}... now)")
        if changed:
            raise ValueError(
                f"run {self.root} began with other inputs: {'; '.join(changed)}. Resume it with the encoder and data it began "
                "with, or choose another run-id"
            )
        resume = {k: now[k] for k in ("created", "python", "platform", "packages", "git_commit")}
        path.write_text(
            json.dumps({**began, "partner_names": now["partner_names"], "resumed": [*began.get("resumed", []), resume]}, indent=2)
        )

    # ------------------------------------------------------------- per round
    def save_adapter(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(self.root / "adapter" / f"round-{server_round}.safetensors"))

    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        with (self.root / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    def ledger_path(self, partner: str) -> Path:
        return self.root / "ledger" / ledger_file_name(partner)

    def copy_ledger(self, partner: str, text: str) -> str:
        """Appends the lines of the partner's ledger (``text``, every line so far) that the run's copy
        lacks, verbatim, so that the copy matches the partner's own file byte for byte; returns a note
        where the partner's ledger does not continue the copy, and then copies nothing.

        A copy lacks a line where the coordinator stopped after the partner wrote it and before the
        round ended: the partner's next reply brings it, before the line of the round run again."""
        path = self.ledger_path(partner)
        held = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []
        lines = [x for x in text.splitlines() if x.strip()]
        if lines[: len(held)] != held:
            return (
                f"its privacy ledger does not begin with the {len(held)} line(s) of the run's copy ledger/{path.name}: "
                "nothing of it was copied (a partner's ledger of one run only grows)"
            )
        for line in lines[len(held) :]:
            ledger.append_line(path, line)
        return ""

    def metrics(self) -> list[dict[str, Any]]:
        path = self.root / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    def name_holders(self) -> dict[str, int]:
        """Partner name -> the node that gave it in the run's last round with it (for a resumed run)."""
        return {row["partner"]: row["node_id"] for row in self.metrics() if "node_id" in row}

    # ------------------------------------------------------------- the end
    def write_summary(
        self, *, settings: FederationSettings, adapter_bytes: int, encoder_bytes: int, names: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``names``: who named the partners (``PartnerList.record()``); None: each partner itself."""
        names = names or SELF_DECLARED
        rows = self.metrics()
        partners: dict[str, dict[str, Any]] = {}
        for row in rows:
            p = partners.setdefault(row["partner"], {"rounds_trained": 0, "rounds_declined": 0, "rounds_rejected": 0, "rounds_failed": 0})
            if row.get("failed"):
                p["rounds_failed"] += 1
            elif row.get("rejected"):
                p["rounds_rejected"] += 1
            elif row.get("declined"):
                p["rounds_declined"] += 1
            elif row.get("steps"):
                p["rounds_trained"] += 1
            p["withheld"] = bool(row.get("withheld")) or p.get("withheld", False)
            for key in (
                "valid_ndcg@10",
                "valid_recall@10",
                "test_ndcg@10",
                "test_recall@10",
                "epsilon",
                "delta",
                "noise_multiplier",
                "global_weight",
            ):
                if row.get(key) is not None:
                    p[key] = row[key]
            p["last_round"] = row["round"]
        summary = {
            "run": self.root.name,
            "rounds": self.last_round(),
            "dp": settings.dp,
            "target_epsilon": settings.target_epsilon if settings.dp else None,
            "adapter_bytes_per_round": adapter_bytes,
            "encoder_bytes": encoder_bytes,
            "partner_names": names,
            "partners": partners,
        }
        for name, p in partners.items():  # which ledger is whose, and where it ends: truncation is caught against this
            if self.ledger_path(name).is_file():
                p["ledger_file"] = self.ledger_path(name).relative_to(self.root).as_posix()
                p["ledger_head"] = ledger.head_of(self.ledger_path(name)).to_dict()
        (self.root / "summary.json").write_text(json.dumps(summary, indent=2))
        mixed = settings.personal_mix != "off"  # each partner's model mixes the global adapter with its own
        # shown only where updates were left out: rejected by the server's check, or the partner's ClientApp failed
        left_out = [k for k in ("rejected", "failed") if any(p[f"rounds_{k}"] for p in partners.values())]
        lines = [
            f"# Run {self.root.name}",
            "",
            f"{summary['rounds']} rounds; DP {'on, target epsilon ' + format(settings.target_epsilon, 'g') if settings.dp else 'off'}; "
            + (f"aggregation {settings.aggregation}; " if settings.aggregation != "fedavg" else "")
            + f"adapter {adapter_bytes:,} bytes per round each way ({adapter_bytes / encoder_bytes:.2%} of the encoder's {encoder_bytes:,}).",
            "",
            f"Partner names: {ledger.names_line(names)}.",
            "",
            "| partner | test NDCG@10 | test Recall@10 | valid NDCG@10 | epsilon | delta | rounds trained | declined |"
            + "".join(f" {k} |" for k in left_out)
            + (" global weight |" if mixed else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" * (len(left_out) + mixed)),
        ]
        for name, p in partners.items():
            eps = "no DP" if not settings.dp else "-" if p.get("epsilon") is None else f"{p['epsilon']:.3f}"
            delta = "" if p.get("delta") is None else f"{p['delta']:.1e}"
            test_ndcg, test_recall, valid_ndcg = (quality_figure(p, key) for key in ("test_ndcg@10", "test_recall@10", "valid_ndcg@10"))
            lines.append(
                f"| {name} | {test_ndcg} | {test_recall} | {valid_ndcg} | {eps} | {delta} | {p['rounds_trained']} | {p['rounds_declined']} |"
                + "".join(f" {p[f'rounds_{k}']} |" for k in left_out)
                + (f" {p.get('global_weight', float('nan')):g} |" if mixed else "")
            )
        (self.root / "summary.md").write_text("\n".join(lines) + "\n")
        return summary


def quality_figure(record: dict[str, Any], key: str, *, missing: float = float("nan")) -> str:
    """A score of a metrics row or a summary's partner, to 4 places: "withheld" where the partner withholds
    its statistics (node config withhold-metrics), ``missing`` where there is none."""
    value = record.get(key)
    return "withheld" if value is None and record.get("withheld") else format(missing if value is None else value, ".4f")


SELF_DECLARED = {"bound_by": "self-declared"}


def ledger_file_name(partner: str) -> str:
    """The file of a partner's ledger copy under ``ledger/``: its name, with anything but letters, digits, '.', '_' and '-' as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", partner) + ".jsonl"
