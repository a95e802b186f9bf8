"""Task encoder: fuses the <TASK> token, learned registers, image and clinical-text tokens.

Sequence: [task (1) | registers (R) | image tokens (CLS + patches) | text tokens].
The task token is the question's encoding from the text encoder (M3FM.encode_question)
plus a learned embedding of the task the question asks, plus (cfg.task_image_summary)
the image's CLS output; the task encoder's output at that position is the
task-specific feature the predictors read (paper Fig. 8e).

Why the image summary: the paper's token holds the question alone and must learn to
attend to the image among the clinical-text tokens (about a hundred of them, against
the tiny scale's 25 image tokens). Clinical text predicts many findings a little
(smoking, disease history), so a fresh model learned that first and sat on it: with
emphysema, which the crop's mean intensity separates perfectly, the answer stayed at
the text's AUC of about 0.75 for hundreds of steps in half the seeds (removing the
text made it learn in every seed). With the CLS summary in the token from step 1
the image is learned in every seed (benchmarks/task_token.py). It reuses image_proj,
so the state dict is the public code's.

Why the task embedding: the paper's task token is the question's <s> output of a
pretrained RoBERTa. Trained from scratch, the question encoding tells tasks apart
only as fast as the text encoder learns, and tasks that share an image scale and a
yes/no predictor (emphysema, consolidation, ... on the chest crop) then collapse into
one "anything abnormal?" answer (issue 14: asked another question about the same
scans, the model's answer moved by under 0.006). A per-task vector gives every task
its own token from step 1; each is averaged only over the sites that trained that
task (group "task:<name>", m3fm/weights/groups.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from m3fm.model.configs import M3FMConfig
from m3fm.model.ctvit import Block, PrependTokens, init_weights, run_blocks
from m3fm.tasks import ALL_TASKS


class AddVector(nn.Module):
    """x + a learned vector; a module of its own so Opacus computes its per-sample gradients."""

    def __init__(self, dim: int):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.vector, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.vector


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
        self.task_embed = nn.ModuleDict({t.name: AddVector(dim) for t in ALL_TASKS})
        self.image_summary = cfg.task_image_summary
        self.blocks = nn.ModuleList(Block(dim, cfg.fusion_heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.fusion_depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_weights)

    def forward(self, task_token: torch.Tensor, task: str, image: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """task_token: (B, Dt) the question's encoding; task: the task it asks; image: (B, Li, Di) with
        image_mask (B, Li) bool; text: (B, Lt, Dt) with text_mask (B, Lt) bool; a missing modality is left out
        of the sequence -> (B, D)."""
        B = task_token.shape[0]
        parts, masks = [], []
        if image is not None:
            parts.append(self.image_proj(image))
            masks.append(image_mask if image_mask is not None else image.new_ones(B, image.shape[1], dtype=torch.bool))
        if text is not None:
            parts.append(self.text_proj(text))
            masks.append(text_mask if text_mask is not None else text.new_ones(B, text.shape[1], dtype=torch.bool))
        token = self.task_embed[task](self.task_proj(task_token))  # (B, D)
        if image is not None and self.image_summary:
            token = token + self.image_proj(image[:, 0])  # the image encoder's CLS output
        token = token[:, None, :]  # (B, 1, D)
        rest = torch.cat(parts, dim=1) if parts else token.new_zeros(B, 0, token.shape[-1])
        x = torch.cat([token, self.registers(rest)], dim=1)  # (B, 1 + R + Li + Lt, D)
        always = torch.ones(B, 1 + self.registers.tokens.shape[1], dtype=torch.bool, device=x.device)
        attn_mask = torch.cat([always, *masks], dim=1) if masks else None
        x = self.norm(run_blocks(self.blocks, x, attn_mask, self.act_checkpoint))
        return x[:, 0]
