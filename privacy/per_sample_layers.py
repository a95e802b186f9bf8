"""Per-sample gradients by autograd itself, for DP-SGD in `clipping = "hooks"` mode.

Opacus computes per-sample gradients in Python hooks: a forward hook keeps each module's input, a full backward
hook (two more autograd nodes around the module) hands the output gradient to a grad sampler, and the result is
added into the parameter's `_current_grad_sample`. At tiny most of a private step's extra cost was that Python, per
module and call (cProfile: 17 of 55 ms), and the plain backward pass still computed each weight's batch gradient
only to have the DP optimizer overwrite it. Python autograd Functions writing the rows per layer (this file's
previous version) still ran a Python backward per layer call; stop 44's version had autograd add every leaf's
gradient into one zeroed (items x parameters) buffer, three passes over it this version does without.

Here the backward pass runs no grad sampler, only one line of Python per Linear call. While a private round
trains, each of the model's parametrised module types (Linear, LayerNorm, Embedding, and the model's AddVector,
PrependTokens and FactorizedPosEmbed) runs a forward of its own. LayerNorm and the added vectors use, instead of
each trainable parameter p of shape S, a leaf tensor
`p.detach().expand(n, *S)`: one copy of p per item of the micro-batch of n, all views of p's memory (stride 0),
broadcast per item. Autograd then computes the gradient of the leaf, (n, *S): item i's row is exactly the gradient
of the loss with respect to item i's copy of p, that is item i's per-sample gradient (the leaf is not expanded from
anything autograd sees, so nothing sums the rows). That gradient is kept where autograd made it: `Leaves.collect`
hands it to the DP optimizer as `p.grad_sample`, where Opacus's hooks would leave it, with no copy and no buffer to
zero. A module called twice in a forward pass (the text encoder: question, then clinical text) takes the same leaf,
so autograd sums both calls in its gradient, as Opacus's accumulation does. Two module types keep less than a
per-item copy of their parameters:
- an Embedding takes the rows it looks up as a leaf (`EmbeddingRows`: an item's gradient as those rows, not as a
  copy of the table);
- a Linear runs its plain product, one matmul over the batch's tokens with the weight detached, and keeps its input
  and, through a tensor hook (that one Python line), its output's gradient (`LinearInputs`: the DP optimizer takes
  the norms and the clipped sum from them, Book-Keeping's way). Until 2026-12-07 a Linear took an expanded W^T
  leaf and ran as a batched matmul over the items, autograd making each item's (in, out) gradient: the forward
  pass and the input's gradient ran as per-item products, slower than one product over the batch at a few tokens
  an item, the MLM head's (n, 192, 8192) per-item gradients were made only to be summed, and each weight's
  clipped sum was copied across a transpose (small pretraining, profiled: 70 ms a step of matmuls over the plain
  step's, 12 ms of copies).
Losses are backpropagated as their sum (not their mean), so the rows are each item's own gradient with no
rescaling; Opacus's GradSampleModule wraps the model with `loss_reduction="sum"` for any module it still hooks.

Under autocast a Linear's products, and so its output gradients and per-item gradients, are bf16; the DP optimizer
takes norms and sums in fp32. Frozen parameters (another task's predictor) take no leaf: the plain module forward
runs.

tests/test_sizes_and_dp.py holds the step to a per-patient reference loop. Only for the hooks mode: fast gradient
clipping keeps Opacus's own hooks and needs the plain batch gradients.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from m3fm.model.ctvit import FactorizedPosEmbed, PrependTokens
from m3fm.model.fusion import AddVector



class ItemGradients:
    """A parameter's per-item gradients kept as what makes them, not as (n, *p.shape): the DP optimizer asks each for
    its items' squared norms and adds its clipped sum into the parameter's slot of the step's sum."""

    def joined(self, other):  # both calls of a module in one forward pass, per item
        raise NotImplementedError

    def square_norms(self) -> torch.Tensor:  # (n,)
        raise NotImplementedError

    def add_into(self, out: torch.Tensor, factor: torch.Tensor) -> None:  # out (*p.shape) += sum_i factor[i] g_i
        raise NotImplementedError


