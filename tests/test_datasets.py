"""The datasets over an ingested site yield batches the M3FM model trains on."""

import math
import random
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.data.crops import normalize_hu
from m3fm.data.datasets import PretrainDataset, QADataset, SiteData, batches_by_key
from m3fm.model.m3fm import M3FM
from m3fm.tasks import LUNG_WINDOW, HUWindow, get_task
from m3fm.train import TrainConfig, build_optimizer, multitask_step, pretrain_step


def site_data(ingested, cfg, index=0):
    site = ingested[1][index]
    return site, SiteData(site.database_url, site.work_dir, cfg)


def test_pretraining_batches_train_the_model(ingested, tiny_cfg, tokenizer):
    _, data = site_data(ingested, tiny_cfg)
    ds = PretrainDataset(data, split=None)
    assert set(ds.keys) == {s.name for s in tiny_cfg.scales}
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    opt = build_optimizer(model, TrainConfig())
    loader = DataLoader(ds, batch_sampler=batches_by_key(ds.keys, 3, seed=0),
                        collate_fn=partial(collate_pretrain, tokenizer=tokenizer, cfg=tiny_cfg))
    seen = set()
    for step, batch in enumerate(loader):
        scale = tiny_cfg.scale(batch.scale)
        assert tuple(batch.image.shape[1:]) == (1, *scale.volume) and batch.image.abs().max() <= 1.0
        assert batch.text_ids is not None
        out = pretrain_step(model, opt, batch, tokenizer, TrainConfig(), step)
        assert math.isfinite(out["mim"]) and math.isfinite(out["mlm"])
        seen.add(batch.scale)
        if seen == set(ds.keys):
            break
    assert seen == set(ds.keys)


def test_qa_batches_cover_every_labelled_task_and_train_the_model(ingested, tiny_cfg, tokenizer):
    site, data = site_data(ingested, tiny_cfg)
    ds = QADataset(data, split=None)
    assert set(ds.keys) == set(site.tasks) | {"clinical_history", "clinical_number"}
    assert not ds.skipped
    torch.manual_seed(0)
    model = M3FM(tiny_cfg)
    opt = build_optimizer(model, TrainConfig())
    collate = partial(collate_qa, tokenizer=tokenizer, cfg=tiny_cfg, rng=random.Random(0))
    batches = batches_by_key(ds.keys, 4, seed=0)
    first = {}
    for b in batches:  # one micro-batch per task, all accumulated into one step
        first.setdefault(ds.keys[b[0]], b)
    micro = [collate([ds[i] for i in idx]) for idx in first.values()]
    for batch in micro:
        task = get_task(batch.task)
        if task.scale is not None:
            assert tuple(batch.image.shape[2:]) == tiny_cfg.scale(task.scale).volume
    out = multitask_step(model, opt, micro, TrainConfig(), 0)
    assert set(out["tasks"]) == set(first) and all(math.isfinite(v) for v in out["tasks"].values())


