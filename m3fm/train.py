"""Local training steps: MIM + MLM pretraining, and task-parallel multitask QA.

Settings follow the paper's Methods: AdamW with weight decay 0.05, cosine
schedule with warmup, layer-wise lr decay 0.95, mixed precision (bf16 autocast
here, on CUDA only), clinical elements kept with p = 0.8 in training (the
collate functions apply that). Multitask training puts one task in each
micro-batch and accumulates the gradients of several tasks before one
optimizer step: the paper's distributed task-parallel training, on one device.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from m3fm.model.m3fm import M3FM, PretrainBatch, QABatch
from m3fm.model.text import TextTokenizer, mask_for_mlm


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.05
    layer_decay: float = 0.95
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    mask_ratio: float | None = None  # None: the model configuration's (0.85)
    mlm_prob: float = 0.15
    mlm_weight: float = 1.0
    task_id_weight: float = 0.1
    amp: bool = True  # bf16 autocast when the model is on CUDA


def paper_pretraining() -> TrainConfig:
    # CTViT pretraining: 200K iterations, 10K warmup, batch 192, lr 3.75e-4
    return TrainConfig(lr=3.75e-4, warmup_steps=10_000, total_steps=200_000)


def paper_multitask() -> TrainConfig:
    # task training: 30K iterations, 2K warmup, lr 2e-4, layer-wise decay 0.95
    return TrainConfig(lr=2e-4, warmup_steps=2_000, total_steps=30_000)


# Parameters that are positions or learned tokens: no weight decay, like biases and norms.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "scale_cls", "registers", "mask_token")


def layer_depth(name: str, model: M3FM) -> tuple[int, int] | None:
    """(layer id, number of layers) of a parameter within its stack, for layer-wise lr decay.

    Embeddings are layer 0, block i is layer i + 1; parameters outside the two encoders
    (task encoder, predictors, pretraining heads) are not decayed.
    """
    cfg = model.cfg
    parts = name.split(".")
    if parts[0] == "image_encoder":
        n = cfg.img_depth
        if parts[1] in ("patch_embed", "pos_embed", "cls_token", "scale_cls"):
            return 0, n
        return (int(parts[2]) + 1, n) if parts[1] == "blocks" else (n + 1, n)
    if parts[0] == "text_encoder":
        n = cfg.text_depth
        if parts[2] == "embeddings":
            return 0, n
        return (int(parts[4]) + 1, n) if parts[2:4] == ["encoder", "layer"] else (n + 1, n)
    return None


def param_groups(model: M3FM, weight_decay: float, layer_decay: float) -> list[dict]:
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = layer_depth(name, model)
        scale = 1.0 if depth is None else layer_decay ** (depth[1] + 1 - depth[0])
        no_decay = p.ndim == 1 or any(k in name for k in NO_DECAY_NAMES)
        wd = 0.0 if no_decay else weight_decay
        group = groups.setdefault((scale, wd), {"params": [], "lr_scale": scale, "weight_decay": wd})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: M3FM, tc: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.layer_decay), lr=tc.lr, betas=tc.betas)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr over the remaining steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.total_steps - tc.warmup_steps))
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, tc: TrainConfig) -> float:
    lr = lr_at(step, tc)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, tc: TrainConfig):
    if tc.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def micro_batch_rng(seed: int | None, device: torch.device):
    """Dropout and drop path of one micro-batch drawn from its own seed (forward and, under activation
    checkpointing, the recomputation in backward), so it is the same on whichever of a site's ranks runs it; torch's
    generator is put back afterwards. None: the generator as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, tc: TrainConfig, before_step=None) -> float:
    if before_step is not None:  # e.g. FedProx's proximal gradient, added to the loss gradient before clipping
        before_step()
    norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip else float("inf"))
    optimizer.step()
    return float(norm)


