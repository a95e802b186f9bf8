"""Which part of the training signal each parameter depends on, for task-aware federated averaging.

A site that has no labels for a task never updates that task's predictor, and a
site that trained no crop at some scale never updates that scale's tokenizer
(patch embedding, position tables, MIM prediction layer). Averaging such
parameters over every site would pull them toward stale copies, so each
parameter belongs to a group and is averaged only over the sites that trained
the group, weighted by their sample counts for it (server/strategy.py).

Groups:
  shared        encoders, task encoder, task-ID predictor: every training site
  scale:<name>  the image tokenizer and MIM prediction layer of one scale
  head:<name>   one answer predictor (shared by the tasks with its answer space)
  task:<name>   one task's learned embedding in the <TASK> token (m3fm/model/fusion.py)
  mim           the MIM decoder trunk (pretraining with images)
  mlm           the MLM head (pretraining with text)
"""

from __future__ import annotations

from collections import Counter

from m3fm.tasks import get_task

SCALE_PREFIXES = ("image_encoder.patch_embed.", "image_encoder.pos_embed.", "image_encoder.scale_cls.",
                  "mim_decoder.pos_embed.",
                  "mim_decoder.pred.")


def parameter_group(name: str) -> str:
    for prefix in SCALE_PREFIXES:
        if name.startswith(prefix):
            return "scale:" + name[len(prefix):].split(".")[0]
    if name.startswith("task_encoder.task_embed."):
        return "task:" + name.split(".")[2]
    if name.startswith("heads."):
        return "head:" + name.split(".")[1]
    if name.startswith("mim_decoder."):
        return "mim"
    if name.startswith("mlm_head."):
        return "mlm"
    return "shared"


def pretrain_group_counts(scale_items: dict[str, int], text_items: int) -> dict[str, int]:
    """Sample counts per group for a pretraining round: scale -> crops trained at that scale."""
    images = sum(scale_items.values())
    counts = {f"scale:{s}": n for s, n in scale_items.items() if n > 0}
    counts.update(shared=images, mim=images)
    if text_items > 0:
        counts["mlm"] = text_items
    return counts


def multitask_group_counts(task_items: dict[str, int]) -> dict[str, int]:
    """Sample counts per group for a multitask round: task -> labelled items trained for that task."""
    counts: Counter = Counter()
    for name, n in task_items.items():
        task = get_task(name)
        counts["shared"] += n
        counts[f"head:{task.head}"] += n
        counts[f"task:{name}"] += n
        if task.scale is not None:
            counts[f"scale:{task.scale}"] += n
    return {k: v for k, v in counts.items() if v > 0}
