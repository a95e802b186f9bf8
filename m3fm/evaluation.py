"""Evaluate a model on a site's split: predictions per task, then m3fm/metrics.py over them.

Every question of the split is answered once with the deterministic evaluation
input (first phrasing, thinnest series, annotated slab). What comes back per
task is the site's own business; `evaluate_tasks` turns it into metrics in
which groups under the minimum cell size are suppressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from m3fm.data.collate import collate_qa
from m3fm.data.datasets import QADataset, SiteData
from m3fm.metrics import SUPPRESSED, task_metrics
from m3fm.model.heads import task_probabilities
from m3fm.model.m3fm import M3FM
from m3fm.model.text import TextTokenizer
from m3fm.tasks import get_task


@dataclass
class TaskPredictions:
    probs: np.ndarray  # as m3fm/model/heads.task_probabilities gives them
    answers: list = field(default_factory=list)
    exam_ids: list[str] = field(default_factory=list)
    loss_sum: float = 0.0

    @property
    def n(self) -> int:
        return len(self.answers)


@torch.no_grad()
def collect_predictions(model: M3FM, data: SiteData, tokenizer: TextTokenizer, split: str, tasks=None,
                        batch_size: int = 8, min_items: int = 1, draw: int = 0) -> dict[str, TaskPredictions]:
    """task -> predictions on the split, for tasks with at least min_items questions there. `draw` seeds what an
    evaluation item still draws (a negative's nodule slab, a lung without a label): reports use draw 0."""
    model.eval()
    device = next(model.parameters()).device
    ds = QADataset(data, split, tasks=tasks, train=False, seed=draw)
    out: dict[str, TaskPredictions] = {}
    for name in sorted(set(ds.keys)):
        idx = [i for i, k in enumerate(ds.keys) if k == name]
        if len(idx) < min_items:
            continue
        task, probs, pred = get_task(name), [], TaskPredictions(np.zeros(0))
        for j in range(0, len(idx), batch_size):
            samples = [ds[i] for i in idx[j:j + batch_size]]
            batch = collate_qa(samples, tokenizer, model.cfg).to(device)
            logits, task_logits = model(batch)
            pred.loss_sum += model.forward_task_loss(batch, logits, task_logits)[0].item() * len(samples)
            probs.append(task_probabilities(task, logits, model.cfg.hazard).float().cpu().numpy())
            pred.answers += [s["answer"] for s in samples]
            pred.exam_ids += [s["exam_id"] for s in samples]
        pred.probs = np.concatenate(probs)
        out[name] = pred
    return out


def evaluate_tasks(model: M3FM, data: SiteData, tokenizer: TextTokenizer, min_cell: int, split: str = "test",
                   threshold: float = 0.5, roc: bool = False, tasks=None) -> dict[str, dict]:
    """task -> metrics (m3fm/metrics.task_metrics) on the split; roc=True keeps the curve points."""
    preds = collect_predictions(model, data, tokenizer, split, tasks)
    return {name: {**task_metrics(get_task(name), p.probs, p.answers, min_cell, threshold, p.exam_ids, roc),
                   "loss": p.loss_sum / p.n if p.n >= min_cell else SUPPRESSED}
            for name, p in preds.items()}
