"""Checkpoints with strict key, shape and dtype checks.

The public M3FM code loads weights with strict=False, which silently ignores
missing, unexpected and mismatched keys; here any mismatch raises an error
that lists the offending keys. Writes are atomic (temporary file + rename), so
a crash mid-save never leaves a truncated checkpoint in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from m3fm.model.configs import M3FMConfig
from m3fm.model.state_dict import CheckpointMismatchError, check_state_dict  # noqa: F401 - callers catch it from here

FORMAT = 1


def save_checkpoint(path: str | Path, model: nn.Module, cfg: M3FMConfig, optimizer=None, step: int = 0,
                    extra: dict | None = None) -> Path:
    return write_checkpoint(path, model.state_dict(), cfg, optimizer.state_dict() if optimizer is not None else None,
                            step, extra)


def write_checkpoint(path: str | Path, state: dict[str, torch.Tensor], cfg: M3FMConfig, optimizer_state=None,
                     step: int = 0, extra: dict | None = None) -> Path:
    """A checkpoint from a state dict (e.g. the coordinator's global weights, which live in no model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "config": cfg.to_dict(), "step": step, "extra": extra or {},
               "model": state, "optimizer": optimizer_state}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise ValueError(f"{path} is not an m3fm-fed checkpoint (format {FORMAT})")
    return payload


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, payload: dict | None = None) -> dict:
    """Load weights (and optimizer state) after checking every key, shape and dtype; returns the payload.
    payload: the checkpoint as read_checkpoint(path) gave it already (a large file is read once)."""
    payload = payload if payload is not None else read_checkpoint(path)
    check_state_dict(model.state_dict(), payload["model"], f"checkpoint {path}")
    model.load_state_dict(payload["model"], strict=True)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    return payload