class EmbeddingRows(ItemGradients):
    """An embedding table's per-item gradients kept as the rows an item looked up: ids (n, L), grads (n, L, D).
    Dense they would be (n, V, D), which autograd's index backward zero-filled afresh every step (small: 25 MB, 16 ms
    of page faults and fill a step) for at most L rows an item. An item's gradient of the table is the sum of its
    rows' gradients over equal ids, so its squared norm is the rows' Gram matrix summed over pairs of equal ids,
    and the clipped sum over items is one scatter-add of the scaled rows into the table's (V, D) slot."""

    def __init__(self, ids: torch.Tensor, grads: torch.Tensor):
        self.ids, self.grads = ids, grads

    def joined(self, other: EmbeddingRows) -> EmbeddingRows:
        """Both lookups of one forward pass (the text encoder: question, then clinical text), per item."""
        return EmbeddingRows(torch.cat([self.ids, other.ids], 1), torch.cat([self.grads, other.grads], 1))

    def square_norms(self) -> torch.Tensor:
        g = self.grads.float()
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(g.dtype)  # (n, L, L)
        return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))  # (n,)

    def add_into(self, table: torch.Tensor, factor: torch.Tensor) -> None:
        """table (V, D) += sum over items of factor[i] x item i's gradient."""
        rows = (self.grads.to(table.dtype) * factor[:, None, None]).reshape(-1, table.shape[1])
        table.index_add_(0, self.ids.reshape(-1), rows)


class LinearInputs(ItemGradients):
    """A Linear weight's per-item gradients kept as what makes them: the layer's inputs a (n, T, in) and its output's
    gradients g (n, T, out); item i's gradient is g_i^T a_i (out, in), its tokens those of every call (a module
    called twice, the text encoder, joins both calls' tokens). Norms and the clipped sum take the cheaper of two ways
    per layer ("mixed ghost clipping", Bu et al. 2023):
    - made: each item's gradient, (n, out, in) in W's layout, by one batched product; its norms, then the clipped
      sum as one pass over it (factor @ rows);
    - ghost, where 4 T (in + out) < in * out (few tokens, wide layers: the MLM head's 8192 outputs over a record's
      masked positions; the crossover measured on one CPU thread): no per-item gradient at all. An item's squared
      norm is sum over token pairs (a_t . a_s)(g_t . g_s), two (n, T, T) Gram matrices (Li et al. 2022), and the
      clipped sum, sum_i c_i g_i^T a_i, one product over all n*T tokens, g^T (c a), as a plain backward pass's
      weight gradient is (Book-Keeping, Bu et al. 2023).
    Under activation checkpointing (large, huge) the inputs of a checkpointed block's Linear layers are held from
    the forward pass to the clip, as without checkpointing (the recomputed calls' outputs get no gradient and are
    skipped)."""

    def __init__(self, a: torch.Tensor, g: torch.Tensor):
        self.a, self.g = a.to(g.dtype), g  # under autocast g is bf16 and a may be fp32: products in g's dtype
        self.made: torch.Tensor | None = None  # the rows, once square_norms made them, until add_into sums them

    def joined(self, other: LinearInputs) -> LinearInputs:
        return LinearInputs(torch.cat([self.a, other.a], 1), torch.cat([self.g, other.g], 1))

    def ghost(self) -> bool:
        _, t, i = self.a.shape
        return 4 * t * (i + self.g.shape[2]) < i * self.g.shape[2]

    def rows(self) -> torch.Tensor:
        """Each item's gradient, (n, out, in): W's layout."""
        return torch.bmm(self.g.transpose(1, 2), self.a)

    def square_norms(self) -> torch.Tensor:
        if self.ghost():
            grams = torch.bmm(self.a, self.a.transpose(1, 2)).float() * torch.bmm(self.g, self.g.transpose(1, 2))
            return grams.sum((1, 2))
        self.made = self.rows()
        return torch.linalg.vector_norm(self.made, dim=(1, 2), dtype=torch.float32).square()

    def add_into(self, weight: torch.Tensor, factor: torch.Tensor) -> None:
        """weight (out, in) += sum over items of factor[i] x item i's gradient."""
        made, self.made = self.made, None
        if made is not None:  # the rows exist already: one pass over them, (1, n) @ (n, out * in)
            a, b, flat = factor[None], made.reshape(len(made), -1).to(factor.dtype), weight.view(1, -1)
        else:  # (out, n*T) @ (n*T, in)
            a = self.g.reshape(-1, self.g.shape[2]).t()
            b, flat = (self.a * factor.to(self.a.dtype)[:, None, None]).reshape(-1, self.a.shape[2]), weight
        if a.dtype == weight.dtype:
            flat.addmm_(a, b)
        else:  # bf16 products into the fp32 sum
            flat.add_(a @ b)


