"""A deployment: a real SuperLink and one SuperNode per partner, on 127.0.0.1, over TLS, with SuperNode
authentication; runs started by ``flwr run``.

What a partner organisation runs (README, "Deploying a partner"): its SuperNode
serves run after run from one ``state-dir``, and its privacy account caps them
together.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared.cli import main as cli_main
from shared.data.synthetic import SyntheticConfig, generate
from shared.federation.scenario import ACCOUNT_FILE
from shared.flower_run import PROJECT, _toml
from shared.privacy import account, ledger
from tests.processes import descendants, is_loopback, listening_addresses, wait_for_exit

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway certificate authority and the SuperLink's certificate for 127.0.0.1, signed by it:
    (CA certificate, server certificate, server key). A real coordinator uses its organisation's PKI."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, *, issuer: x509.Certificate | None, signer: ec.EllipticCurvePrivateKey
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        )
        if issuer is not None:  # the server: valid for 127.0.0.1, for TLS server authentication only
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("fedxrec test CA", ca_key, issuer=None, signer=ca_key)
    server = certificate("127.0.0.1", server_key, issuer=ca, signer=ca_key)
    folder.mkdir(parents=True)
    paths = folder / "ca.pem", folder / "superlink.pem", folder / "superlink.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def write_supernode_key(path: Path) -> Path:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``
    writes it): the private key at ``path``, the public key, which the coordinator registers, returned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    path.chmod(0o600)
    public = path.with_suffix(".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return public


def wait_healthy(port: int, process: subprocess.Popen[bytes], log: Path, *, ca: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    context = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower-superlink exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"flower-superlink not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_supernodes_serve_run_after_run_within_their_lifetime_budget(tmp_path: Path) -> None:
    generate(tmp_path / "data", SyntheticConfig(domains=2, users=150, items=80, seed=0))
    names = sorted(p.name for p in (tmp_path / "data").iterdir())
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    link = free_port()
    ca, certificate, key = write_tls_files(tmp_path / "tls")  # every connection below is TLS, as across organisations
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "partners"\n\n[superlink.partners]\naddress = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n'
    )
    before = descendants()
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))
        return processes[-1]

    seen: set[str] = set()
    node_ids: dict[str, int] = {}
    partners_file = tmp_path / "partners.toml"
    try:
        superlink = start(
            [
                str(BIN / "flower-superlink"),
                f"--ssl-ca-certfile={ca}",
                f"--ssl-certfile={certificate}",
                f"--ssl-keyfile={key}",
                "--enable-supernode-auth",  # only SuperNodes whose keys the coordinator registered may connect
                "--isolation=subprocess",
                "--host=127.0.0.1",
                f"--port={link}",
                f"--control-api-address=127.0.0.1:{free_port()}",
                f"--database={tmp_path / 'superlink.db'}",
            ],
            tmp_path / "superlink.log",
        )
        wait_healthy(link, superlink, tmp_path / "superlink.log", ca=ca)

        def supernode(name: str) -> list[str]:  # each partner: its data, its private folder, its own cap, its key
            node_config = f"data-path='{tmp_path / 'data' / name}' state-dir='{tmp_path / 'partners' / name}' max-epsilon=8"
            if name == names[0]:  # it sends none of the statistics no epsilon covers
                node_config += " withhold-metrics=true"
            return [
                str(BIN / "flower-supernode"),
                f"--root-certificates={ca}",
                f"--superlink=127.0.0.1:{link}",
                "--host=127.0.0.1",
                f"--port={free_port()}",
                f"--auth-supernode-private-key={tmp_path / 'tls' / name}",
                f"--node-config={node_config}",
            ]

        for name in names:
            public_key = write_supernode_key(tmp_path / "tls" / name)
            register = [str(BIN / "flwr"), "supernode", "register", str(public_key), "partners"]
            registered = subprocess.run(register, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
            found = re.search(r"SuperNode (\d+) registered successfully", registered.stdout)
            assert registered.returncode == 0 and found, registered.stdout + registered.stderr
            node_ids[name] = int(found.group(1))
            start(supernode(name), tmp_path / f"supernode-{name}.log")
        # the coordinator's list binds each partner's name to the node id its key was registered under
        partners_file.write_text("[partners]\n" + "".join(f'"{name}" = "{node}"\n' for name, node in node_ids.items()))
        # a SuperNode whose key the coordinator never registered is refused
        write_supernode_key(tmp_path / "tls" / "stranger")
        stranger = start([*supernode("stranger"), "--max-retries=2"], tmp_path / "supernode-stranger.log")
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
            command = [str(BIN / "flwr"), "run", str(PROJECT), "partners", "--stream", "--run-config"]
            result = subprocess.run(
                [*command, " ".join(f"{k}={_toml(v)}" for k, v in config.items())],
                env=env,
                cwd=PROJECT,
                capture_output=True,
                timeout=600,
            )
            seen |= listening_addresses(descendants() | {os.getpid()})
            assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-3000:]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert seen and all(is_loopback(a) for a in seen), seen
    assert not wait_for_exit(before), "a Flower process was left behind"

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


def test_the_docker_files_hold_what_the_deployment_test_runs() -> None:
    """What CI can check of docker/ without a Docker daemon (README says how the image was built and run)."""
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
    link = services.pop("superlink")["command"]
    assert link[0] == "flower-superlink" and "--isolation=subprocess" in link
    assert services
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "flower-supernode" and "--superlink=superlink:9095" in command
        node_config = parse_config_args([next(c for c in command if c.startswith("--node-config=")).split("=", 1)[1]])
        spec = partner_from_node_config(node_config)  # every key known, data-path and state-dir given
        assert spec.max_epsilon is not None and spec.account is not None, name
        # each container mounts its data at /data: without its own name, every partner would be "data"
        assert spec.name == name, f"{name}: its node config names the partner {spec.name!r}"
