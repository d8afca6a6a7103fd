"""Runs the Flower app with ``flwr run`` on a private local SuperLink, then stops it.

``flwr run`` with the ``:local:`` address starts a detached SuperLink (simulation
mode, Ray) and leaves it running. Here it gets its own ``FLWR_HOME`` and its own
free ports on 127.0.0.1, so it never meets another user's SuperLink, and it is
stopped by its PID when the run ends; Ray's temporary folder goes with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The Ray and Flower settings of every simulation here (``make demo``, the experiment scripts and the
    CI simulation test all run :func:`flwr_run`)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps every Ray socket on loopback
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": env.get("FLWR_TELEMETRY_ENABLED", "0"),  # see shared/__init__.py
        # Ray starts its workers, where the partners train, at nice 15: beside any other job they would wait
        "RAY_worker_niceness": env.get("RAY_worker_niceness", "0"),
    }


def flower_scripts() -> Path:
    """The folder holding Flower's commands (``flwr``, ``flower-superlink``, ...): beside this
    interpreter, where a virtual environment has them, else where ``flwr`` is on PATH (a
    ``pip install --user`` or ``--target`` puts them apart from the interpreter)."""
    beside = Path(sys.executable).parent
    if (beside / "flwr").is_file():
        return beside
    found = shutil.which("flwr")
    if found is None:
        raise FileNotFoundError(
            f"Flower's `flwr` command is neither beside this Python ({sys.executable}) nor on PATH: install fedxrec "
            "into this environment (make install, or pip install -e .), which installs flwr with it, or put the "
            "folder holding `flwr` on PATH"
        )
    return Path(found).parent


def simulation_env(flwr_home: Path, ray_tmp: Path, *, scripts: Path | None = None) -> dict[str, str]:
    """The environment of ``flwr run``; ``scripts``: Flower's commands (default: :func:`flower_scripts`)."""
    env = dict(os.environ)
    env.update(
        {
            **ray_settings(env),
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else uv downloads a CUDA torch
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            "RAY_TMPDIR": str(ray_tmp),
            "PYTHONWARNINGS": "ignore",
            # flwr starts `flower-superlink` by name: this environment's scripts come first
            "PATH": f"{scripts or flower_scripts()}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def write_federation(flwr_home: Path) -> str:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local-sim"\n\n[superlink.local-sim]\naddress = ":local:"\n')
    return "local-sim"


def _superlink_pids(flwr_home: Path) -> list[int]:
    marker = str(flwr_home / "local-superlink")
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("flower-superlink" in a for a in args[:2]) and any(a.startswith(marker) for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


def flwr_run(*, run_config: dict[str, object], partners: int, flwr_home: Path, client_cpus: int = 1, client_gpus: float = 0.0) -> int:
    """``flwr run PROJECT local-sim --stream`` with ``run_config``; returns its exit status."""
    scripts = flower_scripts()  # before anything starts: a missing flwr is named, not met as a bare ENOENT
    federation = write_federation(flwr_home)
    ray_tmp = Path("/tmp") / f"fedxrec-ray-{os.getpid()}"
    env = simulation_env(flwr_home, ray_tmp, scripts=scripts)
    pairs = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
    flwr = scripts / "flwr"
    resources = f"num-supernodes={partners} client-resources-num-cpus={client_cpus} client-resources-num-gpus={client_gpus}"
    command = [str(flwr), "run", str(PROJECT), federation, "--stream", "--run-config", pairs, "--federation-config", resources]
    try:
        return subprocess.run(command, env=env, cwd=PROJECT, check=False).returncode
    finally:
        for pid in _superlink_pids(flwr_home):  # ours only: matched by our FLWR_HOME
            os.kill(pid, signal.SIGTERM)
        time.sleep(1)
        for pid in _superlink_pids(flwr_home):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's session files; the run's log was streamed above


def run_federation(
    *, run_config: dict[str, object], partners: int, flwr_home: Path, client_cpus: int = 1, client_gpus: float = 0.0
) -> Path:
    """:func:`flwr_run` of one federation to its last round; returns its run folder (``make demo`` and the
    experiment scripts).

    ``run_config`` overrides ``[tool.flwr.app.config]`` and must name ``runs-dir`` and ``run-id`` (an existing
    run resumes); it is checked before anything starts, and its relative paths are taken from this process's
    working folder, as the ServerApp runs in a process of Flower's, elsewhere. Raises ``RuntimeError`` when
    the run folder lacks one of the rounds asked for: ``flwr run`` can exit 0 when the ServerApp failed, and
    a run that stops early still writes its summary."""
    from server.run_folder import RunFolder
    from shared.federation.settings import settings_from_run_config

    missing = [key for key in ("runs-dir", "run-id") if not run_config.get(key)]
    if missing:
        raise ValueError(f"the run config needs {' and '.join(missing)}, so that the run folder is known")
    config = dict(run_config)
    rounds = settings_from_run_config(config).rounds  # every bad key or value named before a SuperLink starts
    for key in ("runs-dir", "scenario", "partners-file"):
        value = config.get(key)
        if isinstance(value, str) and value and not (key == "scenario" and value == "synthetic"):
            config[key] = str(Path(value).resolve())
    run = Path(str(config["runs-dir"])) / str(config["run-id"])
    status = flwr_run(run_config=config, partners=partners, flwr_home=flwr_home, client_cpus=client_cpus, client_gpus=client_gpus)
    done = RunFolder(run).last_round() if run.is_dir() else 0
    if status != 0 or done < rounds:
        raise RuntimeError(f"the federation {run} stopped after round {done} of {rounds} (flwr run exit status {status}); its log is above")
    return run


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
