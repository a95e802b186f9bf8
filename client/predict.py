"""`m3fm-client predict`: the model's answers for one patient's CT series, straight from a DICOM folder.

The series goes through ingestion's own reading (client/ingest.py `read_series`: the same checks, the same organ
localisation, the same crops, m3fm/data/crops.py), so a series that ingestion would reject is refused here with the
same reason. Then every task of the model is asked its first question, with the clinical text given (or none):
yes/no and multiple-choice tasks answer with the probability of each answer, risk tasks with the 1-6 year risks.
Tasks read one lung (nodule slabs, cancer risk) are asked for each lung; the exam's cancer risk is the higher of
the two, as evaluation scores it. Lung-RADS is read from the report text, so it needs --report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from client.series_reader import header_or_reason, read_series
from client.report import load_model
from m3fm.data.collate import collate_qa
from m3fm.data.crops import region_crops
from m3fm.data.datasets import crop_of, region_image
from m3fm.data.dicom_series import InputRejected
from m3fm.model.m3fm import M3FM
from m3fm.model.text import TextTokenizer, load_tokenizer
from m3fm.tasks import TASKS, get_task

SIDES = ("left", "right")


class PredictError(ValueError):
    """The series, the model or the inputs cannot be used; the message says which and why."""


def model_and_tokenizer(path: Path, tokenizer_dir: Path | None) -> tuple[M3FM, TextTokenizer]:
    """A checkpoint with its own configuration, loaded strictly, and the tokenizer it was trained with."""
    model, source = load_model(path)
    tokenizer = load_tokenizer(model.cfg, tokenizer_dir)
    recorded = source["tokenizer"]
    if recorded and recorded != tokenizer.fingerprint:
        raise PredictError(f"{path} was trained with tokenizer {recorded}; {tokenizer.source} is "
                           f"{tokenizer.fingerprint} (--tokenizer: the folder it was made with)")
    return model.eval(), tokenizer


def read_one_series(folder: Path, min_slices: int, series_uid: str | None = None):
    """Every DICOM file under `folder` -> (series UID, geometry, HU volume, organ boxes); PredictError with
    ingestion's reason when the series cannot be used."""
    by_series: dict[str, list] = {}
    unreadable = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        header, _, reason = header_or_reason(folder, rel)  # a file beside the series is named, not fatal
        if header is None:
            unreadable.append(f"{rel}: {reason}")
        else:
            by_series.setdefault(header.series_uid, []).append(header)
    if not by_series:
        raise PredictError(f"{folder}: no readable DICOM instance" + (f" ({'; '.join(unreadable[:3])})" if unreadable else ""))
    if series_uid is None and len(by_series) > 1:
        raise PredictError(f"{folder} holds {len(by_series)} series; choose one with --series: {', '.join(sorted(by_series))}")
    uid = series_uid or next(iter(by_series))
    if uid not in by_series:
        raise PredictError(f"{folder}: no series {uid}; it holds {', '.join(sorted(by_series))}")
    try:
        geo, hu, boxes = read_series(folder, by_series[uid], min_slices)
    except InputRejected as e:
        raise PredictError(f"series {uid} in {folder} rejected ({e.category}): {e.reason}"
                           + (f" [{e.path}]" if e.path else "")) from None
    return uid, geo, hu, boxes


@torch.no_grad()
def predict(model: M3FM, tokenizer: TextTokenizer, hu: np.ndarray, spacing, boxes: dict, clinical: list[str],
            report: str | None, tasks: list[str] | None = None) -> dict:
    """-> {task: {"answers": {answer: probability}} or {"risk": [year 1..Y]}, per lung where the task reads one,
    or {"skipped": why}}."""
    cfg = model.cfg
    crops = {region: (arr, voxel) for region, _, arr, voxel, _ in region_crops(hu, spacing, boxes, cfg)}
    device = next(model.parameters()).device
    out = {}
    for name in tasks or [t.name for t in TASKS]:
        task = get_task(name)
        if task.text == "report" and not report:
            out[name] = {"skipped": "read from the radiology report: give --report"}
            continue
        sides = SIDES if task.region in ("lung_slab", "each_lung") else (None,)
        per_side = {}
        for side in sides:
            sample = {"task": name, "question": task.questions[0], "clinical": clinical, "report": report,
                      "answer": 0 if task.loss != "hazard" else (1.0, 0)}
            if task.scale is not None:
                region = crop_of(task.region, side)
                arr, voxel = crops[region]
                sample["image"], sample["voxel_size"] = region_image(arr, region, task.hu_window, cfg, voxel)
            probs = model.predict(collate_qa([sample], tokenizer, cfg).to(device))[0].cpu().numpy()
            per_side[side or "exam"] = answer_of(task, probs)
        if task.loss == "hazard" and len(per_side) > 1:  # the exam's risk: the higher lung, year by year
            per_side["exam"] = {"risk": np.max([v["risk"] for v in per_side.values()], axis=0).round(4).tolist()}
        out[name] = per_side if len(per_side) > 1 else per_side["exam"]
    return out


def places(answer: dict) -> list[tuple[str, dict]]:
    """One task's answer from `predict` -> (where, answer) rows: per lung (and the exam) or the exam alone."""
    return list(answer.items()) if set(answer) <= {*SIDES, "exam"} else [("exam", answer)]


def answer_of(task, probs: np.ndarray) -> dict:
    if task.loss == "hazard":
        return {"risk": [round(float(p), 4) for p in probs]}
    return {"answers": {a: round(float(p), 4) for a, p in zip(task.answers, probs)},
            "answer": task.answers[int(np.argmax(probs))]}
