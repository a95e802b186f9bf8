"""Linear layers that pass gradients on to their input only, for DP-SGD with Opacus's per-sample hooks.

Under `clipping = "hooks"` Opacus computes every Linear weight's per-sample gradients from the layer's input and
output gradient (`opacus/grad_sample/linear.py`: an einsum per layer) and the DP optimizer replaces `p.grad` with
their clipped, noised sum. The plain backward pass still computed each weight's batch gradient first, a matrix
product as large as the layer's forward one, only to have it overwritten: a third of a Linear layer's compute in
a DP step spent on nothing. While a private round trains, each Linear layer of the model runs through
`InputGradLinear`, whose backward returns the input's gradient and no weight or bias gradient. Opacus's hooks see
the same input and output gradient as before, so the per-sample gradients, and hence the clipped sum, the noise
and the step, are the same (tests/test_sizes_and_dp.py holds the update to a per-patient reference loop).

Only for the hooks mode: fast gradient clipping's second backward pass needs the plain batch gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InputGradLinear(torch.autograd.Function):
    """y = x W^T + b; backward: dL/dx only (W and b get their gradients per sample, from Opacus's hooks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # under autocast: in the autocast dtype, as nn.Linear would be
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        # grad_y: (..., out), weight: (out, in) -> grad_x: (..., in)
        (weight,) = ctx.saved_tensors
        grad_x = grad_y.matmul(weight.to(grad_y.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return InputGradLinear.apply(x, self.weight, self.bias)


def input_grad_only(model: nn.Module) -> list[nn.Linear]:
    """Route every nn.Linear of the model through InputGradLinear; returns them for `restore`."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
    for m in layers:
        m.forward = _forward.__get__(m)
    return layers


def restore(layers: list[nn.Linear]) -> None:
    """Plain nn.Linear again (the site's service keeps the model for the next round, private or not)."""
    for m in layers:
        vars(m).pop("forward", None)
