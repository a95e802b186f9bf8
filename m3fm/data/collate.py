"""Turn samples into model batches: tokenization, clinical-element dropout, targets.

A QA sample is a dict:
  task        task name (all samples of a batch share it)
  question    one of the task's phrasings
  clinical    list of clinical sentences (one per clinical element), or
  report      radiology report text (tasks whose text slot is "report")
  image       float array (1, S, H, W) at the task's scale, or absent
  voxel_size  (3,) mm per voxel (s, h, w) of that array
  image_mask  optional (L,) bool: tokens inside the region box
  answer      ce: answer index; hazard: (years_to_event, event); digits: a number 0..999
  keep_sentences  optional clinical sentences never dropped (they hold the answer)
"""

from __future__ import annotations

import random

import numpy as np
import torch

from m3fm.model.configs import M3FMConfig
from m3fm.model.heads import digits_target, hazard_targets
from m3fm.model.m3fm import PretrainBatch, QABatch
from m3fm.model.text import TextTokenizer
from m3fm.tasks import get_task


def clinical_text(sentences: list[str], keep_prob: float, rng: random.Random | None,
                  keep: list[str] | tuple = ()) -> str:
    """Join clinical sentences; in training each element is kept with keep_prob (paper: 0.8).

    `keep` sentences always stay: a clinical retrieval question must not lose the sentence holding its answer.
    """
    if rng is not None and keep_prob < 1.0:
        sentences = [s for s in sentences if s in keep or rng.random() < keep_prob]
    return " ".join(sentences)


def _stack(values, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.asarray(v), dtype=dtype) for v in values])


def collate_qa(samples: list[dict], tokenizer: TextTokenizer, cfg: M3FMConfig,
               rng: random.Random | None = None, keep_prob: float = 0.8) -> QABatch:
    """rng given = training (clinical elements dropped at random); None = evaluation (all kept)."""
    names = {s["task"] for s in samples}
    if len(names) != 1:
        raise ValueError(f"a micro-batch holds one task, got {sorted(names)}")
    task = get_task(names.pop())
    q_ids, q_mask = tokenizer.encode([s["question"] for s in samples], cfg.question_len)
    if task.text == "report":
        texts = [s.get("report") or "" for s in samples]
    else:
        texts = [clinical_text(s.get("clinical") or [], keep_prob, rng, s.get("keep_sentences") or ()) for s in samples]
    t_ids, t_mask = tokenizer.encode(texts, cfg.clinical_len)
    target_mask = None
    if task.loss == "ce":
        target = torch.tensor([int(s["answer"]) for s in samples], dtype=torch.long)
    elif task.loss == "hazard":
        years, event = zip(*(s["answer"] for s in samples))
        target, target_mask = hazard_targets(torch.tensor(years), torch.tensor(event))
    else:
        target = torch.tensor([digits_target(s["answer"]) for s in samples], dtype=torch.long)
    image = voxel = image_mask = None
    if task.scale is not None:
        missing = [i for i, s in enumerate(samples) if s.get("image") is None]
        if missing:
            raise ValueError(f"task {task.name!r} needs an image; samples {missing} have none")
        image = _stack([s["image"] for s in samples])
        voxel = _stack([s["voxel_size"] for s in samples])
        if any(s.get("image_mask") is not None for s in samples):
            L = cfg.scale(task.scale).num_patches
            image_mask = torch.stack([torch.as_tensor(s["image_mask"], dtype=torch.bool) if s.get("image_mask") is not None
                                      else torch.ones(L, dtype=torch.bool) for s in samples])
    return QABatch(task.name, q_ids, q_mask, target, target_mask, t_ids, t_mask, image, voxel, image_mask)


def collate_pretrain(samples: list[dict], tokenizer: TextTokenizer, cfg: M3FMConfig) -> PretrainBatch:
    """Samples: image (1, S, H, W), voxel_size (3,), scale, optional text (clinical text or report)."""
    scales = {s["scale"] for s in samples}
    if len(scales) != 1:
        raise ValueError(f"a pretraining batch holds one scale, got {sorted(scales)}")
    text_ids = text_mask = None
    if any(s.get("text") for s in samples):
        text_ids, text_mask = tokenizer.encode([s.get("text") or "" for s in samples], cfg.clinical_len)
    return PretrainBatch(_stack([s["image"] for s in samples]), _stack([s["voxel_size"] for s in samples]),
                         scales.pop(), text_ids, text_mask)
