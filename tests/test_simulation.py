"""DP federations through Flower's real simulation engine (Ray): 3 partners for 2 rounds, and 6 partners sampled by half."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import flwr.supercore.telemetry as telemetry
import pytest
import torch

from client.partner import partner_data
from client.private_state import PRIOR_SCALE, read_kept_adapter
from server.run_folder import RunFolder
from shared.cli import main as cli_main
from shared.federation.scenario import PartnerSpec, scenario_partners
from shared.flower_run import flower_scripts, simulation_env
from shared.privacy import ledger
from shared.training import PRIOR_SCALES
from simulations import compare_runs
from simulations.federations import federated_model, popularity
from simulations.runner import simulate as run_federation
from tests.browser import assert_page_shows_every_partner
from tests.processes import adopt_orphans, descendants, is_loopback, listening_addresses, niceness, wait_for_exit


def simulate(run_config: dict[str, object], *, partners: int = 3) -> tuple[set[str], set[int]]:
    """Runs the simulation; returns every address our process tree listened on meanwhile,
    and the niceness seen on the Ray workers that ran the partners."""
    seen: set[str] = set()
    worker_niceness: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            ours = descendants() | {os.getpid()}
            seen.update(listening_addresses(ours))
            worker_niceness.update(niceness(ours, named="ray::ClientAppActor").values())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_federation(run_config, partners=partners)
    finally:
        done.set()
        watcher.join()
    return seen, worker_niceness


def test_compare_names_what_is_not_a_finished_run(tmp_path: Path) -> None:
    spec = PartnerSpec("books", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"nope: not a run folder \(no config.json\)"):
        compare_runs.compare(spec, run=tmp_path / "nope", baseline=tmp_path / "nope")
    run = tmp_path / "run"
    (run / "partners" / "games").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no partner 'books' took part in this run \(partners: \['games'\]\)"):
        compare_runs.compare(spec, run=run, baseline=run)


def test_compare_names_a_partner_the_scenario_lacks(books_and_games: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        compare_runs.main(["--scenario", str(books_and_games), "--run", "r", "--baseline", "b", "--partners", "books", "gear"])
    assert "--partners ['gear'] not in" in capsys.readouterr().err


def test_every_simulation_runs_flower_without_telemetry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    env = simulation_env(tmp_path / "home", tmp_path / "ray")  # make demo's and the experiment scripts' flwr run
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_HOME"] == str(tmp_path / "home")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # a user who chose to send it
    assert simulation_env(tmp_path / "home", tmp_path / "ray")["FLWR_TELEMETRY_ENABLED"] == "1"


def test_flowers_log_lines_are_printed_once_though_opacus_configures_the_root_logger() -> None:
    # importing opacus gives the root logger a handler (logging.basicConfig); Flower's lines must not reach it
    code = "import {first}; import opacus; from flwr.common.logger import log; log(20, 'one line')"
    counts = []
    for first in ("shared", "sys"):  # sys: without fedxrec's package, Flower's logger propagates
        done = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True, check=True, timeout=120)
        counts.append((done.stdout + done.stderr).count("one line"))
    assert counts == [1, 2]


def test_an_experiment_run_config_is_checked_before_flower_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown run-config key 'rouns'; did you mean 'rounds'\?"):
        run_federation({"runs-dir": str(tmp_path), "run-id": "r", "rouns": 2}, partners=2)
    with pytest.raises(ValueError, match="the run config needs run-id, so that the run folder is known"):
        run_federation({"runs-dir": str(tmp_path)}, partners=2)
    assert not any(tmp_path.iterdir())


def test_a_leak_check_sees_a_process_whose_parent_has_exited() -> None:
    # flwr run starts its local SuperLink detached; what outlives its parent must still count as ours
    adopt_orphans()
    before = descendants()
    shell = subprocess.run(["sh", "-c", "sleep 30 > /dev/null 2>&1 & echo $!"], check=True, capture_output=True, text=True)
    try:  # sh has exited; its sleep lives on
        assert descendants() - before == {int(shell.stdout)}
    finally:
        for pid in descendants() - before:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # now our child: reap it


def test_flowers_commands_are_found_on_path_where_they_are_not_beside_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # pip install --user or --target puts flwr apart from the interpreter
    python, scripts = tmp_path / "venv" / "bin" / "python3", tmp_path / "scripts"
    python.parent.mkdir(parents=True)
    scripts.mkdir()
    (scripts / "flwr").write_text("#!/bin/sh\n")
    (scripts / "flwr").chmod(0o755)
    monkeypatch.setattr("sys.executable", str(python))
    monkeypatch.setenv("PATH", str(scripts))
    assert flower_scripts() == scripts
    assert simulation_env(tmp_path / "home", tmp_path / "ray")["PATH"].startswith(f"{scripts}{os.pathsep}")

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # nowhere: named before anything starts
    assert cli_main(["demo", "--out", str(tmp_path / "runs"), "--rounds", "1"]) != 0
    err = capsys.readouterr().err
    assert f"Flower's `flwr` command is neither beside this Python ({python}) nor on PATH" in err and "make install" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("simulation_processes")
def test_dp_federation_writes_a_complete_run_folder(tmp_path: Path) -> None:
    before = descendants()
    # calibrate-prior (scoring only): the comparisons below must score the models as the partners did
    config = {
        "rounds": 2,
        "runs-dir": str(tmp_path / "runs"),
        "run-id": "ci",
        "batch-size": 128,
        "target-epsilon": 8.0,
        "calibrate-prior": True,
    }
    addresses, worker_niceness = simulate(config)
    run = tmp_path / "runs" / "ci"

    assert json.loads((run / "config.json").read_text())["rounds"] == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["flwr"] == "1.41.0" and len(manifest["encoder_fingerprint"]) == 64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["partner"]) for r in rows) == [(r, p) for r in (1, 2) for p in ("books", "games", "gear")]
    for row in rows:
        assert 0 < row["epsilon"] <= 8.0 * 1.011 and row["delta"] > 0 and row["noise_multiplier"] > 0
        assert row["steps"] > 0 and row["num_examples"] > 0 and row["declined"] is False
        assert row["test_ndcg@10"] > 0 and row["valid_recall@10"] > 0
        assert row["bytes_sent"] == row["bytes_received"] <= 0.01 * 90_852_864
    for name in ("books", "games", "gear"):
        copy = run / "ledger" / f"{name}.jsonl"
        check = ledger.verify(copy)
        assert check.ok, check.problems
        assert [e["round"] for e in check.entries] == [1, 2] and check.entries[1]["epsilon"] > check.entries[0]["epsilon"]
        assert copy.read_bytes() == (run / "partners" / name / "ledger.jsonl").read_bytes()  # the partner's own, verbatim
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["round-1.safetensors", "round-2.safetensors"]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["partners"]) == {"books", "games", "gear"}
    assert all(p["ledger_head"]["lines"] == 2 for p in summary["partners"].values())
    assert "| books |" in (run / "summary.md").read_text()
    # each partner keeps the last global adapter, the model the experiment scripts score
    last = RunFolder(run).adapter(2)
    for name in ("books", "games", "gear"):
        kept, head = federated_model(run, name)
        assert head and kept.keys() == last.keys() and all(torch.equal(kept[k], last[k]) for k in last)
        assert float(read_kept_adapter(run / "partners" / name)[1][PRIOR_SCALE]) in PRIOR_SCALES
    # the paired comparison scores the very models the run reported; a run against itself differs by nothing
    reported = {r["partner"]: r for r in rows if r["round"] == 2}
    spec_of = {s.name: s for s in scenario_partners("synthetic", root=tmp_path / "runs" / "_data", n_partners=3)}
    for spec in spec_of.values():
        row = compare_runs.compare(spec, run=run, baseline=run)
        assert row["test"]["run"] == pytest.approx(reported[spec.name]["test_ndcg@10"])
        assert row["valid"]["run"] == pytest.approx(reported[spec.name]["valid_ndcg@10"])
        assert row["test"]["difference"] == 0 and row["kept"] == {"model": "baseline", "test": row["test"]["baseline"]}
        # every item of the generated domains is in some training sequence: no user's target is new
        with pytest.raises(ValueError, match=rf"partner '{spec.name}': {{'valid': 0, 'test': 0}} users whose target is a new item"):
            compare_runs.compare(spec, run=run, baseline=run, targets="new")
        seen = compare_runs.compare(spec, run=run, baseline=run, targets="seen")  # so every user's target is a seen item
        assert seen["test"] == row["test"]
        # the experiment tables' second training-free row: the partner's most frequent training items
        baseline = popularity(spec)
        assert 0 < baseline["ndcg@10"] <= baseline["recall@10"] <= 1 and baseline["epsilon"] is None
    books = partner_data(spec_of["books"], max_len=50).split
    assert popularity(spec_of["books"], users=books) == popularity(spec_of["books"])
    fewer = dataclasses.replace(books, item_ids=books.item_ids[:-1], item_texts=books.item_texts[:-1])
    with pytest.raises(ValueError, match=rf"partner 'books': {books.n_items - 1} items to score against its catalogue of {books.n_items}"):
        popularity(spec_of["books"], users=fewer)
    with pytest.raises(ValueError, match="partner 'books' has no max-users"):
        compare_runs.compare(spec_of["books"], run=run, baseline=run, other_users=True)

    # resuming a finished run trains nothing more; raising rounds continues at round 3,
    # where each partner's budget (planned for 2 rounds) makes it decline; gear's private
    # state was damaged on its disk meanwhile: its ClientApp raises, and the run goes on
    (run / "partners" / "gear" / "state.pt").write_bytes(b"not a state")
    simulate({**config, "rounds": 3})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    third = {r["partner"]: r for r in rows if r["round"] == 3}
    assert sorted(third) == ["books", "games", "gear"]
    for name in ("books", "games"):
        assert third[name]["declined"] and "declined round 3" in third[name]["note"]
        assert ledger.verify(run / "ledger" / f"{name}.jsonl").entries[-1]["status"] == "declined"
    gear = third["gear"]
    assert gear["failed"] and not gear["declined"] and not gear["steps"]
    cause = f"ValueError: {run / 'partners' / 'gear' / 'state.pt'}: this partner's private state cannot be read"
    # in the partner's own words (not Ray's traceback), under its name: this ServerApp had not seen its node before
    assert (
        gear["note"].startswith(f"the partner's update failed: {cause}") and f"; the partner's evaluation failed: {cause}" in gear["note"]
    )
    assert ledger.verify(run / "ledger" / "gear.jsonl").entries[-1]["round"] == 2  # it spent nothing in round 3
    assert json.loads((run / "summary.json").read_text())["partners"]["gear"]["rounds_failed"] == 1

    # the privacy officer's report of this run, rendered by a real browser
    report_dir = tmp_path / "report"
    assert cli_main(["privacy", "report", str(run), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["verified"] and report["anchored"]
    assert [p["rounds_declined"] for p in report["partners"]] == [[3], [3], []]
    assert_page_shows_every_partner(report_dir / "report.html", ["books", "games", "gear"], tmp_path)

    assert addresses and all(is_loopback(a) for a in addresses), addresses
    # nor does anything go to Flower's telemetry: it reads its switch once, on import, and shared/__init__.py set it first
    assert telemetry.FLWR_TELEMETRY_ENABLED == "0" and os.environ["FLWR_TELEMETRY_ENABLED"] == "0"  # the Ray workers' too
    # the partners train at this process's priority, not Ray's default nice 15
    assert worker_niceness and max(worker_niceness) <= os.getpriority(os.PRIO_PROCESS, 0), worker_niceness
    leftover = wait_for_exit(before)
    assert not leftover, f"processes left behind: {leftover}"


@pytest.mark.slow
@pytest.mark.usefixtures("simulation_processes")
def test_many_partners_on_generated_data_and_a_sample_of_them_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six partners (the five kinds of generated catalogue, then books-2), half of them trained in the round."""
    before = descendants()
    monkeypatch.delenv("FLWR_HOME", raising=False)  # Flower's default home would be ~/.flwr: the runner keeps its own
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    flower_homes = set(Path("/tmp").glob("fedxrec-flwr-*"))
    config = {"rounds": 1, "fraction-train": 0.5, "runs-dir": str(tmp_path / "runs"), "run-id": "six", "batch-size": 128}
    addresses, _ = simulate(config, partners=6)
    assert not (tmp_path / "home" / ".flwr").exists() and set(Path("/tmp").glob("fedxrec-flwr-*")) == flower_homes
    run = tmp_path / "runs" / "six"
    rows = {r["partner"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["books", "books-2", "games", "gear", "kids", "music-store"]
    trained = sorted(name for name, r in rows.items() if r.get("epsilon") is not None)
    idle = sorted(set(rows) - set(trained))
    assert len(trained) == 3 and all(rows[n]["steps"] > 0 for n in trained)
    assert all(rows[n]["note"] == "not sampled this round" and rows[n]["test_ndcg@10"] > 0 for n in idle)  # scored all the same
    assert sorted(p.stem for p in (run / "ledger").iterdir()) == trained
    report_dir = tmp_path / "report"
    assert cli_main(["privacy", "report", str(run), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["verified"] and sorted(p["partner"] for p in report["partners"]) == trained
    assert report["released_nothing"] == idle
    assert addresses and all(is_loopback(a) for a in addresses), addresses
    assert not wait_for_exit(before)
