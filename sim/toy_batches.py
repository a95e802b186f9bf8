"""Small synthetic samples with a planted, learnable signal, for the model demo and unit tests.

These are tensors, not a cohort: no DICOM, no anatomy. The answer of an image
task is drawn first and then written into the image as the brightness of a
central blob; Lung-RADS is written into the report; the clinical number into
the clinical sentences. A model that learns lowers its loss on them quickly.
"""

from __future__ import annotations

import random

import numpy as np

from m3fm.model.configs import M3FMConfig
from m3fm.tasks import get_task


def toy_image(cfg: M3FMConfig, scale: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """(1, S, H, W) in [-1, 1]-ish: noise plus a central blob whose brightness is `level`."""
    S, H, W = cfg.scale(scale).volume
    z, y, x = np.meshgrid(np.linspace(-1, 1, S), np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    blob = np.exp(-(z ** 2 + y ** 2 + x ** 2) / 0.2)
    img = 0.3 * rng.standard_normal((S, H, W)) + level * blob - 0.5
    return img[None].astype(np.float32)


def toy_qa_samples(cfg: M3FMConfig, task_name: str, n: int, seed: int = 0) -> list[dict]:
    task = get_task(task_name)
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    samples = []
    for i in range(n):
        age = int(rng.integers(50, 80))
        s = {"task": task.name, "question": pyrng.choice(task.questions).replace("{}", "diabetes"),
             "clinical": [f"The patient is {age}.0 years old.", "Former smoker.",
                          f"Smoking duration is {int(rng.integers(20, 60))}.0 pack years."]}
        if task.loss == "ce":
            answer = i % len(task.answers)
            level = 1.5 * answer / max(1, len(task.answers) - 1)
            s["answer"] = answer
        elif task.loss == "hazard":
            event = i % 2
            years = float(rng.uniform(0.5, 3.0)) if event else float(rng.uniform(4.0, 7.0))
            level = 1.5 if event else 0.0
            s["answer"] = (years, event)
        else:
            level = 0.0
            s["answer"] = age
        if task.name == "lung_rads":
            s["report"] = f"Nodule findings. IMPRESSION: Lung-RADS category {task.answers[s['answer']]}."
        if task.scale is not None:
            s["image"] = toy_image(cfg, task.scale, level, rng)
            s["voxel_size"] = np.array([1.25, 0.7, 0.7], dtype=np.float32)
        samples.append(s)
    return samples


def toy_pretrain_samples(cfg: M3FMConfig, scale: str, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": toy_image(cfg, scale, float(rng.uniform(0, 1.5)), rng), "scale": scale,
             "voxel_size": np.array([float(rng.uniform(0.6, 2.5)), 0.7, 0.7], dtype=np.float32),
             "text": f"The patient is {int(rng.integers(50, 80))}.0 years old. Current smoker."}
            for _ in range(n)]
