"""Per-sample gradients, in closed form, for the model's three modules that hold bare parameters.

Opacus has no grad sampler for a module it does not know, so it falls back to torch.func: a vmap of the module's
forward and backward per call, about 3 of a tiny DP step's 39 ms for the 29 such modules (position tables, CLS tokens
and registers, task embeddings). Each adds or prepends its parameter, so its per-sample gradient is the output
gradient summed over the positions the parameter was broadcast to. Registered when privacy/dp_sgd.py is imported;
tests/test_sizes_and_dp.py holds every per-sample gradient's sum to the batch gradient.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler

from m3fm.model.ctvit import FactorizedPosEmbed, PrependTokens
from m3fm.model.fusion import AddVector


@register_grad_sampler(AddVector)
def add_vector_grad_sample(layer: AddVector, activations, backprops: torch.Tensor) -> dict:
    # backprops: (B, ..., D) -> (B, D)
    if not layer.vector.requires_grad:
        return {}
    return {layer.vector: backprops.reshape(backprops.shape[0], -1, backprops.shape[-1]).sum(1)}


@register_grad_sampler(PrependTokens)
def prepend_tokens_grad_sample(layer: PrependTokens, activations, backprops: torch.Tensor) -> dict:
    # backprops: (B, num + L, D) -> (B, 1, num, D), the gradient of the tokens in front
    if not layer.tokens.requires_grad:
        return {}
    return {layer.tokens: backprops[:, None, :layer.tokens.shape[1]]}


@register_grad_sampler(FactorizedPosEmbed)
def factorized_pos_embed_grad_sample(layer: FactorizedPosEmbed, activations, backprops: torch.Tensor) -> dict:
    # backprops: (B, S'*H'*W', D) -> per slice and position (B, S', H'W', D); the in-plane table was tiled over
    # slices, the through-plane one repeated over positions
    s, hw = layer.through_plane.shape[1], layer.in_plane.shape[1]
    grid = backprops.reshape(backprops.shape[0], s, hw, backprops.shape[-1])
    out = {}
    if layer.in_plane.requires_grad:
        out[layer.in_plane] = grid.sum(1)[:, None]  # (B, 1, H'W', D)
    if layer.through_plane.requires_grad:
        out[layer.through_plane] = grid.sum(2)[:, None]  # (B, 1, S', D)
    return out
