"""Several ranks of one site, one optimizer step: gradients summed across ranks before the step.

Task-parallel as in the paper (Methods: each device runs a different task's micro-batch, gradients all-reduced
once per step): each rank backpropagates its own micro-batches, then `all_reduce_grads` makes every rank's
gradients the mean over all the site's micro-batches, exactly what one process accumulating them all would hold,
and the (clipped) optimizer step runs on identical weights and gradients everywhere. Plain DDP assumes every rank
touches the same parameters; here a rank's tasks use their own heads, so a parameter may have a gradient on one
rank and none on another. One flat buffer carries the gradients (zeros where a rank has none), one "has a
gradient" flag per parameter and the rank's micro-batch count; a parameter no rank touched keeps no gradient,
so AdamW skips it as it would in one process (a zero gradient would still move its moments and decay it).

gloo on CPU (tests), NCCL on GPUs; the step is the caller's, e.g. `multitask_step(..., before_step=...)`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def sum_across(tensors: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Each tensor's sum over the ranks, shaped like it: one all-reduce of one flat buffer for all of them (the
    results are views into it)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_reduce_grads(model: nn.Module, micro_batches: int, group=None) -> None:
    """This rank's gradients are the mean over its `micro_batches` micro-batches; afterwards every rank holds the
    mean over all ranks' micro-batches (weighted by their counts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad * micro_batches if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    count = torch.tensor([float(micro_batches)], dtype=grads[0].dtype, device=grads[0].device)
    *grads, flags, count = sum_across([*grads, flags, count], group)  # one all-reduce a step
    total = float(count)
    for p, g, touched in zip(params, grads, flags.tolist()):
        p.grad = g / total if touched > 0 else None


@dataclass(frozen=True)
class Ranks:
    """This process's place among the site's ranks (an initialized torch.distributed group)."""
    rank: int
    world: int
    group: object = None

    def share(self, items: list) -> list:
        """This rank's part of a step's work (round-robin: task j of the step goes to rank j % world)."""
        return items[self.rank::self.world]

    def before_step(self, model: nn.Module, micro_batches: int, then: Callable[[], None] | None = None):
        """The hook an optimizer step runs before clipping: gradients summed across ranks, then `then` (e.g.
        FedProx's proximal gradient, the same on every rank)."""
        def hook() -> None:
            all_reduce_grads(model, micro_batches, self.group)
            if then is not None:
                then()
        return hook

    def merge(self, losses: dict[str, list], counts: dict[str, int]) -> tuple[dict[str, list], dict[str, int]]:
        """Every rank's per-task losses and step counts, joined: the site's totals, on every rank. As one process's
        (defaultdicts), a key no rank trained reads as no losses and 0 steps: a round with fewer micro-batches than
        tasks leaves some untrained, and local_multitask asks for every task's count."""
        parts: list = [None] * self.world
        dist.all_gather_object(parts, (dict(losses), dict(counts)), group=self.group)
        joined_losses: dict[str, list] = defaultdict(list)
        joined_counts: dict[str, int] = defaultdict(int)
        for part_losses, part_counts in parts:
            for k, v in part_losses.items():
                joined_losses[k].extend(v)
            for k, n in part_counts.items():
                joined_counts[k] += n
        return joined_losses, joined_counts
