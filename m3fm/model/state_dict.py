"""Strict state-dict comparison: every missing, unexpected or differently shaped/typed key, named. Below the model
(text.py checks local RoBERTa weights with it) and used by m3fm/checkpoint.py for every load."""

from __future__ import annotations

import torch


class CheckpointMismatchError(ValueError):
    """A state dict does not match the model: missing, unexpected, or differently shaped/typed keys."""


def state_dict_problems(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"missing key {k}" for k in expected if k not in got]
    problems += [f"unexpected key {k}" for k in got if k not in expected]
    for k in expected.keys() & got.keys():
        e, g = expected[k], got[k]
        if tuple(e.shape) != tuple(g.shape):
            problems.append(f"shape of {k}: expected {tuple(e.shape)}, got {tuple(g.shape)}")
        elif e.dtype != g.dtype:
            problems.append(f"dtype of {k}: expected {e.dtype}, got {g.dtype}")
    return sorted(problems)


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    problems = state_dict_problems(expected, got)
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointMismatchError(f"{source} does not match the model ({len(problems)} problems):\n  {shown}")
