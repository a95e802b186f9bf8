"""Ingestion of the tiny cohort: every series accepted, plausible organ boxes, crops with true voxel sizes."""

import json

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.ingest import assign_split
from client.site import SiteConfigError, load_site
from m3fm.data.crops import REGION_BOX, REGION_SCALE, read_memmap, widen
from m3fm.data.store import Crop, Exam, Label, Rejection, Series, Split, open_store
from m3fm.model.configs import get_config


def rows(site, model, *where):
    engine = open_store(site.database_url)
    with Session(engine) as s:
        result = list(s.scalars(select(model).where(*where)))
    engine.dispose()
    return result


def test_every_series_of_the_tiny_cohort_is_accepted(ingested):
    out, sites, summaries = ingested
    cohort = json.loads((out / "cohort.json").read_text())
    for site, summary, expected in zip(sites, summaries, cohort["sites"]):
        assert summary["series_accepted"] == expected["series"], summary
        assert summary["series_rejected"] == 0 and summary["rejected"] == {}, rows(site, Rejection)
        assert summary["exams"] == summary["exams_with_images"] == expected["exams"]
        assert summary["files"] == expected["slices"]
        for task in site.tasks:  # every labelled exam is usable for its task
            assert summary["labelled"][task] == expected["prevalence"][task]["labelled"], task


def test_organ_boxes_are_anatomically_plausible(ingested):
    out, sites, _ = ingested
    for site in sites:
        truth = {t["exam_id"]: t for t in json.loads((out / "truth" / f"{site.site_id}.json").read_text())}
        for series in rows(site, Series):
            S, H, W = series.shape
            b = {k: np.array(v) for k, v in series.boxes.items()}
            center = {k: (v[0::2] + v[1::2]) / 2 for k, v in b.items()}
            for box in b.values():
                assert (box[0::2] >= 0).all() and (box[1::2] <= [S, H, W]).all() and (box[1::2] > box[0::2]).all()
            # each lung fills a good part of its side; the left lung lies at larger W (patient's left)
            for side in ("lung_left", "lung_right"):
                assert (b[side][1::2] - b[side][0::2] >= np.array([0.4 * S, 0.25 * H, 0.2 * W])).all(), (side, b)
            assert center["lung_right"][2] < center["heart"][2] < center["lung_left"][2]
            # the heart lies between the lungs, in their lower part, and its box holds the true heart centre
            assert b["lungs"][0] <= center["heart"][0] < center["lungs"][0] + 0.5 * (b["lungs"][1] - b["lungs"][0])
            z, y, x = truth[series.exam_id]["heart_center"]
            spacing, origin = np.array(series.spacing), np.array(series.origin)
            voxel = (np.array([z, y, x]) - origin[::-1]) / spacing
            assert (b["heart"][0::2] <= voxel).all() and (voxel <= b["heart"][1::2]).all(), (voxel, b["heart"])


def test_crops_are_float16_memmaps_with_recomputed_voxel_sizes(ingested):
    _, sites, _ = ingested
    cfg = get_config(sites[0].model_config)
    site = sites[0]
    series = rows(site, Series)[0]
    crops = {c.region: c for c in rows(site, Crop, Crop.series_uid == series.series_uid)}
    assert set(crops) == set(REGION_SCALE)
    for region, crop in crops.items():
        arr = read_memmap(site.work_dir / crop.path)
        assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and list(arr.shape) == crop.shape
        assert site.work_dir in (site.work_dir / crop.path).parents and site.site_dir not in (site.work_dir / crop.path).parents
        volume = cfg.scale(REGION_SCALE[region]).volume
        target = (0, *volume[1:]) if region.startswith("slab_") else volume
        ranges = widen(series.boxes[REGION_BOX[region]], series.spacing, target)
        extent = np.array([hi - lo for lo, hi in ranges]) * np.array(series.spacing)
        # voxel size x voxels = the physical extent cut out: the spacing was rescaled with the resize
        np.testing.assert_allclose(np.array(crop.voxel_size) * np.array(crop.shape), extent, rtol=1e-5)
        assert not np.allclose(crop.voxel_size[1:], series.spacing[1:])
        assert -1100 < float(np.median(arr)) < 100  # HU, not stored values