def test_lung_items_and_nodule_slabs_follow_the_labels(ingested, tiny_cfg):
    _, data = site_data(ingested, tiny_cfg)
    ds = QADataset(data, split=None, tasks=["lung_cancer_risk", "nodule_size"], train=False)
    risk = [it for it in ds.items if it["task"] == "lung_cancer_risk"]
    by_exam = {}
    for it in risk:
        by_exam.setdefault(it["exam_id"], {})[it["side"]] = it["answer_value"]
    for exam_id, sides in by_exam.items():
        assert set(sides) == {"left", "right"}  # both lungs, scored separately, max taken at evaluation
        row = next(r for r in data.labels if r["exam_id"] == exam_id and r["task"] == "lung_cancer_risk")
        events = {s for s, (_, e) in sides.items() if e}
        assert events == ({row["side"]} if row["censored"] == 0 else set())
    # an annotated nodule is inside its slab: the slab's brightest blob is at the slab's centre slices
    for i, it in enumerate(ds.items):
        if it["task"] != "nodule_size":
            continue
        sample = ds[i]
        entry = data.series[it["exam_id"]][0]
        crop = entry.crops[f"slab_{it['side']}"]
        k = round((it["slice_location"] - entry.origin[2]) / entry.spacing[0]) - crop.first_slice
        n = tiny_cfg.scale("nodule").volume[0]
        full = np.load(data.work_dir / crop.path)
        start = int(np.clip(k - n // 2, 0, full.shape[0] - n))
        window = np.clip((full[start:start + n].astype(np.float32) + 1300) / 1450, 0, 1) * 2 - 1
        np.testing.assert_allclose(sample["image"][0], window, atol=1e-3)
        assert start <= k < start + n


def test_evaluation_items_are_fixed_and_splits_never_share_a_patient(ingested, tiny_cfg):
    _, data = site_data(ingested, tiny_cfg)
    a, b = QADataset(data, split=None, train=False), QADataset(data, split=None, train=False)
    for i in range(0, len(a), 7):
        sa, sb = a[i], b[i]
        assert sa["question"] == sb["question"] and sa["answer"] == sb["answer"]
        if "image" in sa:
            np.testing.assert_array_equal(sa["image"], sb["image"])
    patients = {}
    for split in ("train", "val", "test"):
        for it in QADataset(data, split=split).items:
            p = data.patient_of(it["exam_id"])
            assert patients.setdefault(p, split) == split


def test_hu_windows_encode_as_the_public_code_except_low_attenuation_which_puts_tissue_at_zero():
    hu = np.array([-1100.0, -1000.0, -975.0, -950.0, -900.0, -850.0, 40.0, 500.0])
    # the public code's form: lo..hi onto -1..1, clipped
    np.testing.assert_allclose(normalize_hu(hu, LUNG_WINDOW), np.clip((hu + 1300) / 1450 * 2 - 1, -1, 1), atol=1e-6)
    np.testing.assert_allclose(normalize_hu(hu, HUWindow(-1000.0, -900.0)), [-1, -1, -0.5, 0, 1, 1, 1, 1], atol=1e-6)
    # emphysema reads how far below -900 HU a voxel lies: normal lung and tissue are 0, holes of -975 HU 0.75
    window = get_task("emphysema").hu_window
    np.testing.assert_allclose(normalize_hu(hu, window), [1, 1, 0.75, 0.5, 0, 0, 0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown encoding 'inverse'"):
        normalize_hu(hu, HUWindow(-1000.0, -900.0, "inverse"))


def test_emphysema_items_read_the_chest_below_minus_900_hu_with_tissue_at_zero(ingested, tiny_cfg):
    _, data = site_data(ingested, tiny_cfg)  # site-01 labels every task
    ds = QADataset(data, None, tasks=["emphysema", "consolidation"], train=False)
    images = {t: [ds[i]["image"] for i in range(len(ds)) if ds.keys[i] == t] for t in ("emphysema", "consolidation")}
    assert images["emphysema"] and images["consolidation"], "the tiny cohort labels both tasks"
    for img in images["emphysema"]:
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert np.median(img) == 0.0  # most of a chest lies above -900 HU
    assert min(img.min() for img in images["consolidation"]) < -0.5  # the lung window, -1..1: lung lies below 0


def test_evaluation_draws_move_only_what_an_item_leaves_to_chance(ingested, tiny_cfg):
    # benchmarks/pooling.py --eval-draws scores a test split over several draws (m3fm.evaluation draw=k): a
    # negative's nodule slab moves between draws, an annotated nodule's slab, the question and the answer do not
    _, data = site_data(ingested, tiny_cfg)
    a = QADataset(data, split=None, tasks=["nodule_presence"], train=False, seed=0)
    b = QADataset(data, split=None, tasks=["nodule_presence"], train=False, seed=1)
    moved = 0
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        assert sa["question"] == sb["question"] and sa["answer"] == sb["answer"]
        if a.items[i]["slice_location"] is not None:
            np.testing.assert_array_equal(sa["image"], sb["image"])
        else:
            moved += not np.array_equal(sa["image"], sb["image"])
    assert moved > 0
