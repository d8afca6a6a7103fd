"""Linear layers whose weights take their gradient from Opacus alone during DP-SGD.

Under DP-SGD Opacus builds each user's gradient of a linear layer from what its
hooks capture (the layer's input and the gradient of its output: one batched
product per layer), clips and sums those, and sets the weight's ``.grad`` to the
noised sum. Autograd still computes the summed gradient of the weight and bias
first, and Opacus overwrites it unread: for the adapter's experts that is a
[512, B·R] × [B·R, 384] product, as large as the layer's forward pass.

:func:`per_user_gradients_only` turns a model's trainable ``nn.Linear`` layers into
:class:`PerUserLinear` for the length of a DP round: the same layer and weights,
whose backward pass gives its input a gradient and its weight and bias none.
Opacus computes their per-user gradients as for ``nn.Linear`` (its own linear
grad sampler, registered for this class). On Scientific's DP step
(``python -m simulations.bench_dp_step``, side by side) this takes the step from
1.38–1.40× to 1.11–1.13× the step without DP. The noised gradient is the same
either way (``tests/test_privacy.py``). Outside the ``with`` block the layers are plain
``nn.Linear`` again, so nothing trained without DP can lose its gradient; inside
it, a layer Opacus had not hooked would have no per-user gradient, and Opacus'
optimizer stops with an error ("Per sample gradient is not initialized"), it does
not step without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.nn import functional as F


class _NoParameterGradient(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward pass returns the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None  # [..., out] @ [out, in]
        return grad_input, None, None


class PerUserLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias get their gradient from Opacus alone (per user, clipped, noised)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoParameterGradient.apply(x, self.weight, self.bias)


register_grad_sampler(PerUserLinear)(compute_linear_grad_sample)


@contextmanager
def per_user_gradients_only(model: nn.Module) -> Iterator[list[nn.Linear]]:
    """Within the block, every ``nn.Linear`` of ``model`` with a trainable weight or bias is a
    :class:`PerUserLinear`; afterwards (also after an error) it is an ``nn.Linear`` again.
    Only for a model that Opacus trains: without Opacus' hooks these layers get no gradient.
    Yields the layers it changed."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters())]
    for layer in layers:
        layer.__class__ = PerUserLinear  # adds no state: only the backward pass differs
    try:
        yield layers
    finally:
        for layer in layers:
            layer.__class__ = nn.Linear
