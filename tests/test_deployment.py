"""A deployment: a real SuperLink and one SuperNode per partner, on 127.0.0.1, over TLS, with SuperNode
authentication; runs started by ``flwr run`` (the processes: :mod:`tests.deployment`).

What a partner organisation runs (docs/deployment.md): its SuperNode
serves run after run from one ``state-dir``, and its privacy account caps them
together; a partner whose machine goes down in the middle of a round rejoins, and
its account still counts the round it lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from shared.cli import main as cli_main
from shared.data.synthetic import SyntheticConfig, generate
from shared.federation.scenario import ACCOUNT_FILE
from shared.flower_run import PROJECT
from shared.privacy import account, ledger
from shared.privacy.report import build_report
from tests.deployment import Deployment, write_supernode_key
from tests.processes import descendants, is_loopback, wait_for_exit


def node_config(root: Path, name: str, *more: str) -> str:
    """A partner's node config: its data, its private folder, its own cap."""
    return " ".join([f"data-path='{root / 'data' / name}'", f"state-dir='{root / 'partners' / name}'", "max-epsilon=8", *more])


def write_partner_list(path: Path, node_ids: dict[str, int]) -> Path:
    """The coordinator's list: each partner's name bound to the node id its key was registered under."""
    path.write_text("[partners]\n" + "".join(f'"{name}" = "{node}"\n' for name, node in node_ids.items()))
    return path


