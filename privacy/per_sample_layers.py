"""Linear and LayerNorm layers that write their own per-sample gradients, for DP-SGD in `clipping = "hooks"` mode.

Opacus computes a Linear weight's per-sample gradients in Python hooks (`opacus/grad_sample/linear.py`): a forward
hook keeps the layer's input, a full backward hook (two more autograd nodes around the module) hands the output
gradient to an einsum, and the result is added into the parameter's `_current_grad_sample`. At tiny and small most
trainable modules are Linear, and those hooks cost more than the per-sample einsums themselves (cProfile of a tiny
private step: 17 ms of 55 in the hook machinery). And the plain backward pass still computed each weight's batch
gradient, only to have the DP optimizer overwrite it.

While a private round trains, each nn.Linear runs through `PerSampleLinear` instead, and Opacus leaves Linear
modules unhooked (`OpacusHooksBeside`). Its backward pass returns the input's gradient only (no batch weight
gradient) and adds the per-sample gradients, exactly what Opacus's grad sampler computes, into the rows
`PatientDPOptimizer.bind` set as `_current_grad_sample` (privacy/dp_sgd.py): per item i of the micro-batch of B,
  weight: B * sum_t g_it x_it^T,   bias: B * sum_t g_it
where g is the gradient of the micro-batch's mean loss with respect to the layer's output (B * g is item i's own
loss gradient, as Opacus's `loss_reduction="mean"` scales it) and t runs over every other dimension (tokens). A
layer called twice in a forward pass (the text encoder: question, then clinical text) adds twice, as Opacus's
accumulation does. LayerNorm (the other module type a step runs a dozen times) is split the same way: the
normalisation by autograd, its affine part by `PerSampleAffine` (weight: B * sum_t g_it * xhat_it, bias as
Linear's). The rest (embeddings, patch embedding, position tables, tokens) keep Opacus's hooks.
tests/test_sizes_and_dp.py holds the step to a per-patient reference loop.

Only for the hooks mode: fast gradient clipping keeps Opacus's own hooks and needs the plain batch gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn


def _add_rows(p: torch.Tensor, rows: torch.Tensor) -> None:
    """rows: (n, *p.shape) added into the first n per-item rows bound for p."""
    bound = getattr(p, "_current_grad_sample", None)
    if bound is None:
        raise RuntimeError("a private backward pass ran with no per-item rows bound (PatientDPOptimizer.bind)")
    bound[: rows.shape[0]].add_(rows, alpha=bound.shape[0])  # alpha: B, the mean loss's scale; bf16 rows add in fp32
    p.grad_sample = bound


class PerSampleLinear(torch.autograd.Function):
    """y = x W^T + b; backward: dL/dx, and per-item gradients of W and b into their bound rows (none to autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # under autocast: in the autocast dtype, as nn.Linear would be
        ctx.save_for_backward(x, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        # x: (n, ..., in), grad_y: (n, ..., out), weight: (out, in)
        x, weight, bias = ctx.saved_tensors
        n = x.shape[0]
        g = grad_y.reshape(n, -1, grad_y.shape[-1])  # (n, T, out)
        if ctx.needs_input_grad[1]:
            x3 = x.reshape(n, -1, x.shape[-1])  # (n, T, in)
            x3 = x3 if x3.dtype == g.dtype else x3.to(g.dtype)  # autocast: x may be fp32, g bf16
            _add_rows(weight, torch.bmm(g.transpose(1, 2), x3))  # (n, out, in)
        if bias is not None and ctx.needs_input_grad[2]:
            _add_rows(bias, g.sum(1))  # (n, out)
        grad_x = grad_y.matmul(weight.to(grad_y.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class PerSampleAffine(torch.autograd.Function):
    """y = xhat * w + b over the last dimension (LayerNorm's affine part); backward: dL/dxhat, and per-item gradients
    of w and b into their bound rows."""

    @staticmethod
    def forward(ctx, xhat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(xhat, weight, bias)
        return xhat * weight if bias is None else torch.addcmul(bias, xhat, weight)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        # xhat, grad_y: (n, ..., D); weight, bias: (D,)
        xhat, weight, bias = ctx.saved_tensors
        n, d = xhat.shape[0], xhat.shape[-1]
        if ctx.needs_input_grad[1]:
            _add_rows(weight, (grad_y * xhat).reshape(n, -1, d).sum(1))  # (n, D)
        if bias is not None and ctx.needs_input_grad[2]:
            _add_rows(bias, grad_y.reshape(n, -1, d).sum(1))  # (n, D)
        return (grad_y * weight if ctx.needs_input_grad[0] else None), None, None


def _linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return PerSampleLinear.apply(x, self.weight, self.bias)


def _layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return PerSampleAffine.apply(F.layer_norm(x, self.normalized_shape, None, None, self.eps), self.weight, self.bias)


OWN_PER_SAMPLE = {nn.Linear: _linear, nn.LayerNorm: _layer_norm}  # module type -> forward writing its own rows


def _writes_own(m: nn.Module) -> bool:
    # a LayerNorm over more than the last dimension, or without weights, stays with Opacus
    if type(m) is nn.LayerNorm:
        return m.weight is not None and len(m.normalized_shape) == 1
    return type(m) in OWN_PER_SAMPLE


class OpacusHooksBeside(GradSampleModule):
    """Opacus's GradSampleModule hooking every trainable module but those writing their own per-sample rows
    (`per_sample_layers` must route them there)."""

    def iterate_submodules(self, module: nn.Module):
        for m in super().iterate_submodules(module):
            if not _writes_own(m):
                yield m


def per_sample_layers(model: nn.Module) -> list[nn.Module]:
    """Route the model's Linear and LayerNorm layers through the Functions above; returns them for `restore`."""
    layers = [m for m in model.modules() if _writes_own(m) and "forward" not in vars(m)]
    for m in layers:
        m.forward = OWN_PER_SAMPLE[type(m)].__get__(m)
    return layers


def restore(layers: list[nn.Module]) -> None:
    """Plain modules again (the site's service keeps the model for the next round, private or not)."""
    for m in layers:
        vars(m).pop("forward", None)
