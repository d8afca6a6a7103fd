"""A coordinator and its partners as real processes on 127.0.0.1: a SuperLink over TLS that admits only
the SuperNodes it registered, one SuperNode per partner, and ``flwr run`` (docs/deployment.md).

Each process starts in a process group of its own, so that a test can crash a partner the way a machine
or container goes down (its SuperNode, SuperExec and ClientApp at once), and ``close`` ends every
process the deployment started, re-parented children of a killed one included.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from shared.flower_run import PROJECT, _toml, flower_scripts
from tests.processes import descendants, in_groups, listening_addresses

BIN = flower_scripts()  # Flower's commands, as make demo finds them


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


class Deployment:
    """A running SuperLink (``root/superlink.log``) and the SuperNodes started by :meth:`start_supernode`;
    every log under ``root``. Use as a context manager: leaving it ends every process it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONWARNINGS": "ignore",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.link = free_port()
        self.ca, certificate, key = write_tls_files(root / "tls")  # every connection below is TLS, as across organisations
        (root / "flwr").mkdir()
        (root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "partners"\n\n[superlink.partners]\naddress = "127.0.0.1:{self.link}"\nroot-certificates = "{self.ca}"\n'
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self.supernodes: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[str, int] = {}
        self.listened: set[str] = set()  # every address a process of the deployment listened on (note_listening)
        self.left_behind: set[int] = set()  # processes still running 60 s after close() stopped theirs (then killed)
        superlink = self._start(
            [
                str(BIN / "flower-superlink"),
                f"--ssl-ca-certfile={self.ca}",
                f"--ssl-certfile={certificate}",
                f"--ssl-keyfile={key}",
                "--enable-supernode-auth",  # only SuperNodes whose keys the coordinator registered may connect
                "--isolation=subprocess",
                "--host=127.0.0.1",
                f"--port={self.link}",
                f"--control-api-address=127.0.0.1:{free_port()}",
                f"--database={root / 'superlink.db'}",
            ],
            root / "superlink.log",
        )
        try:
            wait_healthy(self.link, superlink, root / "superlink.log", ca=self.ca)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def _start(self, command: list[str], log: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """``command`` in a process group of its own, its output in ``log``; stopped by :meth:`close`."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or self.root, start_new_session=True
            )
        self.processes.append(process)
        return process

    def register(self, name: str) -> int:
        """The partner's key pair (``root/tls/<name>``), its public key registered with the coordinator; its node id."""
        public_key = write_supernode_key(self.root / "tls" / name)
        command = [str(BIN / "flwr"), "supernode", "register", str(public_key), "partners"]
        registered = subprocess.run(command, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=120)
        found = re.search(r"SuperNode (\d+) registered successfully", registered.stdout)
        assert registered.returncode == 0 and found, registered.stdout + registered.stderr
        self.node_ids[name] = int(found.group(1))
        return self.node_ids[name]

    def supernode_command(self, name: str, node_config: str) -> list[str]:
        """A partner's SuperNode: it checks the coordinator's certificate and signs with its own key."""
        return [
            str(BIN / "flower-supernode"),
            f"--root-certificates={self.ca}",
            f"--superlink=127.0.0.1:{self.link}",
            "--host=127.0.0.1",
            f"--port={free_port()}",
            f"--auth-supernode-private-key={self.root / 'tls' / name}",
            f"--node-config={node_config}",
        ]

    def start_supernode(self, name: str, node_config: str, *flags: str) -> subprocess.Popen[bytes]:
        self.supernodes[name] = self._start([*self.supernode_command(name, node_config), *flags], self.root / f"supernode-{name}.log")
        return self.supernodes[name]

    def crash(self, name: str) -> None:
        """The partner's machine goes down: its SuperNode and everything it started, killed at once."""
        process = self.supernodes[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def flwr_run(self, config: dict[str, object], *, log: Path) -> subprocess.Popen[bytes]:
        """``flwr run PROJECT partners --stream`` with ``config``, started; its output in ``log``."""
        pairs = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
        return self._start([str(BIN / "flwr"), "run", str(PROJECT), "partners", "--stream", "--run-config", pairs], log, cwd=PROJECT)

    def run(self, config: dict[str, object], *, log: Path, timeout: float = 600) -> None:
        """One run, to its end; fails with the end of its output unless ``flwr run`` exits 0."""
        process = self.flwr_run(config, log=log)
        process.wait(timeout=timeout)
        self.note_listening()
        assert process.returncode == 0, log.read_text()[-3000:]

    def note_listening(self) -> None:
        self.listened |= listening_addresses(descendants() | {os.getpid()})

    def close(self) -> None:
        """Stops every process the deployment started, as an operator would (SIGTERM to each); then, to
        leave nothing running even when a test failed, kills what of their process groups is left after
        60 s, and records it in :attr:`left_behind` for the test to assert on."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        groups = {process.pid for process in self.processes}
        deadline = time.monotonic() + 60
        while in_groups(groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.left_behind |= in_groups(groups)
        for pid in self.left_behind:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGKILL)
        self.processes.clear()