@pytest.mark.slow
def test_supernodes_serve_run_after_run_within_their_lifetime_budget(tmp_path: Path) -> None:
    generate(tmp_path / "data", SyntheticConfig(domains=2, users=150, items=80, seed=0))
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    before = descendants()
    with Deployment(tmp_path) as deployment:
        for name in names:
            deployment.register(name)
            # the first sends none of the statistics no epsilon covers
            deployment.start_supernode(name, node_config(tmp_path, name, *(["withhold-metrics=true"] if name == names[0] else [])))
        node_ids = deployment.node_ids
        partners_file = write_partner_list(tmp_path / "partners.toml", node_ids)
        # a SuperNode whose key the coordinator never registered is refused
        write_supernode_key(tmp_path / "tls" / "stranger")
        stranger = deployment.start_supernode("stranger", node_config(tmp_path, "stranger"), "--max-retries=2")
        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "supernode-stranger.log").read_text()
        for run_id in ("first", "second"):  # the second run finds the partners' lifetime budget spent
            config = {
                "rounds": 2,
                "min-partners": 2,
                "batch-size": 64,
                "runs-dir": str(tmp_path / "runs"),
                "run-id": run_id,
                "partners-file": str(partners_file),
            }
            deployment.run(config, log=tmp_path / f"flwr-run-{run_id}.log")
    assert deployment.listened and all(is_loopback(a) for a in deployment.listened), deployment.listened
    assert not deployment.left_behind and not wait_for_exit(before), "a Flower process was left behind"

    runs = tmp_path / "runs"
    for name in names:
        own = tmp_path / "partners" / name
        # each run's private state in its own folder; the coordinator's ledger copy is the partner's, byte for byte
        assert (runs / "first" / "ledger" / f"{name}.jsonl").read_bytes() == (own / "runs" / "first" / "ledger.jsonl").read_bytes()
        first = ledger.verify(own / "runs" / "first" / "ledger.jsonl")
        assert first.ok and [e["status"] for e in first.entries] == ["trained", "trained"] and 7.9 < first.epsilon <= 8.0
        second = ledger.verify(own / "runs" / "second" / "ledger.jsonl")
        assert [e["status"] for e in second.entries] == ["declined", "declined"] and second.epsilon == 0.0
        assert "too little is left of this partner's lifetime epsilon 8 over 2 run(s)" in second.entries[0]["note"]
        entries = account.read(own / ACCOUNT_FILE)
        assert [(x["run"], x["round"]) for x in entries] == [("first", 1), ("first", 2)]
        assert cli_main(["privacy", "account", str(own / ACCOUNT_FILE)]) == 0
    # the partner's fine-tune after the federation starts from its latest run that trained
    tuned = tmp_path / "finetuned"
    own = tmp_path / "partners" / names[0]
    assert (
        cli_main(["finetune", "--state-dir", str(own), "--data", str(tmp_path / "data" / names[0]), "--out", str(tuned), "--epochs", "1"])
        == 0
    )
    assert json.loads((tuned / "metrics.json").read_text())["from"]["run_id"] == "first"
    rows = [json.loads(line) for line in (runs / "second" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["declined"] for r in rows) and {r["partner"] for r in rows} == set(names)
    first_rows = [json.loads(line) for line in (runs / "first" / "metrics.jsonl").read_text().splitlines()]
    for row in first_rows:  # the withholding partner's statistics are not on the coordinator's record; the other's are
        withheld = row["partner"] == names[0]
        assert row["withheld"] == withheld and (row["test_ndcg@10"] is None) == withheld and (row["loss"] is None) == withheld
        assert 0 < row["epsilon"] <= 8.0  # DP-covered: sent either way
    kept = (tmp_path / "partners" / names[0] / "runs" / "first" / "own-metrics.jsonl").read_text().splitlines()
    assert len(kept) == 4 and all(json.loads(line)["round"] in (1, 2) for line in kept)  # train and evaluate, 2 rounds
    for run_id in ("first", "second"):  # every row under the name its node was registered with, and the run says so
        rows = [json.loads(line) for line in (runs / run_id / "metrics.jsonl").read_text().splitlines()]
        assert {(r["partner"], r["node_id"]) for r in rows} == set(node_ids.items())
        names_record = json.loads((runs / run_id / "summary.json").read_text())["partner_names"]
        assert names_record["bound_by"] == "partners-file" and names_record["partners"] == {str(n): p for p, n in node_ids.items()}


@pytest.mark.slow
def test_a_partner_whose_machine_goes_down_while_training_rejoins_and_its_account_counts_the_lost_round(tmp_path: Path) -> None:
    """A crash between the round's reservation in the privacy account and its ledger line: the round
    goes on without the partner, a restart policy brings it back, and what it reserved stays spent."""
    generate(tmp_path / "data", SyntheticConfig(domains=2, users=1000, items=300, seed=0))  # a round long enough to crash in
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    crashed, other = names
    own = tmp_path / "partners" / crashed
    run_ledger = own / "runs" / "crash" / "ledger.jsonl"
    before = descendants()
    with Deployment(tmp_path) as deployment:
        for name in names:
            deployment.register(name)
            deployment.start_supernode(name, node_config(tmp_path, name))
        config = {
            "rounds": 2,
            "min-partners": 2,
            "runs-dir": str(tmp_path / "runs"),
            "run-id": "crash",
            "partners-file": str(write_partner_list(tmp_path / "partners.toml", deployment.node_ids)),
        }
        run = deployment.flwr_run(config, log=tmp_path / "flwr-run.log")
        while not (own / ACCOUNT_FILE).is_file() or not (own / ACCOUNT_FILE).read_text():  # round 1 reserved: it trains now
            assert run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-3000:]
            time.sleep(0.02)
        deployment.crash(crashed)
        assert not run_ledger.exists(), "the partner finished its round before the crash: the test needs more users"
        # As a restart policy would (docker/compose.yaml: restart: unless-stopped): start it again whenever it
        # stops. Until the SuperLink has found the crashed node offline (two missed heartbeats, about a minute),
        # it refuses the node's key (Flower's exit code 305). The round ends with the other partner: the SuperLink
        # answers for the crashed node, or, where the restart came before its answer was pulled, the server (server.round_wait).
        starts, deadline = 0, time.monotonic() + 600  # it takes about 3 minutes; a round waiting out Flower's hour fails here
        while run.poll() is None:
            assert time.monotonic() < deadline, "the run did not finish in 10 minutes:\n" + (tmp_path / "flwr-run.log").read_text()[-3000:]
            if deployment.supernodes[crashed].poll() is not None:
                time.sleep(2)
                deployment.start_supernode(crashed, node_config(tmp_path, crashed))
                starts += 1
            deployment.note_listening()
            time.sleep(0.5)
        assert run.returncode == 0 and starts >= 1, (tmp_path / "flwr-run.log").read_text()[-3000:]
    assert deployment.listened and all(is_loopback(a) for a in deployment.listened), deployment.listened
    assert not deployment.left_behind and not wait_for_exit(before), "a Flower process was left behind"

    runs = tmp_path / "runs" / "crash"
    rows = {(r["round"], r["partner"]): r for r in map(json.loads, (runs / "metrics.jsonl").read_text().splitlines())}
    lost = rows[1, crashed]  # answered by the SuperLink (the node offline when pulled) or by the server (the node back already)
    assert lost["failed"] and lost["epsilon"] is None, lost
    assert "Node Unavailable" in lost["note"] or "SuperNode activated again after it received this instruction" in lost["note"], lost
    assert not rows[1, other]["failed"] and rows[1, other]["steps"] > 0  # round 1 went on with the other partner
    assert all(not rows[2, name]["failed"] and rows[2, name]["steps"] > 0 for name in names)  # and round 2 with both
    assert json.loads((runs / "summary.json").read_text())["rounds"] == 2

    spent = ledger.verify(run_ledger)  # the crashed round left no line; the round after it did
    assert spent.ok and [(e["round"], e["status"]) for e in spent.entries] == [(2, "trained")], spent.problems
    assert (runs / "ledger" / f"{crashed}.jsonl").read_bytes() == run_ledger.read_bytes()
    entries = account.read(own / ACCOUNT_FILE)
    assert [(x["run"], x["round"]) for x in entries] == [("crash", 1), ("crash", 2)]  # reserved before training: kept
    lifetime = account.summary(own / ACCOUNT_FILE)
    assert spent.epsilon < lifetime["epsilon"] <= 8.0  # the lost round counts: the account overstates, never understates
    assert cli_main(["privacy", "account", str(own / ACCOUNT_FILE)]) == 0
    report = build_report(run_ledger, account_path=own / ACCOUNT_FILE)  # what the partner's privacy officer reads
    life = report["partners"][0]["lifetime"]
    assert report["verified"] and life["this_run"] == ["crash"] and life["reserved_not_released"] == [1]
    survived = ledger.verify(tmp_path / "partners" / other / "runs" / "crash" / "ledger.jsonl")
    assert survived.ok and [e["round"] for e in survived.entries] == [1, 2] and 7.9 < survived.epsilon <= 8.0


