"""Run the real ServerApp and ClientApp with ``flwr run`` in Flower's simulation engine, as a user would.

Each federation gets its own local SuperLink (simulation mode, Ray) on 127.0.0.1 and its own Flower
home, both gone when it ends (:func:`shared.flower_run.run_federation`, what ``make demo`` runs). Used by the
experiment scripts and by the CI simulation test. Flower 1.41 deprecates the in-process
``flwr.simulation.run_simulation`` these runs used before.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from shared.checks import number_from_env
from shared.device import why_no_gpu
from shared.flower_run import run_federation

GPU_SHARE_ENV = "FEDXREC_GPUS_PER_PARTNER"


def gpu_share() -> float:
    """Each simulated partner's share of a GPU in the experiment scripts' runs: ``$FEDXREC_GPUS_PER_PARTNER``
    (default 0: the CPU; 0.25: four partners per GPU), refused where this process sees no GPU."""
    share = number_from_env(GPU_SHARE_ENV, expected="each simulated partner's share of a GPU (0.5: two partners per GPU)")
    if share and (missing := why_no_gpu()):
        raise ValueError(f"${GPU_SHARE_ENV} is {share:g}, but {missing}; unset it to train on the CPU")
    return share or 0.0


def simulate(run_config: dict[str, object], *, partners: int, client_cpus: int = 1, client_gpus: float | None = None) -> Path:
    """Runs one federation of ``partners`` simulated partners to its last round, in a Flower home of its own
    (never the user's ~/.flwr), and returns its run folder: :func:`shared.flower_run.run_federation`.
    ``client_gpus``: each partner's share of a GPU (default: :func:`gpu_share`)."""
    client_gpus = gpu_share() if client_gpus is None else client_gpus
    flwr_home = Path(tempfile.mkdtemp(prefix="fedxrec-flwr-"))  # the local SuperLink's database and connection file
    try:
        return run_federation(
            run_config=run_config, partners=partners, flwr_home=flwr_home, client_cpus=client_cpus, client_gpus=client_gpus
        )
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
