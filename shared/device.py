"""Where a model trains and scores: the CPU, or a CUDA GPU the process sees.

In Flower's simulation engine each simulated partner runs in a Ray actor, and
Ray gives an actor a GPU only if its client resources ask for one
(``client-resources-num-gpus`` > 0). ``auto`` follows what Ray gave: with
``client-resources-num-gpus = 0.25`` four partners share one GPU, with 0 they
all train on the CPU, even where the GPU is visible to them (Ray leaves it
visible with ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``, which the simulations
set, and will by default in later versions). A deployed partner (no Ray) uses
its own GPU if it has one.

What moves to the device: the partner's model and each batch. What stays on
the CPU: the data set, Poisson sampling and the negatives' generator (so a run's
draws do not depend on the device), and everything that is saved or sent (the
adapter's arrays, the private state).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")  # torch is imported by the functions: the CLI reads this without it


def training_device(setting: str) -> torch.device:
    """The device of ``setting``: ``"cpu"``; ``"cuda"`` (raises if this process sees no CUDA GPU);
    ``"auto"``: CUDA if this process sees a GPU, else the CPU."""
    import torch

    if setting not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    missing = why_no_gpu()
    if missing is None:
        return torch.device("cuda")
    if setting == "cuda":
        raise RuntimeError(f"device = 'cuda', but {missing}; use device = 'auto' or 'cpu'")
    return torch.device("cpu")


def why_no_gpu() -> str | None:
    """Why this process may not train on a CUDA GPU, or None if it may."""
    import torch

    ray_gpus = _gpus_ray_gave_this_actor()
    if ray_gpus == 0:
        # Ray schedules partners by their client resources; one that took a GPU without asking
        # would crowd those that did (and, with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, it would see them)
        return "Ray gave this simulated partner no GPU (set the federation's client-resources-num-gpus above 0 to share one)"
    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"this process sees no CUDA GPU: CUDA_VISIBLE_DEVICES is {visible!r}"
    built = f"with CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
    return f"this process sees no CUDA GPU: torch {torch.__version__} was built {built}"


def _gpus_ray_gave_this_actor() -> int | None:
    """How many GPUs Ray assigned this process, if it is a Ray actor (a simulated partner); else None
    (a deployed partner, or a test calling the partner's functions directly)."""
    ray = sys.modules.get("ray")  # imported in every Ray worker; never imported here for a deployed partner
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver: Flower's simulation, or a script that runs one
        return None
    return len(context.get_accelerator_ids().get("GPU", []))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (a model lives on one device); the CPU if it has none."""
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def on_cpu(tree: Any) -> Any:
    """``tree`` (tensors in dicts, lists and tuples, e.g. an optimizer's state dict) with every tensor on the CPU:
    what is saved must load on a partner without the GPU it trained on."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


def hand_back_gpu_memory() -> None:
    """Returns the GPU memory this process keeps cached but no longer uses, after a partner's round:
    partners that share a GPU (a fractional client-resources-num-gpus) run in separate processes,
    and each one's CUDA allocator would otherwise keep its peak for itself. A no-op off the GPU."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
