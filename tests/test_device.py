"""Where partners train: the run setting ``device`` (CPU, or a CUDA GPU the process sees).

These run on any machine. What only a GPU can show (a DP round on CUDA, scores equal
to the CPU's, a simulation of partners sharing one GPU) is in ``tests/test_gpu_*.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import partner
from client.client_app import train
from client.private_state import PartnerState
from server.run_folder import RunFolder
from shared.cli import main
from shared.device import on_cpu, training_device
from shared.federation import wire
from shared.federation.adapter import initial_adapter
from shared.federation.scenario import PartnerSpec, synthetic_scenario
from shared.federation.settings import SettingsError, settings_from_run_config
from simulations.runner import GPU_SHARE_ENV, gpu_share, simulate
from tests.test_federation import ENCODER_DIM, message, settings_for


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that sees no GPU, as Ray leaves a simulated partner without client-resources-num-gpus."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_auto_takes_a_gpu_only_when_the_process_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device("auto") == torch.device("cuda") and training_device("cuda") == torch.device("cuda")
    assert training_device("cpu") == torch.device("cpu")  # asked for, even beside a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == torch.device("cpu")


@pytest.mark.usefixtures("no_gpu")
def test_cuda_without_a_gpu_says_why_and_what_to_use() -> None:
    with pytest.raises(
        RuntimeError,
        match=r"device = 'cuda', but this process sees no CUDA GPU: CUDA_VISIBLE_DEVICES is ''; use device = 'auto' or 'cpu'",
    ):
        training_device("cuda")


def test_a_mistyped_device_is_named_with_its_choices() -> None:
    with pytest.raises(SettingsError, match=r"device must be 'auto' or 'cpu' or 'cuda', got 'gpu'"):
        settings_from_run_config({"device": "gpu"})


@pytest.mark.usefixtures("no_gpu")
def test_a_partner_asked_for_cuda_without_one_fails_before_it_spends_anything(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, device="cuda")
    folder = tmp_path / "state"
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        partner.train(
            settings=settings,
            server_round=1,
            spec=PartnerSpec("books", tmp_path / "books"),
            arrays=initial_adapter(settings, in_dim=ENCODER_DIM),
            state=PartnerState.load(folder),
            folder=folder,
        )
    assert not folder.exists() or not any(folder.iterdir())  # no ledger line, no state, no counts released


def test_a_run_resumes_on_other_hardware(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, dp=False)
    run = RunFolder.open(settings)
    run.write_config(settings)
    run.write_config(dataclasses.replace(settings, device="cpu"))  # was 'auto'
    with pytest.raises(ValueError, match=r"other settings \{'seed': \(0, 1\)\}"):
        run.write_config(dataclasses.replace(settings, device="cpu", seed=1))


def test_what_is_saved_is_moved_to_the_cpu_whole() -> None:
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    moved = on_cpu(state)
    assert moved["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert all(v.device.type == "cpu" for v in moved["state"][0].values()) and torch.equal(moved["state"][0]["exp_avg"], torch.ones(2))


@pytest.mark.usefixtures("no_gpu")
@pytest.mark.parametrize("command", ["train", "finetune"])
def test_train_and_finetune_name_a_device_they_cannot_have(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--data", str(tmp_path)] if command == "train" else ["--state-dir", str(tmp_path), "--data", str(tmp_path)]
    assert main([command, *where, "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    said = capsys.readouterr().err
    assert "--device cuda, but this process sees no CUDA GPU: CUDA_VISIBLE_DEVICES is ''; use --device auto or cpu" in said
    assert not (tmp_path / "x").exists()  # nothing ran


RAY_PARTNER = """
import json, sys
import ray

ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False)


@ray.remote(num_cpus=1)
class Partner:
    def devices(self):
        from shared.device import training_device, why_no_gpu

        return str(training_device("auto")), why_no_gpu()


try:
    print(json.dumps(ray.get(Partner.remote().devices.remote())))
finally:
    ray.shutdown()
"""


def test_a_simulated_partner_that_ray_gave_no_gpu_trains_on_the_cpu(tmp_path: Path) -> None:
    """In a real Ray actor without num_gpus, as Flower's simulation runs a partner with client-resources-num-gpus = 0:
    'auto' is the CPU and 'cuda' is refused, saying which setting gives it one, whether or not the GPU is visible.
    In its own process, with the simulations' Ray settings: Ray reads them once, when first imported."""
    from shared.flower_run import ray_settings

    ray_tmp = Path("/tmp") / f"fedxrec-ray-{tmp_path.name[-20:]}"  # Ray's socket paths must stay short
    env = {**os.environ, **ray_settings(os.environ)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", RAY_PARTNER, str(ray_tmp)], env=env, capture_output=True, text=True, timeout=300, check=False
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    auto, why = json.loads(done.stdout.strip().splitlines()[-1])
    assert auto == "cpu"
    assert why == "Ray gave this simulated partner no GPU (set the federation's client-resources-num-gpus above 0 to share one)"


@pytest.mark.usefixtures("no_gpu")
def test_the_demo_names_a_gpu_share_it_cannot_have(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--gpus-per-partner", "0.5"]) == 2
    said = capsys.readouterr().err
    assert (
        "--gpus-per-partner 0.5, but this process sees no CUDA GPU: CUDA_VISIBLE_DEVICES is ''; leave it at 0 to train on the CPU" in said
    )
    assert main(["demo", "--out", str(tmp_path), "--gpus-per-partner", "-1"]) == 2
    assert "--gpus-per-partner must be at least 0 (a share of one GPU, e.g. 0.5), got -1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no run began


@pytest.mark.usefixtures("no_gpu")
def test_the_experiment_scripts_take_a_gpu_share_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
    assert gpu_share() == 0.0
    monkeypatch.setenv(GPU_SHARE_ENV, "half")
    with pytest.raises(ValueError, match=r"\$FEDXREC_GPUS_PER_PARTNER is 'half': expected each simulated partner's share of a GPU"):
        gpu_share()
    monkeypatch.setenv(GPU_SHARE_ENV, "0.5")
    ray_tmp = os.environ.get("RAY_TMPDIR")
    with pytest.raises(
        ValueError, match=r"\$FEDXREC_GPUS_PER_PARTNER is 0.5, but this process sees no CUDA GPU.*unset it to train on the CPU"
    ):
        simulate({"runs-dir": str(tmp_path), "run-id": "r"}, partners=2)  # before Ray starts
    assert os.environ.get("RAY_TMPDIR") == ray_tmp and not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.usefixtures("no_gpu")
def test_a_deployed_partner_chooses_its_own_device(tmp_path: Path) -> None:
    """The coordinator asks for a GPU; a partner's node config keeps it on its CPU. A mistyped choice is named."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    settings = settings_for(tmp_path / "coordinator", device="cuda")
    spec = synthetic_scenario(tmp_path / "data", partners=1)[0]
    node = {"data-path": str(spec.data), "state-dir": str(tmp_path / "private"), "device": "cpu"}

    def round_one(node_config: dict[str, object]) -> dict[str, float]:
        ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})  # type: ignore[arg-type]
        reply = train(message(MessageType.TRAIN, initial_adapter(settings, in_dim=ENCODER_DIM), settings, 1), ctx)
        return dict(reply.content[wire.METRICS])  # type: ignore[arg-type]

    assert round_one(node)["steps"] > 0
    with pytest.raises(RuntimeError, match=r"node config: device must be one of \['auto', 'cpu', 'cuda'\], got 'gpu'"):
        round_one({**node, "device": "gpu"})