def test_the_docker_files_hold_what_the_deployment_test_runs() -> None:
    """What CI can check of docker/ without a Docker daemon (docs/deployment.md says how the image was built and run)."""
    import yaml
    from flwr.common.config import parse_config_args

    from shared.federation.scenario import partner_from_node_config

    docker = PROJECT / "docker"
    admitted = {line[1:] for line in (PROJECT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for line in (docker / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            assert all((PROJECT / s).exists() for s in sources), line
            assert set(sources) <= admitted, f"{line}: .dockerignore keeps {set(sources) - admitted} out of the build context"
    services = yaml.safe_load((docker / "compose.yaml").read_text())["services"]
    superlink = services.pop("superlink")
    link = superlink["command"]
    assert link[0] == "flower-superlink" and "--isolation=subprocess" in link
    # as across organisations: TLS, and only registered SuperNodes (docker/make-keys.sh makes the keys)
    assert {"--ssl-ca-certfile=/keys/ca.pem", "--ssl-certfile=/keys/superlink.pem", "--ssl-keyfile=/keys/superlink.key"} <= set(link)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert _key_mounts(superlink) == {"ca.pem", "superlink.pem", "superlink.key"}
    assert services
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "flower-supernode" and "--superlink=superlink:9095" in command
        assert "--root-certificates=/keys/ca.pem" in command and "--insecure" not in command
        assert f"--auth-supernode-private-key=/keys/{name}" in command
        assert _key_mounts(service) == {"ca.pem", name}, f"{name} mounts keys other than the CA's certificate and its own"
        node_config = parse_config_args([next(c for c in command if c.startswith("--node-config=")).split("=", 1)[1]])
        spec = partner_from_node_config(node_config)  # every key known, data-path and state-dir given
        assert spec.max_epsilon is not None and spec.account is not None, name
        # each container mounts its data at /data: without its own name, every partner would be "data"
        assert spec.name == name, f"{name}: its node config names the partner {spec.name!r}"


def _key_mounts(service: dict[str, Any]) -> set[str]:
    """The files of docker/keys a compose service mounts, each checked read-only at /keys/<the same name>."""
    mounts = [volume.split(":") for volume in service["volumes"] if volume.startswith("./keys/")]
    assert all(len(m) == 3 and m[2] == "ro" and m[1] == "/keys/" + m[0].removeprefix("./keys/") for m in mounts), mounts
    return {m[0].removeprefix("./keys/") for m in mounts}
