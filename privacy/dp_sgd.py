"""Patient-level DP-SGD at a site: Opacus's per-sample clipping and noise, patients as the sampling unit, the
accountant kept on the site's disk.

The unit of privacy is the patient: every exam, series, crop, task label and report of one patient together.
Each optimizer step trains one key (an image scale in pretraining, a task in multitask training, in the same
round-robin order as non-private training) and

  1. Poisson-samples patients: each training patient with items of the step's key independently, at rate
     q_k = 1 / ceil(P_k / batch_size) for the P_k such patients (Opacus's UniformWithReplacementSampler);
  2. takes ONE item of each sampled patient, drawn uniformly from that patient's items of the key;
  3. clips each item's gradient to max_grad_norm C (Opacus's per-sample clipping), sums, adds N(0, sigma^2 C^2)
     once, and divides by the expected batch q_k * P_k (Opacus's DPOptimizer).

Why that bounds a patient (the sensitivity the accountant needs). Neighbouring datasets differ in one patient and
all of that patient's data. In a step the patient is either not sampled (probability 1 - q_k, or they have no item
of the key: then the step does not depend on them at all) or contributes exactly one term, a gradient clipped to
norm C; the item is drawn with randomness of its own, independent of every other patient's data. So each step is
the sampled Gaussian mechanism with sensitivity C over patients at rate q_k (Mironov, Talwar & Zhang 2019), whose
RDP Opacus's accountant computes. A patient with no items of a key pays nothing in that key's steps, so composing
every key's steps, [(sigma, q_k, steps of key k)], bounds every patient: the epsilon reported is per patient.
Taking every sampled item of a patient would need the patient's summed gradient clipped as one (per-patient
gradients held across a step's micro-batches); one item per patient keeps Opacus's per-sample machinery, memory
and speed unchanged.

Losses are per-sample means (m3fm/model/heads.py), so an item's gradient never depends on its batch mates.

A new accountant per message would forget earlier rounds, so the RDP history lives in
`work_dir/privacy/accountant.json` (privacy/accounting.py) and is loaded before, and saved after, every private
round: epsilon accumulates over rounds, runs and client restarts.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import asdict

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from m3fm.distributed import Ranks, sum_across
from privacy import grad_samplers  # noqa: F401  (registers the model's own modules' per-sample gradients)
from privacy.accounting import UNIT, PrivacyLedger, PrivateRound, epsilon_of, sample_rate
from privacy.budget import DPSGDConfig
from privacy.per_sample_layers import ItemGradients, Leaves, OpacusHooksBeside, per_sample_layers, restore


class PatientSampler:
    """Per key: Poisson sampling of patients (Opacus's UniformWithReplacementSampler), then one item of each."""

    def __init__(self, units: dict[str, list[list[int]]], batch_size: int, seed: int):
        self.units = units
        self.rate = {k: sample_rate(len(u), batch_size) for k, u in units.items()}
        gen = torch.Generator().manual_seed(seed)
        self.samplers = {k: UniformWithReplacementSampler(num_samples=len(u), sample_rate=self.rate[k], generator=gen)
                         for k, u in units.items()}
        self.choice = random.Random(seed)  # which item of a sampled patient: independent of every other patient
        self.steps: dict[str, int] = defaultdict(int)

    def expected_batch(self, key: str) -> float:
        return self.rate[key] * len(self.units[key])

    def sample(self, key: str) -> list[int]:
        """One step's items of `key`: one per sampled patient."""
        self.steps[key] += 1
        patients = next(iter(self.samplers[key]))
        return [self.choice.choice(self.units[key][u]) for u in patients]

    def entries(self, noise_multiplier: float) -> list[list]:
        """The accountant's history entries of the steps taken: [sigma, q_k, steps of key k]."""
        return [[noise_multiplier, self.rate[k], n] for k, n in sorted(self.steps.items()) if n > 0]


class RankSum:
    """Mixed into the DP optimizers when the site trains on several ranks (client/ranks.py). Each rank clips and sums
    its own share of the step's sampled items; the noise is drawn once, on rank 0, and the noised sums are added
    across ranks before the step (as Opacus's DistributedDPOptimizer, which averages instead: here the sum is
    divided by the step's expected batch over the whole site). So every rank steps on the same gradient, the
    clipped sum over all sampled items plus one N(0, sigma^2 C^2) draw: the mechanism, the sampling and hence
    epsilon are the single process's, whatever the number of ranks."""
    ranks = None  # m3fm.distributed.Ranks, set by Clipping

    def add_noise(self):
        if self.ranks is None or self.ranks.rank == 0:
            return super().add_noise()
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not self.pre_step():
            return None
        if self.ranks is not None and self.params:
            for p, summed in zip(self.params, sum_across([p.grad for p in self.params], self.ranks.group)):
                p.grad = summed
        return self.original_optimizer.step()


class PatientDPOptimizer(RankSum, DPOptimizer):
    """Opacus's DPOptimizer with a step's per-parameter work done in a few passes over the per-item gradients.

    Opacus clips, sums, noises and scales one parameter tensor at a time: a dozen small operations per tensor, a few
    hundred a step, most of a tiny model's DP overhead. Here each parameter's per-item gradients are the tensors
    autograd made for the per-item leaves (privacy/per_sample_layers.py, `Leaves.collect` leaves them as
    `p.grad_sample`), a Linear weight's inputs and output gradients (LinearInputs) and an embedding's looked-up rows
    (EmbeddingRows), each with its own norms and clipped sum, or rows of one zeroed buffer that Opacus's hooks add
    into for any other module type (`bind`). The clip is one norm and one product per Linear weight and embedding,
    and one of each for all other per-item gradients together, into one flat (P,) sum; the noise is one draw of P
    values straight into that sum, before the step's first clipped sums are added onto it; the scaling is one
    division, and each p.grad a view of the result. The mechanism is Opacus's: every item's gradient clipped to C
    over all the step's parameters, summed, N(0, sigma^2 C^2) added to every coordinate once per step, divided by
    the expected batch. A parameter the micro-batch did not reach counts as a zero gradient for every item (clipped
    and noised alike).

    Why not one (B, P) buffer that autograd adds into, as before: it had to be zeroed every micro-batch, and each
    leaf's gradient was made, then added into it (a Linear weight's across a transpose): three passes over B x P
    values that autograd's own gradients, kept where they are made, do not need (small, batch 4: 80 of the 215 ms
    a private step cost over a plain one)."""

    summed: torch.Tensor | None = None  # (P,) clipped sum over the step's micro-batches so far

    def _buffer(self, name: str, n: int) -> torch.Tensor:
        """n values of a buffer kept for the round: a fresh 50 MB tensor a step (small's 13M parameters) costs
        first-touch page faults every time."""
        buf = self.__dict__.get(name)
        if buf is None or buf.numel() < n:
            buf = self.__dict__[name] = self.params[0].new_empty(n)
        return buf[:n]

    def bind(self, items: int, hooked: set[int] = frozenset()) -> None:
        """Before the backward pass: the step's parameters, and zeroed per-item rows for those whose module Opacus's
        hooks serve (ids in `hooked`; this model has none), for the coming backward pass to add into."""
        self.bound = self.params  # the step's parameters, in the flat sum's order (scale_grad hands out its views)
        self.sizes = [p.numel() for p in self.bound]
        self.items = items
        served = [p for p in self.bound if id(p) in hooked]
        total = sum(p.numel() for p in served)
        rows = self._buffer("_rows", items * total).view(items, total).zero_()
        for p, view in zip(served, torch.split(rows, [p.numel() for p in served], dim=1)):
            p._current_grad_sample = view.view(items, *p.shape)
        for p in self.bound:
            p.grad_sample = None

    def per_item(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """p's per-item gradients of the micro-batch, (B, *p.shape), or None where it was not reached."""
        g = p.grad_sample
        return g if g is not None else getattr(p, "_current_grad_sample", None)

    def pre_step(self, closure=None) -> bool:
        if not self.params:
            return True
        self.clip_and_accumulate()  # onto the step's noise, drawn at its first micro-batch
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def clip_and_accumulate(self) -> None:
        grads = [self.per_item(p) for p in self.bound]
        if self.summed is None:  # the step's first micro-batch: its noise first, every clipped sum added onto it
            self.summed = self.add_noise()
        slots = [out.view(p.shape) for p, out in zip(self.bound, torch.split(self.summed, self.sizes))]
        squares = torch.zeros(self.items, device=self.params[0].device)
        # the per-item tensors autograd made (LayerNorm, biases, added vectors: many and small) as one (B, sum)
        # block: one norm and one product for all of them, not two calls each (tiny: much of a step's Python)
        dense = [(slot, g) for slot, g in zip(slots, grads) if g is not None and not isinstance(g, ItemGradients)]
        block = torch.cat([g.reshape(len(g), -1).float() for _, g in dense], 1) if dense else None  # (B, sum)
        if block is not None:
            squares += block.square().sum(1)
        for g in grads:
            if isinstance(g, ItemGradients):
                squares += g.square_norms()
        factor = (self.max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)  # (B,)
        for slot, g in zip(slots, grads):
            if isinstance(g, ItemGradients):
                g.add_into(slot, factor)
        if block is not None:  # (B,) @ (B, sum), split onto the slots in one call
            torch._foreach_add_([slot.view(-1) for slot, _ in dense],
                                list(torch.split(factor @ block, [slot.numel() for slot, _ in dense])))
        # a parameter nothing reached (g None) has a zero gradient for every item: the noise alone
        for p in self.bound:
            p.grad_sample = None  # spent: its memory goes back

    def add_noise(self) -> torch.Tensor:
        """The step's (P,) sum, begun as its noise: N(0, sigma^2 C^2) drawn straight into it, once per step and, with
        several ranks, on rank 0 alone (RankSum; the others begin at zero). No noise buffer beside the sum (base: 0.9
        GB) and no pass adding one into it."""
        summed = self._buffer("_summed", sum(self.sizes))
        if self.ranks is None or self.ranks.rank == 0:
            return summed.normal_(0.0, self.noise_multiplier * self.max_grad_norm, generator=self.generator)
        return summed.zero_()

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":  # one micro-batch's backward per bind, so never more than one iteration
            self.summed /= self.expected_batch_size
        for p, g in zip(self.bound, torch.split(self.summed, self.sizes)):
            p.grad = g.view_as(p)

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            p.grad_sample = None
        if not self._is_last_step_skipped:
            self.summed = None
        self.original_optimizer.zero_grad(set_to_none)


class FastPatientDPOptimizer(RankSum, DPOptimizerFastGradientClipping):
    """Opacus's optimizer for fast gradient clipping, summed across a site's ranks when it has several."""


class Clipping:
    """One micro-batch's per-item losses into clipped, summed gradients, in one of Opacus's two ways:
      hooks  per-sample gradients made by autograd itself (the model's modules take per-item leaves,
             privacy/per_sample_layers.py; Opacus's hooks for any other), clipped and summed by the optimizer;
      fast   Opacus's fast gradient clipping (GradSampleModuleFastGradientClipping): each module's per-sample
             gradients are reduced to norms as the backward pass goes, then a second backward pass of the losses
             scaled by each item's clipping factor (DPTensorFastGradientClipping) sums the clipped gradients:
             no per-sample gradient outlives its module, one more backward pass. (Its ghost variant, norms
             without per-sample gradients, refuses a module called twice in a forward pass, as the text
             encoder is: question, then clinical text.)"""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 dp: DPSGDConfig, ranks: Ranks | None = None):
        self.two_pass = dp.clipping == "fast"
        common = dict(noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=1)  # set per step: each key has its own rate
        if self.two_pass:
            self.module = GradSampleModuleFastGradientClipping(model, max_grad_norm=dp.max_grad_norm,
                                                               use_ghost_clipping=False)
            self.optimizer = FastPatientDPOptimizer(optimizer, **common)
        else:
            # the model's modules take per-item leaves, whose gradients are the per-sample gradients
            # (privacy/per_sample_layers.py); Opacus hooks any other, at the leaves' scale (losses summed)
            self.module = OpacusHooksBeside(model, loss_reduction="sum")
            self.optimizer = PatientDPOptimizer(optimizer, **common)
        self.leaves = Leaves()
        self.own_layers = [] if self.two_pass else per_sample_layers(model, self.leaves)
        self.hooked = set() if self.two_pass else {id(p) for m in self.module.iterate_submodules(model)
                                                   for p in m.parameters(recurse=False)}
        self.optimizer.ranks = ranks

    def backward(self, losses: torch.Tensor) -> None:
        """losses: (B,) each item's loss. Parameters the micro-batch did not reach (its text encoder when no item
        has text) count as a zero gradient for every item, so every parameter of the step is clipped and noised."""
        if self.two_pass:
            for p in self.module.trainable_parameters:  # every parameter it wrapped, of this step's key or not
                p._norm_sample = losses.new_zeros(len(losses))  # overwritten where the backward pass reaches
            DPTensorFastGradientClipping(self.module, self.optimizer, losses, "mean").backward()
            for p in self.optimizer.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        self.optimizer.bind(len(losses), self.hooked)
        losses.sum().backward()  # each item's own gradient (the optimizer divides by the expected batch)
        self.leaves.collect(len(losses))

    def nothing_sampled(self) -> None:
        """An empty Poisson sample: a zero sum, so the step is the noise alone."""
        if not self.two_pass:
            self.optimizer.bind(0)
            return
        for p in self.optimizer.params:
            p.grad = torch.zeros_like(p)

    def close(self) -> None:
        # the site's service keeps this model for the next round: Opacus's own cleanup removes its hooks and the
        # per-sample attributes it added to the parameters
        self.module._close()
        restore(self.own_layers)


def private_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, planned: PrivateRound,
                     dp: DPSGDConfig, ledger: PrivacyLedger, ranks: Ranks | None = None):
    """Wrap model and optimizer with Opacus (per-sample clipping, noise) -> (Clipping with the DP optimizer, a
    function that records the round's sampler steps in the ledger once training is done: by rank 0 alone when the
    site has several ranks, which all sampled the same patients)."""
    clipping = Clipping(model, optimizer, planned.noise_multiplier, dp, ranks)

    def finish(sampler: PatientSampler, run: str, server_round: int, phase: str) -> PrivateRound:
        clipping.close()
        entries = sampler.entries(planned.noise_multiplier)
        history = ledger.history + entries
        done = PrivateRound(planned.noise_multiplier, max(e[1] for e in entries), sum(e[2] for e in entries),
                            planned.delta, epsilon_of(history, planned.delta), planned.epsilon_before)
        if ranks is None or ranks.rank == 0:
            ledger.record(history, {"run": run, "round": server_round, "phase": phase, "unit": UNIT,
                                    "at": time.time(), **asdict(done)})
        return done

    return clipping, finish