class Leaves:
    """The per-item leaves a private forward pass took; after the backward pass, their gradients as the parameters'
    per-item gradients."""

    def __init__(self):
        self.taken: dict[tuple, tuple[nn.Parameter, torch.Tensor]] = {}
        self.tapped: list[list] = []  # [module, input, output's gradient once the backward pass made it]
        self.looked_up: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (table, ids, leaf of rows)

    def rows(self, p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """ids (n, ...) -> p's rows (n, ..., D) as a leaf, whose gradient is each looked-up row's, per item."""
        t = p.detach()[ids]
        if p.requires_grad:
            self.looked_up.append((p, ids.reshape(len(ids), -1), t.requires_grad_(True)))
        return t

    def take(self, p: torch.Tensor, n: int) -> torch.Tensor:
        """p: (*S) -> (n, *S), n copies of p sharing its memory; a leaf whose gradient is per item if p trains. A
        module called again in the same pass (the text encoder: question, then clinical text) takes the same leaf,
        so autograd sums both calls' gradients in it."""
        key = (id(p), n)
        if key in self.taken:
            return self.taken[key][1]
        t = p.detach().expand(n, *p.shape)
        if p.requires_grad:
            self.taken[key] = (p, t.requires_grad_(True))
        return t

    def tap(self, m: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A Linear call's input x (n, T, in) and output y (n, T, out): y's gradient, kept by a hook as the backward
        pass makes it, and x are the call's per-item gradients (LinearInputs). (`retain_grad` would copy every
        output's gradient: its hook clones what it keeps.)"""
        if not y.requires_grad:  # nothing before it trains (the patch embedding of pixels): the gradient stops at y
            y.requires_grad_(True)
        call = [m, x.detach(), None]
        y.register_hook(partial(_keep_gradient, call))
        self.tapped.append(call)
        return y

    def collect(self, items: int) -> None:
        """After the backward pass: each parameter's per-item gradients (items, *p.shape) as `p.grad_sample`, where
        Opacus's hooks would leave them (a Linear weight's as LinearInputs, a looked-up table's as EmbeddingRows).
        A call on fewer items (the first n of the micro-batch, in order, as Opacus counts them) fills the first n."""
        def padded(t: torch.Tensor) -> torch.Tensor:
            return t if len(t) == items else torch.cat([t, t.new_zeros(items - len(t), *t.shape[1:])])

        def add(p: nn.Parameter, g) -> None:
            p.grad_sample = g if p.grad_sample is None else (
                p.grad_sample.joined(g) if isinstance(g, ItemGradients) else p.grad_sample + g)

        for p, t in self.taken.values():
            if t.grad is not None:
                add(p, padded(t.grad))
        for m, x, g in self.tapped:
            if g is None:  # its output never reached the loss
                continue
            g = padded(g)  # (items, T, out)
            if m.weight.requires_grad:
                add(m.weight, LinearInputs(padded(x), g))
            if m.bias is not None and m.bias.requires_grad:
                add(m.bias, g.sum(1))
        for p, ids, t in self.looked_up:
            if t.grad is not None:
                add(p, EmbeddingRows(padded(ids), padded(t.grad.reshape(len(ids), ids.shape[1], -1))))
        self.taken.clear()
        self.tapped.clear()
        self.looked_up.clear()


def _keep_gradient(call: list, grad: torch.Tensor) -> None:
    call[2] = grad  # a reference: autograd adds in place only into a gradient buffer no one else holds


def _routed(per_item, m: nn.Module, leaves: Leaves, params: tuple[nn.Parameter, ...], x: torch.Tensor):
    """The module's per-item forward while any of its parameters trains, its own forward otherwise (frozen, or no
    gradient wanted)."""
    if torch.is_grad_enabled() and any([p.requires_grad for p in params]):
        return per_item(m, leaves, x)
    return type(m).forward(m, x)


def _per_item(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v: (n, D) -> (n, 1, ..., 1, D), broadcasting over every dimension of `like` but the first and last."""
    return v.view(v.shape[0], *[1] * (like.dim() - 2), v.shape[-1])


def _linear(m: nn.Linear, leaves: Leaves, x: torch.Tensor) -> torch.Tensor:
    # x: (n, ..., in) -> (n, ..., out): the plain product, one matmul over the batch's tokens; the weight's per-item
    # gradients come after the backward pass from x and the output's gradient (LinearInputs)
    # (n, T, in), contiguous: torch's matmul folds a strided input (the MIM predictor's x[:, 1:]) into one product,
    # by copying it, only while the weight requires a gradient; with the weight detached it ran a batched matmul
    # against the weight broadcast per item instead, about 5x slower here. This makes the plain Linear's copy
    x3 = x.reshape(len(x), -1, x.shape[-1]).contiguous()
    y = F.linear(x3, m.weight.detach(), None if m.bias is None else m.bias.detach())
    return leaves.tap(m, x3, y).view(*x.shape[:-1], y.shape[-1])


def _layer_norm(m: nn.LayerNorm, leaves: Leaves, x: torch.Tensor) -> torch.Tensor:
    xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    n = x.shape[0]
    w = _per_item(leaves.take(m.weight, n), x)
    return xhat * w if m.bias is None else torch.addcmul(_per_item(leaves.take(m.bias, n), x), xhat, w)


def _embedding(m: nn.Embedding, leaves: Leaves, ids: torch.Tensor) -> torch.Tensor:
    # ids: (n, ...) -> (n, ..., D), each looked-up row a leaf of its own (EmbeddingRows: no per-item table)
    out = leaves.rows(m.weight, ids)
    if m.padding_idx is None:
        return out
    return torch.where((ids == m.padding_idx).unsqueeze(-1), out.detach(), out)  # the padding row never trains


def _add_vector(m: AddVector, leaves: Leaves, x: torch.Tensor) -> torch.Tensor:
    return x + _per_item(leaves.take(m.vector, x.shape[0]), x)


def _prepend_tokens(m: PrependTokens, leaves: Leaves, x: torch.Tensor) -> torch.Tensor:
    # x: (n, L, D); tokens: (1, num, D) -> (n, num + L, D)
    return torch.cat([leaves.take(m.tokens, x.shape[0])[:, 0], x], dim=1)


def _factorized_pos_embed(m: FactorizedPosEmbed, leaves: Leaves, x: torch.Tensor) -> torch.Tensor:
    # x: (n, S'*H'*W', D); in-plane (1, H'W', D) tiled over slices, through-plane (1, S', D) over positions
    n, s, hw = x.shape[0], m.through_plane.shape[1], m.in_plane.shape[1]
    in_plane, through_plane = leaves.take(m.in_plane, n)[:, 0], leaves.take(m.through_plane, n)[:, 0]
    return x + in_plane.repeat(1, s, 1) + through_plane.repeat_interleave(hw, dim=1)


# module type -> forward taking per-item leaves; the model's trainable module types all have one
OWN_PER_SAMPLE = {nn.Linear: _linear, nn.LayerNorm: _layer_norm, nn.Embedding: _embedding, AddVector: _add_vector,
                  PrependTokens: _prepend_tokens, FactorizedPosEmbed: _factorized_pos_embed}


def _writes_own(m: nn.Module) -> bool:
    if type(m) is nn.LayerNorm:  # over more than the last dimension, or without weights: Opacus's hooks
        return m.weight is not None and len(m.normalized_shape) == 1
    if type(m) is nn.Embedding:  # these change the table or scale its gradient: Opacus refuses or handles them
        return m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
    return type(m) in OWN_PER_SAMPLE


class OpacusHooksBeside(GradSampleModule):
    """Opacus's GradSampleModule hooking every trainable module but those taking per-item leaves
    (`per_sample_layers` must route them there)."""

    def iterate_submodules(self, module: nn.Module):
        for m in super().iterate_submodules(module):
            if not _writes_own(m):
                yield m


def per_sample_layers(model: nn.Module, leaves: Leaves) -> list[nn.Module]:
    """Route the model's modules of the types above through per-item leaves; returns them for `restore`."""
    layers = [m for m in model.modules() if _writes_own(m) and "forward" not in vars(m)]
    for m in layers:
        m.forward = partial(_routed, OWN_PER_SAMPLE[type(m)], m, leaves, tuple(m.parameters(recurse=False)))
    return layers


def restore(layers: list[nn.Module]) -> None:
    """Plain modules again (the site's service keeps the model for the next round, private or not)."""
    for m in layers:
        vars(m).pop("forward", None)
