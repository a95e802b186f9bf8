"""Answer predictors, the task-ID predictor, the hazard layer and the per-kind losses.

Every predictor is a 2-layer MLP (paper, Predictors). Risk tasks output a base
hazard and six yearly hazards; the yearly hazards pass a softplus, so the
cumulative logit, and with it the risk, can never fall from one year to the
next (the public code defines a ReLU but never applies it, and its demo risk
falls from 0.90 to 0.51 over six years).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3fm.model.ctvit import init_weights
from m3fm.tasks import HAZARD_YEARS, Task


class Predictor(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, dim: int, hidden: int, out: int, norm_eps: float = 1e-6):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=norm_eps)
        self.fc2 = nn.Linear(hidden, out)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def cumulative_hazard(out: torch.Tensor, form: str = "monotone") -> torch.Tensor:
    """out: (B, 1 + Y) raw [base, yearly hazards] -> cumulative logits (B, Y): base + the hazards up to each year,
    through a softplus ("monotone": non-decreasing in Y) or raw ("reference", the public code's arithmetic)."""
    hazards = F.softplus(out[:, 1:]) if form == "monotone" else out[:, 1:]
    return out[:, :1] + hazards.cumsum(dim=-1)


def hazard_targets(years_to_event: torch.Tensor, event: torch.Tensor, horizon: int = HAZARD_YEARS):
    """Per-year labels and censoring mask for risk within 1..horizon years.

    years_to_event: (B,) years from the exam to the event (event=1) or to the last follow-up (event=0).
    -> y (B, horizon): 1 where the event happened within that many years;
       mask (B, horizon): 1 where that is known (a censored patient is known event-free only up to
       the follow-up time).
    """
    years = torch.arange(1, horizon + 1, dtype=torch.float32)[None]  # (1, Y)
    t = years_to_event.float()[:, None]
    observed = event.bool()[:, None]
    y = (observed & (t <= years)).float()
    mask = (observed | (years <= t)).float()
    return y, mask


def hazard_loss(cum_logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Censoring-masked BCE: each patient's mean over its known years, then the mean over patients.

    Per-patient first, so one patient's loss (and gradient) never depends on who else is in the batch:
    DP-SGD's sensitivity bound (privacy/dp_sgd.py) needs that."""
    mask = mask.float()
    cells = F.binary_cross_entropy_with_logits(cum_logits.float(), y.float(), reduction="none") * mask  # (B, Y)
    per_patient = cells.sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    return per_patient.mean() if reduce else per_patient


def task_loss(task: Task, out: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor | None = None,
              reduce: bool = True, hazard: str = "monotone") -> torch.Tensor:
    """out: raw head output (B, task.num_outputs); target as the task's loss kind expects -> () or, reduce=False,
    each sample's loss (B,) (what ghost clipping scales per sample)."""
    if task.loss == "ce":
        return F.cross_entropy(out.float(), target, ignore_index=-100, reduction="mean" if reduce else "none")
    if task.loss == "hazard":
        if target_mask is None:
            raise ValueError(f"task {task.name!r} needs a censoring mask with its targets")
        return hazard_loss(cumulative_hazard(out, hazard), target, target_mask, reduce)
    if task.loss == "digits":  # (B, 3) digits; per-sample mean over its known digits, then over the batch
        per_digit = F.cross_entropy(out.float().reshape(-1, 10), target.reshape(-1), ignore_index=-100,
                                    reduction="none").reshape(target.shape)
        known = (target != -100).float()
        per_sample = (per_digit * known).sum(1) / known.sum(1).clamp(min=1)
        return per_sample.mean() if reduce else per_sample
    raise ValueError(f"task {task.name!r} has unknown loss kind {task.loss!r}")


def task_probabilities(task: Task, out: torch.Tensor, hazard: str = "monotone") -> torch.Tensor:
    """ce: (B, A) softmax; hazard: (B, Y) risk within 1..Y years; digits: (B, 3, 10) per-digit softmax."""
    if task.loss == "ce":
        return out.float().softmax(dim=-1)
    if task.loss == "hazard":
        return torch.sigmoid(cumulative_hazard(out.float(), hazard))
    return out.float().reshape(-1, 3, 10).softmax(dim=-1)


def digits_target(value: float) -> list[int]:
    """A number 0..999 as three digits (hundreds, tens, ones), rounded; -100 (ignored) when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return [-100, -100, -100]
    v = min(max(int(round(value)), 0), 999)
    return [v // 100, v // 10 % 10, v % 10]
