"""Datasets over an ingested site: pretraining crops and multitask question answering.

Both read the site database once (small: ids, boxes, labels, sentences) and
the cached float16 crops lazily through memory maps. Items are the sample
dicts of m3fm/data/collate.py; `batches_by_key` groups them into micro-batches
of one task (QA) or one scale (pretraining), as the training steps require.

Patients, not exams, are split: every exam of a patient is in the same split.
Sampling inside an item (which series, which phrasing, where a slab sits) is
random in training and fixed in evaluation, from a seed, the epoch and the
item index, so a run can be repeated exactly.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch.utils.data import Dataset

from m3fm.data.clinical import DISEASES, NUMBER_FIELDS
from m3fm.data.crops import normalize_hu, read_memmap
from m3fm.data.store import Crop, Exam, Label, Series, Split, open_store
from m3fm.model.configs import M3FMConfig
from m3fm.tasks import HEART_WINDOW, LUNG_WINDOW, TASK_BY_NAME, get_task



@dataclass
class SeriesEntry:
    series_uid: str
    exam_id: str
    patient_id: str
    spacing: list[float]
    origin: list[float]  # patient (x, y, z) mm of voxel (0, 0, 0)
    crops: dict[str, Crop]  # region -> crop


class SiteData:
    """An ingested site as the datasets see it."""

    def __init__(self, database_url: str, work_dir: Path, cfg: M3FMConfig):
        self.work_dir, self.cfg = Path(work_dir), cfg
        engine = open_store(database_url)
        with Session(engine) as s:
            crops = defaultdict(dict)
            for c in s.scalars(select(Crop)):
                scale = cfg.scale(c.scale)
                if tuple(c.shape[1:]) == tuple(scale.volume[1:]):  # crops cut for this configuration's scales
                    crops[c.series_uid][c.region] = c
            self.series: dict[str, list[SeriesEntry]] = defaultdict(list)  # exam -> series, thinnest first
            for x in s.scalars(select(Series).where(Series.status == "accepted").order_by(Series.series_uid)):
                if len(crops[x.series_uid]) == 6:
                    self.series[x.exam_id].append(SeriesEntry(x.series_uid, x.exam_id, x.patient_id, x.spacing,
                                                              x.origin, crops[x.series_uid]))
            for entries in self.series.values():
                entries.sort(key=lambda e: e.spacing[0])
            self.exams = {e.exam_id: {"patient_id": e.patient_id, "sentences": e.sentences, "report": e.report,
                                      "clinical": e.clinical} for e in s.scalars(select(Exam))}
            self.labels = [{c: getattr(r, c) for c in ("exam_id", "task", "answer", "years_to_event", "censored",
                                                        "side", "slice_location")}
                           for r in s.scalars(select(Label).order_by(Label.id))]
            self.splits = {r.patient_id: r.split for r in s.scalars(select(Split))}
        engine.dispose()

    def patient_of(self, exam_id: str) -> str | None:
        if exam_id in self.exams:
            return self.exams[exam_id]["patient_id"]
        entries = self.series.get(exam_id)
        return entries[0].patient_id if entries else None

    def in_split(self, exam_id: str, split: str | None) -> bool:
        return split is None or self.splits.get(self.patient_of(exam_id)) == split

    def image(self, entry: SeriesEntry, region: str, window, slab_center: float | None = None,
              rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(1, S, H, W) normalized image and its voxel size; slabs are cut to the nodule scale's S slices."""
        crop = entry.crops[region]
        center = None
        if slab_center is not None:  # the annotated nodule's table position -> slice of the slab
            center = int(round((slab_center - entry.origin[2]) / entry.spacing[0])) - crop.first_slice
        return region_image(read_memmap(self.work_dir / crop.path), region, window, self.cfg, crop.voxel_size,
                            center, rng)