def pretrain_loss(model: M3FM, batch: PretrainBatch, tokenizer: TextTokenizer, tc: TrainConfig,
                  generator: torch.Generator | None = None, per_sample: bool = False):
    """MIM on a CT batch plus MLM on its text -> (loss, mim, mlm); the batch is moved to the model's device here,
    after the MLM masks are drawn on its CPU copy (`generator` is a CPU generator).
    per_sample: each sample's loss (B,) for DP-SGD (and MLM in the form it needs, M3FM.forward_mlm)."""
    device = model_device(model)
    mlm_inputs = None
    if batch.text_ids is not None:
        mlm_inputs = mask_for_mlm(batch.text_ids, tokenizer, tc.mlm_prob, generator)
    batch = batch.to(device)
    with autocast(device, tc):
        mim, _, _ = model.forward_mim(batch.image, batch.voxel_size, batch.scale, tc.mask_ratio, generator,
                                      reduce=not per_sample)
        loss = mim
        mlm = torch.zeros_like(mim)
        if mlm_inputs is not None:
            inputs, labels = (t.to(device) for t in mlm_inputs)
            mlm = model.forward_mlm(inputs, batch.text_mask, labels, per_sample=per_sample)
            loss = mim + tc.mlm_weight * mlm
    return loss, mim, mlm


def qa_loss(model: M3FM, mb: QABatch, tc: TrainConfig, per_sample: bool = False):
    """One one-task micro-batch -> (answer loss + weighted task-ID loss, answer loss), () each or, per_sample,
    (B,) each; mb on the model's device."""
    with autocast(model_device(model), tc):
        out, task_logits = model(mb)
        answer_loss, id_loss = model.forward_task_loss(mb, out, task_logits, reduce=not per_sample)
    return answer_loss + tc.task_id_weight * id_loss, answer_loss


def pretrain_step(model: M3FM, optimizer: torch.optim.Optimizer, batches: PretrainBatch | list[PretrainBatch],
                  tokenizer: TextTokenizer, tc: TrainConfig, step: int,
                  generators: torch.Generator | list[torch.Generator] | None = None, before_step=None,
                  seeds: list[int] | None = None) -> dict:
    """One optimizer step of MIM on CT plus MLM on its text, accumulated over one batch or several micro-batches
    (`generators`: one per micro-batch, fixing its masks; `seeds`: one per micro-batch, fixing its dropout). A rank
    of a site may have none in a step (fewer micro-batches than ranks): its `before_step` then brings the others'
    gradients."""
    micro = batches if isinstance(batches, list) else [batches]
    generators = generators if isinstance(generators, list) else [generators] * len(micro)
    device = model_device(model)
    if not micro and before_step is None:
        raise ValueError("pretrain_step needs at least one batch")
    model.train()
    lr = set_lr(optimizer, step, tc)
    optimizer.zero_grad(set_to_none=True)
    total, mims, mlms = 0.0, [], []
    for batch, generator, seed in zip(micro, generators, seeds or [None] * len(micro)):
        with micro_batch_rng(seed, device):
            loss, mim, mlm = pretrain_loss(model, batch, tokenizer, tc, generator)
            (loss / len(micro)).backward()
        total += loss.item() / len(micro)
        mims.append(mim.item())
        mlms.append(mlm.item())
    grad_norm = _optimizer_step(model, optimizer, tc, before_step)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"loss": total, "mim": mean(mims), "mlm": mean(mlms), "mims": mims, "mlms": mlms, "lr": lr,
            "grad_norm": grad_norm}


def multitask_step(model: M3FM, optimizer: torch.optim.Optimizer, micro_batches: list[QABatch], tc: TrainConfig,
                   step: int, before_step=None, seeds: list[int] | None = None) -> dict:
    """Accumulate the gradients of several one-task micro-batches, then take one optimizer step (`seeds`: one per
    micro-batch, fixing its dropout). A rank of a site may have none in a step (fewer tasks than ranks): its
    `before_step` then brings the others' gradients."""
    if not micro_batches and before_step is None:
        raise ValueError("multitask_step needs at least one micro-batch")
    model.train()
    device = model_device(model)
    lr = set_lr(optimizer, step, tc)
    optimizer.zero_grad(set_to_none=True)
    per_task: dict[str, list[float]] = {}
    total = 0.0
    for mb, seed in zip(micro_batches, seeds or [None] * len(micro_batches)):
        with micro_batch_rng(seed, device):
            loss, answer_loss = qa_loss(model, mb.to(device), tc)
            loss = loss / len(micro_batches)
            loss.backward()
        total += loss.item()
        per_task.setdefault(mb.task, []).append(answer_loss.item())
    grad_norm = _optimizer_step(model, optimizer, tc, before_step)
    return {"loss": total, "tasks": {k: sum(v) / len(v) for k, v in per_task.items()}, "lr": lr,
            "grad_norm": grad_norm}
