"""M3FM: CTViT + RoBERTa-style text encoder + task encoder + predictors (paper Fig. 1a, Fig. 8).

One model class carries everything a site trains: the multitask QA path and,
for pretraining, the MIM decoder (forward_encoder / forward_decoder /
forward_loss, as in MAE) and the MLM head. Keeping them in one module gives
one state dict, which is what federated rounds exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3fm.model.configs import M3FMConfig
from m3fm.model.ctvit import CTViT
from m3fm.model.fusion import TaskEncoder
from m3fm.model.heads import Predictor, task_loss, task_probabilities
from m3fm.model.mae import MIMDecoder
from m3fm.model.text import MLMHead, TextEncoder
from m3fm.tasks import ALL_TASKS, TASK_INDEX, get_task, head_outputs


@dataclass
class QABatch:
    """One micro-batch of one task (task-parallel training: one task per micro-batch)."""

    task: str
    question_ids: torch.Tensor  # (B, Q)
    question_mask: torch.Tensor  # (B, Q) bool
    target: torch.Tensor  # ce: (B,) long; hazard: (B, 6) float; digits: (B, 3) long
    target_mask: torch.Tensor | None = None  # hazard: (B, 6) censoring mask
    text_ids: torch.Tensor | None = None  # (B, T) clinical text or report
    text_mask: torch.Tensor | None = None
    image: torch.Tensor | None = None  # (B, 1, S, H, W) at the task's scale
    voxel_size: torch.Tensor | None = None  # (B, 3) mm per voxel (s, h, w)
    image_mask: torch.Tensor | None = None  # (B, L) bool: tokens inside the region box

    def to(self, device: torch.device | str) -> "QABatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return QABatch(**moved)

    def __len__(self) -> int:
        return self.question_ids.shape[0]


@dataclass
class PretrainBatch:
    """A batch of CT crops of one scale for MIM, with text for MLM."""

    image: torch.Tensor  # (B, 1, S, H, W)
    voxel_size: torch.Tensor  # (B, 3)
    scale: str
    text_ids: torch.Tensor | None = None  # (B, T) clinical text / reports
    text_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PretrainBatch":
        move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return PretrainBatch(*(move(getattr(self, f.name)) for f in fields(self)))


class M3FM(nn.Module):
    def __init__(self, cfg: M3FMConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = CTViT(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.task_encoder = TaskEncoder(cfg)
        self.heads = nn.ModuleDict({name: Predictor(cfg.img_dim, cfg.predictor_hidden, n, cfg.predictor_norm_eps)
                                    for name, n in head_outputs().items()})
        self.task_id_head = Predictor(cfg.img_dim, cfg.predictor_hidden, len(ALL_TASKS), cfg.predictor_norm_eps)
        # pretraining only
        self.mim_decoder = MIMDecoder(cfg)
        self.mlm_head = MLMHead(cfg)

    # ---- masked image modeling (MAE) ----
    def forward_encoder(self, imgs, voxel_size, scale: str, mask_ratio: float, generator=None):
        return self.image_encoder.forward_masked(imgs, voxel_size, scale, mask_ratio, generator)

    def forward_decoder(self, latent, mask, ids_restore, scale: str):
        return self.mim_decoder.forward_decoder(latent, mask, ids_restore, scale)

    def forward_loss(self, imgs, pred, mask, scale: str, reduce: bool = True):
        return self.mim_decoder.forward_loss(imgs, pred, mask, scale, reduce)

    def forward_mim(self, imgs: torch.Tensor, voxel_size: torch.Tensor, scale: str,
                    mask_ratio: float | None = None, generator: torch.Generator | None = None, reduce: bool = True):
        """-> loss () or, reduce=False, (B,); pred (B, L, P), mask (B, L)."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, voxel_size, scale, ratio, generator)
        pred = self.forward_decoder(latent, mask, ids_restore, scale)
        return self.forward_loss(imgs, pred, mask, scale, reduce), pred, mask

    # ---- masked language modeling ----
    def forward_mlm(self, input_ids: torch.Tensor, attn_mask: torch.Tensor, labels: torch.Tensor,
                    per_sample: bool = False) -> torch.Tensor:
        """input_ids, attn_mask, labels: (B, T); labels -100 where nothing is predicted.

        per_sample: each record's mean over its masked tokens (B,). DP-SGD needs both per-sample gradients (the
        vocabulary layer's input keeps its batch dimension B) and no cross-sample normalisation. Each record's
        masked positions come first, padded to the batch's largest count K with unmasked ones (label -100), so the
        vocabulary layer runs on (B, K) positions, about 15% of (B, T): at every position it was most of a DP
        pretraining step (issue 16). The default, the mean over all masked tokens, sends (N,) positions.
        """
        hidden = self.text_encoder(input_ids, attn_mask)  # (B, T, Dt)
        picked = labels != -100
        if per_sample:
            count = picked.sum(1)  # (B,)
            k = max(int(count.max()), 1)
            order = torch.argsort(picked.to(torch.int8), dim=1, descending=True, stable=True)[:, :k]  # (B, K)
            chosen = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, Dt)
            logits = self.mlm_head(chosen)  # (B, K, V)
            tokens = F.cross_entropy(logits.float().flatten(0, 1), labels.gather(1, order).flatten(),
                                     ignore_index=-100, reduction="none").view(order.shape)  # (B, K), 0 at the padding
            return tokens.sum(1) / count.clamp(min=1)  # (B,)
        logits = self.mlm_head(hidden[picked])  # (N, V): only masked positions reach the vocabulary layer
        return F.cross_entropy(logits.float(), labels[picked])

    # ---- multitask question answering ----
    def encode_question(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, Q) -> (B, Dt), the question part of the <TASK> token (cfg.question_pooling)."""
        hidden = self.text_encoder(ids, mask)  # (B, Q, Dt)
        if self.cfg.question_pooling == "first":
            return hidden[:, 0]
        keep = mask[..., None].to(hidden.dtype)  # (B, Q, 1)
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)

    def forward(self, batch: QABatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> answer head output (B, num_outputs of the task), task-ID logits (B, num_tasks)."""
        task = get_task(batch.task)
        task_token = self.encode_question(batch.question_ids, batch.question_mask)
        image = None
        image_mask = None
        if batch.image is not None:
            if task.scale is None:
                raise ValueError(f"task {task.name!r} takes no image but the batch has one")
            image = self.image_encoder(batch.image, batch.voxel_size, task.scale, batch.image_mask)
            if batch.image_mask is not None:
                image_mask = torch.cat([torch.ones_like(batch.image_mask[:, :1]), batch.image_mask], 1).bool()
        text = None if batch.text_ids is None else self.text_encoder(batch.text_ids, batch.text_mask)
        feature = self.task_encoder(task_token, task.name, image, image_mask, text, batch.text_mask)
        # the task-ID predictor reads the question alone (through the same projection as the task token)
        task_logits = self.task_id_head(self.task_encoder.task_proj(task_token))
        return self.heads[task.head](feature), task_logits

    def forward_task_loss(self, batch: QABatch, out: torch.Tensor, task_logits: torch.Tensor, reduce: bool = True):
        """-> answer loss, task-ID loss: () each or, reduce=False, (B,) each."""
        task = get_task(batch.task)
        task_ids = torch.full((len(batch),), TASK_INDEX[task.name], device=task_logits.device)
        return (task_loss(task, out, batch.target, batch.target_mask, reduce, self.cfg.hazard),
                F.cross_entropy(task_logits.float(), task_ids, reduction="mean" if reduce else "none"))

    @torch.no_grad()
    def predict(self, batch: QABatch) -> torch.Tensor:
        out, _ = self(batch)
        return task_probabilities(get_task(batch.task), out, self.cfg.hazard)

    @torch.no_grad()
    def predict_task(self, question_ids: torch.Tensor, question_mask: torch.Tensor) -> list[str]:
        """Route free-text questions to tasks with the task-ID predictor."""
        task_token = self.encode_question(question_ids, question_mask)
        idx = self.task_id_head(self.task_encoder.task_proj(task_token)).argmax(dim=-1)
        return [ALL_TASKS[i].name for i in idx.tolist()]


COMPONENTS = {
    "image_encoder": ("image_encoder",),
    "text_encoder": ("text_encoder",),
    "task_encoder": ("task_encoder",),
    "predictors": ("heads", "task_id_head"),
    "mim_decoder": ("mim_decoder",),
    "mlm_head": ("mlm_head",),
}


def count_parameters(cfg: M3FMConfig) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory is allocated).

    'total' is the model used for multitask training and inference; the MIM decoder and
    MLM head are pretraining-only and reported apart.
    """
    with torch.device("meta"):
        model = M3FM(cfg)
    counts = {name: sum(p.numel() for m in mods for p in getattr(model, m).parameters())
              for name, mods in COMPONENTS.items()}
    counts["total"] = sum(counts[k] for k in ("image_encoder", "text_encoder", "task_encoder", "predictors"))
    return counts