def region_image(arr: np.ndarray, region: str, window, cfg: M3FMConfig, voxel_size, slab_center: int | None = None,
                 rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A cached crop (S, H, W) HU -> (1, S, H, W) normalized image and its voxel size. A lung's slab stack is cut
    to the nodule scale's S slices around `slab_center` (a slice of the stack), else at random with `rng`, else
    in its middle."""
    if region.startswith("slab_"):
        n = cfg.scale("nodule").volume[0]
        if slab_center is not None:
            start = slab_center - n // 2
        else:
            start = (rng.randrange(max(arr.shape[0] - n, 0) + 1) if rng else (arr.shape[0] - n) // 2)
        start = int(np.clip(start, 0, max(arr.shape[0] - n, 0)))
        arr = arr[start:start + n]
        if arr.shape[0] < n:  # a lung shorter than a slab: pad with air
            arr = np.concatenate([arr, np.full((n - arr.shape[0], *arr.shape[1:]), -1024, arr.dtype)])
    return normalize_hu(arr, window)[None], np.asarray(voxel_size, dtype=np.float32)


def crop_of(region: str, side: str | None = None) -> str:
    """The cached crop a task region reads (client/ingest.py writes them); side: "left"/"right" for one lung."""
    return {"lung_slab": f"slab_{side}", "each_lung": f"lung_{side}", "heart": "heart", "both_lungs": "lungs"}[region]


def _rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}|{epoch}|{index}")


class PretrainDataset(Dataset):
    """Every cached crop of every accepted series in the split, with the exam's text for MLM."""

    def __init__(self, data: SiteData, split: str | None = "train", seed: int = 0):
        self.data, self.seed, self.epoch = data, seed, 0
        self.items = [(exam_id, region) for exam_id, entries in sorted(data.series.items())
                      if data.in_split(exam_id, split) for region in sorted(entries[0].crops)]
        self.keys = [data.series[e][0].crops[r].scale for e, r in self.items]

    def exam_id(self, i: int) -> str:
        return self.items[i][0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        rng = _rng(self.seed, self.epoch, i)
        exam_id, region = self.items[i]
        entry = rng.choice(self.data.series[exam_id])
        image, voxel = self.data.image(entry, region, HEART_WINDOW if region == "heart" else LUNG_WINDOW, rng=rng)
        exam = self.data.exams.get(exam_id) or {}
        texts = [t for t in (" ".join(exam.get("sentences") or []), exam.get("report")) if t]
        return {"image": image, "voxel_size": voxel, "scale": entry.crops[region].scale,
                "text": rng.choice(texts) if texts else ""}


class QADataset(Dataset):
    """(image crop(s), voxel size, clinical text or report, question, answer) per labelled exam and task.

    Lung cancer risk gives one item per lung (`side`), as the paper trains it; the exam's risk is the max
    over its two lungs at evaluation (items share `exam_id`). The two clinical retrieval tasks are asked
    of every exam with a clinical record.
    """

    def __init__(self, data: SiteData, split: str | None = "train", tasks=None, train: bool = True, seed: int = 0):
        self.data, self.train, self.seed, self.epoch = data, train, seed, 0
        tasks = set(tasks) if tasks is not None else set(TASK_BY_NAME)
        self.items: list[dict] = []
        self.skipped: dict[str, int] = defaultdict(int)  # task -> labelled exams with no usable input
        for row in data.labels:
            task = get_task(row["task"])
            if task.name not in tasks or not data.in_split(row["exam_id"], split):
                continue
            if task.scale is not None and not data.series.get(row["exam_id"]):
                self.skipped[task.name] += 1
                continue
            if task.text == "report" and not (data.exams.get(row["exam_id"]) or {}).get("report"):
                self.skipped[task.name] += 1
                continue
            event = row["censored"] == 0
            if task.region == "each_lung":
                for side in ("left", "right"):  # the other lung is censored at the event: no cancer there yet
                    hit = event and row["side"] in (side, None)
                    self.items.append({**row, "side": side, "answer_value": (row["years_to_event"], int(hit))})
            elif task.loss == "hazard":
                self.items.append({**row, "answer_value": (row["years_to_event"], int(event))})
            else:
                self.items.append({**row, "answer_value": row["answer"]})
        for exam_id, exam in sorted(data.exams.items()):
            if not data.in_split(exam_id, split) or not exam["sentences"]:
                continue
            for name in ("clinical_history", "clinical_number"):
                if name in tasks:
                    self.items.append({"exam_id": exam_id, "task": name, "side": None, "slice_location": None})
        self.keys = [it["task"] for it in self.items]

    def exam_id(self, i: int) -> str:
        return self.items[i]["exam_id"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        rng = _rng(self.seed, self.epoch if self.train else 0, i)
        task = get_task(it["task"])
        exam = self.data.exams.get(it["exam_id"]) or {"sentences": [], "report": None, "clinical": {}}
        sample = {"task": task.name, "exam_id": it["exam_id"], "side": it["side"],
                  "question": rng.choice(task.questions) if self.train else task.questions[0],
                  "clinical": list(exam["sentences"]), "report": exam["report"]}
        if task.auxiliary:
            sample.update(self._clinical_question(task, exam, rng))
            return sample
        sample["answer"] = (it["answer_value"] if task.loss == "hazard" else task.answers.index(it["answer_value"]))
        if task.scale is not None:
            entries = self.data.series[it["exam_id"]]
            entry = rng.choice(entries) if self.train else entries[0]
            side = it["side"] or rng.choice(("left", "right"))
            sample["image"], sample["voxel_size"] = self.data.image(
                entry, crop_of(task.region, side), task.hu_window, slab_center=it.get("slice_location"), rng=rng)
        return sample

    def _clinical_question(self, task, exam: dict, rng: random.Random) -> dict:
        """Questions whose answers are read from the record; the sentence holding the answer is always kept."""
        record, sentences = exam["clinical"], exam["sentences"]
        if task.name == "clinical_history":
            present = [d for d in DISEASES if record.get(f"dx_{d}_age") is not None]
            absent = [d for d in DISEASES if d not in present]
            d = rng.choice(present) if present and (rng.random() < 0.5 or not absent) else rng.choice(absent)
            keep = [s for s in sentences if f" had {DISEASES[d]} diagnosed" in s]
            q = rng.randrange(len(task.questions)) if self.train else 0
            return {"question": task.questions[q].format(DISEASES[d]), "answer": 0 if d in present else 1,
                    "keep_sentences": keep}
        options = [q for q, f in enumerate(NUMBER_FIELDS) if record.get(f) is not None]
        if not options:
            options = [0]
        q = rng.choice(options) if self.train else options[0]
        value = record.get(NUMBER_FIELDS[q]) or 0.0
        keep = [s for s in sentences if _mentions(s, NUMBER_FIELDS[q])]
        return {"question": task.questions[q], "answer": int(np.clip(round(value), 0, 999)), "keep_sentences": keep}


def _mentions(sentence: str, field: str) -> bool:
    return {"age": "years old." in sentence and sentence.startswith("The patient is"),
            "pack_years": "pack years" in sentence, "cigarettes_per_day": "cigarettes per day" in sentence,
            "weight_lb": sentence.startswith("Weight is"), "height_in": sentence.startswith("Height is")}[field]


def batches_by_key(keys: list[str], batch_size: int, seed: int | None = 0, drop_last: bool = False) -> list[list[int]]:
    """Index batches that each hold one key (task or scale); shuffled when seed is given."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    rng = random.Random(seed)
    batches = []
    for k in sorted(groups):
        idx = groups[k]
        if seed is not None:
            rng.shuffle(idx)
        for j in range(0, len(idx), batch_size):
            b = idx[j:j + batch_size]
            if len(b) == batch_size or not drop_last:
                batches.append(b)
    if seed is not None:
        rng.shuffle(batches)
    return batches
