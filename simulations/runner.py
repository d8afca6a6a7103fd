"""Run the real ServerApp and ClientApp in Flower's simulation engine, in this process.

``flwr.simulation.run_simulation`` gives the ServerApp an empty run config; here
the ServerApp's ``main`` receives the run config that ``flwr run`` would give it.
Used by the experiments and by the CI simulation test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.client_app import app as client_app
from server.server_app import main as server_main
from shared.checks import number_from_env
from shared.device import why_no_gpu
from shared.flower_run import ray_settings


def server_with_config(run_config: dict[str, object]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config = run_config  # type: ignore[assignment]
        server_main(grid, context)

    return app


GPU_SHARE_ENV = "FEDXREC_GPUS_PER_PARTNER"


def gpu_share() -> float:
    """Each simulated partner's share of a GPU in the experiment scripts' runs: ``$FEDXREC_GPUS_PER_PARTNER``
    (default 0: the CPU; 0.25: four partners per GPU), refused where this process sees no GPU."""
    share = number_from_env(GPU_SHARE_ENV, expected="each simulated partner's share of a GPU (0.5: two partners per GPU)")
    if share and (missing := why_no_gpu()):
        raise ValueError(f"${GPU_SHARE_ENV} is {share:g}, but {missing}; unset it to train on the CPU")
    return share or 0.0


def simulate(run_config: dict[str, object], *, partners: int, client_cpus: float = 1.0, client_gpus: float | None = None) -> Path:
    """Runs one federation; returns its run folder. ``client_gpus``: each partner's share of a GPU
    (default: :func:`gpu_share`)."""
    client_gpus = gpu_share() if client_gpus is None else client_gpus
    ours = "RAY_TMPDIR" not in os.environ  # a folder the caller chose is the caller's to remove
    ray_tmp = Path(os.environ.setdefault("RAY_TMPDIR", f"/tmp/fedxrec-ray-{os.getpid()}"))
    # Flower keeps an id file in its home (~/.flwr), even with telemetry off: not in the user's home
    flwr_home = None if "FLWR_HOME" in os.environ else tempfile.mkdtemp(prefix="fedxrec-flwr-")
    if flwr_home:
        os.environ["FLWR_HOME"] = flwr_home
    for key, value in ray_settings(os.environ).items():
        os.environ.setdefault(key, value)
    try:
        run_simulation(
            server_app=server_with_config(run_config),
            client_app=client_app,
            num_supernodes=partners,
            backend_config={
                "client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus},
                "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False},
            },
        )
    finally:
        if ours:  # Ray's session files (Flower has shut Ray down); the next run starts a new session
            shutil.rmtree(ray_tmp, ignore_errors=True)
            del os.environ["RAY_TMPDIR"]
        if flwr_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
            del os.environ["FLWR_HOME"]
    return Path(str(run_config["runs-dir"])) / str(run_config["run-id"])