def test_splits_are_patient_level_deterministic_and_stored(ingested):
    _, sites, _ = ingested
    for site in sites:
        splits = {r.patient_id: r.split for r in rows(site, Split)}
        exams = rows(site, Exam)
        assert {e.patient_id for e in exams} <= set(splits)
        for p, split in splits.items():
            assert split == assign_split(site.site_id, p, site.splits)
    many = [assign_split("site-x", f"P{i:05d}", {"train": 0.7, "val": 0.15, "test": 0.15}) for i in range(4000)]
    assert abs(many.count("train") / 4000 - 0.7) < 0.03 and abs(many.count("test") / 4000 - 0.15) < 0.03


def test_clinical_records_become_the_papers_sentences(ingested):
    _, sites, _ = ingested
    exam = rows(sites[0], Exam)[0]
    text = " ".join(exam.sentences)
    assert text.startswith(f"The patient is {exam.clinical['age']:.1f} years old. Gender is {exam.clinical['gender']}.")
    assert f"{exam.clinical['smoking_status'].capitalize()} smoker." in text
    assert exam.report and "FINDINGS" in exam.report
    labels = rows(sites[0], Label, Label.task == "nodule_location")
    assert labels and all(lab.slice_location is not None and lab.side in ("left", "right") for lab in labels)


def test_site_toml_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "site.toml").write_text('site_id = "s"\ntasks = ["nodule_presence", "bogus"]\n')
    with pytest.raises(SiteConfigError, match=r"site.toml: field 'tasks' names unknown task\(s\) \['bogus'\]"):
        load_site(tmp_path)
    (tmp_path / "site.toml").write_text('site_id = "s"\ntasks = []\n[storage]\nwork_dir = "cache"\n')
    with pytest.raises(SiteConfigError, match="inside the site folder"):
        load_site(tmp_path)
    for table, why in (("devices = 0", "device.devices must be a positive integer"),
                       ('type = "tpu"', "device.type must be one of auto, cuda, cpu")):
        (tmp_path / "site.toml").write_text(f'site_id = "s"\ntasks = []\n[device]\n{table}\n')
        with pytest.raises(SiteConfigError, match=rf"site.toml: {why}"):
            load_site(tmp_path)
    (tmp_path / "site.toml").write_text('site_id = "s"\ntasks = []\n[device]\ndevices = 4\n')
    assert load_site(tmp_path).devices == 4


def scipy_trilinear(x: np.ndarray, shape) -> np.ndarray:
    """How crops were resized before the separable resize: scipy's 3D kernel (order 1, voxel centres aligned,
    edges extended)."""
    from scipy import ndimage

    return ndimage.zoom(np.asarray(x, np.float32), [t / s for t, s in zip(shape, x.shape)], output=np.float32,
                        order=1, mode="nearest", grid_mode=True, prefilter=False)


def test_crops_are_what_the_previous_resize_made_within_float32_rounding(ingested):
    """The speed work must not change what the model sees: every crop of a tiny-cohort series, and odd shapes that
    grow, shrink and keep axes, equal scipy's trilinear zoom to float32 rounding (far below float16 storage)."""
    from client.series_reader import read_series
    from m3fm.data.crops import crop_resize, cut, resize, slab_stack
    from ingested_series import first_accepted_headers

    _, sites, _ = ingested
    site = sites[0]
    geo, hu, boxes = read_series(site.site_dir, first_accepted_headers(site), site.min_slices)
    cfg = get_config(site.model_config)
    for region, scale_name in REGION_SCALE.items():
        scale, box = cfg.scale(scale_name), boxes[REGION_BOX[region]]
        if region.startswith("slab_"):
            ranges = widen(box, geo.spacing, (0, *scale.volume[1:]))
            got, _, _ = slab_stack(hu, geo.spacing, box, scale.volume[1:])
            want = scipy_trilinear(cut(hu, ranges), (got.shape[0], *scale.volume[1:]))
        else:
            got, _ = crop_resize(hu, geo.spacing, box, scale.volume)
            want = scipy_trilinear(cut(hu, widen(box, geo.spacing, scale.volume)), scale.volume)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3, err_msg=region)  # HU
    rng = np.random.default_rng(0)
    for src, dst in (((7, 9, 11), (4, 13, 5)), ((20, 30, 40), (33, 17, 40)), ((5, 5, 5), (16, 16, 16)),
                     ((64, 40, 40), (16, 40, 24))):
        x = (rng.normal(size=src) * 500).astype(np.float32)
        np.testing.assert_allclose(resize(x, dst), scipy_trilinear(x, dst), rtol=0, atol=2e-3, err_msg=str(src))
