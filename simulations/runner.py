"""Run the real ServerApp and ClientApp with ``flwr run`` in Flower's simulation engine, as a user would.

Each federation gets its own local SuperLink (simulation mode, Ray) on 127.0.0.1 and its own Flower
home, both gone when it ends (:func:`shared.flower_run.flwr_run`, what ``make demo`` runs). Used by the
experiment scripts and by the CI simulation test. Flower 1.41 deprecates the in-process
``flwr.simulation.run_simulation`` these runs used before.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from server.run_folder import RunFolder
from shared.checks import number_from_env
from shared.device import why_no_gpu
from shared.federation.settings import settings_from_run_config
from shared.flower_run import flwr_run

GPU_SHARE_ENV = "FEDXREC_GPUS_PER_PARTNER"


def gpu_share() -> float:
    """Each simulated partner's share of a GPU in the experiment scripts' runs: ``$FEDXREC_GPUS_PER_PARTNER``
    (default 0: the CPU; 0.25: four partners per GPU), refused where this process sees no GPU."""
    share = number_from_env(GPU_SHARE_ENV, expected="each simulated partner's share of a GPU (0.5: two partners per GPU)")
    if share and (missing := why_no_gpu()):
        raise ValueError(f"${GPU_SHARE_ENV} is {share:g}, but {missing}; unset it to train on the CPU")
    return share or 0.0


def simulate(run_config: dict[str, object], *, partners: int, client_cpus: int = 1, client_gpus: float | None = None) -> Path:
    """Runs one federation of ``partners`` simulated partners to its last round; returns its run folder.

    ``run_config`` overrides ``[tool.flwr.app.config]`` and must name ``runs-dir`` and ``run-id`` (an
    existing run resumes); relative paths in it are taken from this process's working folder.
    ``client_gpus``: each partner's share of a GPU (default: :func:`gpu_share`). A run that stops
    before its last round raises: ``flwr run`` itself can exit 0 when the ServerApp failed."""
    client_gpus = gpu_share() if client_gpus is None else client_gpus
    missing = [key for key in ("runs-dir", "run-id") if not run_config.get(key)]
    if missing:
        raise ValueError(f"simulate: the run config needs {' and '.join(missing)}, so that the run folder is known")
    config = dict(run_config)
    rounds = settings_from_run_config(config).rounds  # every bad key or value named before a SuperLink starts
    for key in ("runs-dir", "scenario", "partners-file"):  # the ServerApp runs in a process of Flower's, elsewhere
        value = config.get(key)
        if isinstance(value, str) and value and not (key == "scenario" and value == "synthetic"):
            config[key] = str(Path(value).resolve())
    run = Path(str(config["runs-dir"])) / str(config["run-id"])
    # a Flower home of its own: the local SuperLink's database and connection file, never the user's ~/.flwr
    flwr_home = Path(tempfile.mkdtemp(prefix="fedxrec-flwr-"))
    try:
        status = flwr_run(run_config=config, partners=partners, flwr_home=flwr_home, client_cpus=client_cpus, client_gpus=client_gpus)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
    done = RunFolder(run).last_round() if run.is_dir() else 0
    if status != 0 or done < rounds:
        raise RuntimeError(f"the federation {run} stopped after round {done} of {rounds} (flwr run exit status {status}); its log is above")
    return run
