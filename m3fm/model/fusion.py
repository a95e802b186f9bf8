"""Task encoder: fuses the <TASK> token, learned registers, image and clinical-text tokens.

Sequence: [task (1) | registers (R) | image tokens (CLS + patches) | text tokens].
The task token is the question's first-token (<s>) embedding from the text
encoder; the task encoder's output at that position is the task-specific
feature the predictors read (paper Fig. 8e).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from m3fm.model.configs import M3FMConfig
from m3fm.model.ctvit import Block, PrependTokens, init_weights, run_blocks


class TaskEncoder(nn.Module):
    def __init__(self, cfg: M3FMConfig):
        super().__init__()
        dim = cfg.img_dim
        self.act_checkpoint = cfg.act_checkpoint
        # linear maps from each embedding space into the task embedding space
        self.task_proj = nn.Linear(cfg.text_dim, dim)
        self.image_proj = nn.Linear(cfg.img_dim, dim)
        self.text_proj = nn.Linear(cfg.text_dim, dim)
        self.registers = PrependTokens(cfg.num_registers, dim)
        self.blocks = nn.ModuleList(Block(dim, cfg.fusion_heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.fusion_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)

    def forward(self, task_token: torch.Tensor, image: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """task_token: (B, Dt); image: (B, Li, Di) with image_mask (B, Li) bool; text: (B, Lt, Dt) with
        text_mask (B, Lt) bool; a missing modality is left out of the sequence -> (B, D)."""
        B = task_token.shape[0]
        parts, masks = [], []
        if image is not None:
            parts.append(self.image_proj(image))
            masks.append(image_mask if image_mask is not None else image.new_ones(B, image.shape[1], dtype=torch.bool))
        if text is not None:
            parts.append(self.text_proj(text))
            masks.append(text_mask if text_mask is not None else text.new_ones(B, text.shape[1], dtype=torch.bool))
        task = self.task_proj(task_token)[:, None, :]
        rest = torch.cat(parts, dim=1) if parts else task.new_zeros(B, 0, task.shape[-1])
        x = torch.cat([task, self.registers(rest)], dim=1)  # (B, 1 + R + Li + Lt, D)
        always = torch.ones(B, 1 + self.registers.tokens.shape[1], dtype=torch.bool, device=x.device)
        attn_mask = torch.cat([always, *masks], dim=1) if masks else None
        x = self.norm(run_blocks(self.blocks, x, attn_mask, self.act_checkpoint))
        return x[:, 0]
