import csv
import json
import os
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from pydicom.uid import CTImageStorage
from sklearn.metrics import roc_auc_score

from client.site import load_site
from m3fm.tasks import TASKS, get_task
from sim.cohort.dicom_writer import SeriesInfo, write_series
from sim.cohort.generate import exam_findings, generate_cohort, label_rows, plan_site
from sim.cohort.presets import SCANNERS, build_sites
from dicom_features import emphysema_index, hu_volume, nodule_score, read_series
from test_cli import script


def site_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("site-"))


@pytest.fixture(scope="session")
def series_by_site(cohort):
    return {site.name: read_series(site) for site in site_dirs(cohort[0])}


def test_every_file_is_a_ct_image_a_scanner_would_export(cohort, series_by_site):
    out, summaries = cohort
    for site, summary in zip(site_dirs(out), summaries):
        files = [p for p in (site / "dicom").rglob("*") if p.is_file()]
        assert len(files) == summary["slices"]
        for path in files[:: max(1, len(files) // 50)]:
            ds = pydicom.dcmread(path)
            assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            for tag in ("StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                        "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept", "Manufacturer",
                        "ManufacturerModelName", "KVP", "ConvolutionKernel", "PatientID", "AccessionNumber"):
                assert tag in ds, (path, tag)
        series = series_by_site[site.name]
        assert len(series) == summary["series"]
        # instances of a series are unique, contiguous along z and agree on geometry
        for instances in series.values():
            z = np.array([float(d.ImagePositionPatient[2]) for d in instances])
            assert len({d.SOPInstanceUID for d in instances}) == len(instances)
            assert np.allclose(np.diff(z), float(instances[0].SliceThickness), atol=1e-3)
            assert len({tuple(d.PixelSpacing) for d in instances}) == 1


def test_series_are_found_by_uid_not_by_folder(series_by_site):
    spread = mixed = 0
    folders = {}
    for series in series_by_site.values():
        for uid, instances in series.items():
            dirs = {Path(d.filename).parent for d in instances}
            spread += len(dirs) > 1
            for d in dirs:
                folders.setdefault(d, set()).add(uid)
    mixed = sum(len(uids) > 1 for uids in folders.values())
    assert spread > 0 and mixed > 0, "exports interleave series over nested folders"


def test_monai_loads_a_series_with_the_written_spacing_and_orientation(cohort, series_by_site, tmp_path):
    out, _ = cohort
    for site in site_dirs(out):
        truth = {t["exam_id"]: t for t in json.loads((out / "truth" / f"{site.name}.json").read_text())}
        instances = next(s for s in series_by_site[site.name].values() if s[0].SeriesDescription == "AXIAL LUNG")
        folder = tmp_path / site.name
        folder.mkdir()
        for d in instances:  # one series per folder, as MONAI's reader expects
            os.symlink(d.filename, folder / Path(d.filename).name)
        img = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
        t = truth[instances[0].AccessionNumber]
        assert tuple(img.shape) == (instances[0].Columns, instances[0].Rows, len(instances))
        assert np.allclose(img.pixdim, [t["pixel_spacing"], t["pixel_spacing"], t["slice_thickness"]], atol=1e-3)
        affine = np.asarray(img.affine)
        # axial, head first supine: LPS rows/columns become RAS -x/-y, slices go up +z
        assert np.allclose(np.sign(np.diag(affine)[:3]), [-1, -1, 1])
        assert np.allclose(np.asarray(img), hu_volume(instances).transpose(2, 1, 0))


@pytest.mark.parametrize("scanner", SCANNERS, ids=lambda s: f"{s.model}")
def test_hu_round_trips_through_slope_and_intercept(tmp_path, scanner):
    rng = np.random.default_rng(0)
    lowest = scanner.rescale_intercept + scanner.rescale_slope * (-32768 if scanner.signed else 0)
    floor = max(-1024.0, lowest)  # e.g. Philips stores intercept -1000 unsigned: nothing below -1000 HU
    hu = rng.uniform(floor, 3000, size=(3, 8, 8)).astype(np.float32)
    hu[0, 0, 0] = -1024.0  # below the floor it clamps to the floor
    info = SeriesInfo("P1", "Female", 60, "1.2.3", "1.2.3.4", "1.2.3.5", "20200101", "E1", 1, "AXIAL", "X")
    paths = write_series(hu, np.array([0.0, 2.0, 4.0]), 0.0, 0.0, (2.0, 0.7, 0.7), 2.0, scanner, info, tmp_path,
                         [Path("a")], ("t",))
    back = np.stack([pydicom.dcmread(p).pixel_array * scanner.rescale_slope + scanner.rescale_intercept for p in paths])
    assert back[0, 0, 0] == pytest.approx(floor)
    hu[0, 0, 0] = floor
    assert np.abs(back - hu).max() <= scanner.rescale_slope / 2 + 1e-3
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == int(scanner.signed) and float(ds.RescaleSlope) == scanner.rescale_slope


def read_labels(site: Path) -> list[dict]:
    with open(site / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_labels_exist_for_every_task_and_only_for_declared_subsets(cohort):
    out, _ = cohort
    seen = set()
    for site in site_dirs(out):
        declared = set(tomllib.loads((site / "site.toml").read_text())["tasks"])
        rows = read_labels(site)
        tasks = {r["task"] for r in rows}
        assert tasks <= declared, f"{site.name} labels undeclared tasks {tasks - declared}"
        exams = {r["exam_id"] for r in csv.DictReader(open(site / "clinical.csv"))}
        for r in rows:
            assert r["exam_id"] in exams
            task = get_task(r["task"])
            if task.loss == "hazard":
                assert float(r["years_to_event"]) >= 0 and r["censored"] in ("0", "1")
            else:
                assert r["answer"] in task.answers, r
        seen |= tasks
        for rows_of_task in ({r["answer"] for r in rows if r["task"] == t} for t in tasks):
            assert rows_of_task
    assert seen == {t.name for t in TASKS}
    assert len({frozenset(tomllib.loads((s / "site.toml").read_text())["tasks"]) for s in site_dirs(out)}) > 1


def test_yes_no_tasks_have_both_answers_somewhere(cohort):
    out, _ = cohort
    rows = [r for s in site_dirs(out) for r in read_labels(s)]
    for t in TASKS:
        if t.answers == ("Yes", "No"):
            assert {r["answer"] for r in rows if r["task"] == t.name} == {"Yes", "No"}, t.name
    assert any(r["censored"] == "0" for r in rows if r["task"] == "lung_cancer_risk")


def test_sites_differ_in_scanner_and_spacing(series_by_site):
    vendors, spacings = set(), set()
    for series in series_by_site.values():
        for instances in series.values():
            vendors.add(instances[0].Manufacturer)
            spacings.add(round(float(instances[0].PixelSpacing[0]), 2))
    assert len(vendors) == 3 and len(spacings) > 5


def test_image_signal_hand_made_features(cohort, series_by_site):
    """LAA-950 finds emphysema and a Hessian blob filter finds nodules: the images carry the labels."""
    out, _ = cohort
    scores = {"nodule_presence": [], "emphysema": []}
    for site in site_dirs(out):
        labels = {(r["exam_id"], r["task"]): r["answer"] == "Yes" for r in read_labels(site)}
        for instances in series_by_site[site.name].values():
            if instances[0].SeriesDescription != "AXIAL LUNG":
                continue
            exam = instances[0].AccessionNumber
            hu = hu_volume(instances)
            spacing = (float(instances[0].SliceThickness), *map(float, instances[0].PixelSpacing))
            if (exam, "nodule_presence") in labels:
                scores["nodule_presence"].append((labels[(exam, "nodule_presence")], nodule_score(hu, spacing)))
            if (exam, "emphysema") in labels:
                scores["emphysema"].append((labels[(exam, "emphysema")], emphysema_index(hu)))
    for task, pairs in scores.items():
        y, s = zip(*pairs)
        assert 0 < sum(y) < len(y)
        assert roc_auc_score(y, s) > 0.8, task


def test_clinical_columns_alone_predict_cvd():
    """Hypertension, diabetes, heart disease, stroke and age raise CVD, on 400 exams of the same generator."""
    site = build_sites("tiny", sites=1, exams_per_site=400)[0]
    y, score = [], []
    for plan in plan_site(site, 0, seed=0):
        rng = np.random.default_rng(plan.exam_index)
        f = exam_findings(rng, plan.patient, plan.k, site)
        label = next(r["answer"] for r in label_rows(plan, f, site, "1", rng) if r["task"] == "cvd_diagnosis")
        d = plan.patient.diseases
        y.append(label == "Yes")
        score.append(sum(k in d for k in ("hypertension", "diabetes", "heart_disease", "stroke"))
                     + (plan.patient.age + plan.k > 65))
    assert roc_auc_score(y, score) > 0.6


def test_same_seed_same_bytes(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    sites = build_sites("tiny", sites=1, exams_per_site=2)
    generate_cohort(tmp_path / "a", sites, seed=5)
    generate_cohort(tmp_path / "b", sites, seed=5)
    generate_cohort(tmp_path / "c", sites, seed=6)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a != c


def test_refuses_to_overwrite(tmp_path):
    sites = build_sites("tiny", sites=1, exams_per_site=1)
    generate_cohort(tmp_path, sites, seed=0)
    before = (tmp_path / "site-01" / "labels.csv").read_bytes()
    with pytest.raises(FileExistsError, match="site-01"):
        generate_cohort(tmp_path, sites, seed=1)
    assert (tmp_path / "site-01" / "labels.csv").read_bytes() == before


def test_cohort_command_prints_the_summary(tmp_path):
    exe = script("m3fm-sim")
    res = subprocess.run([exe, "cohort", str(tmp_path / "c"), "--sites", "2", "--exams-per-site", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "site-01" in res.stdout and "nodule_presence" in res.stdout and "2 sites written" in res.stdout
    again = subprocess.run([exe, "cohort", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "nothing is overwritten" in again.stdout


def test_a_preset_with_its_own_splits_writes_them_into_the_site_config(tmp_path):
    """The demo holds out a third of each site's patients (so a test split can bound an AUC away from chance);
    presets without splits leave the site default."""
    demo = build_sites("demo", sites=1, exams_per_site=1)[0]
    tiny = build_sites("tiny", sites=1, exams_per_site=1)[0]
    generate_cohort(tmp_path / "demo", [demo], seed=0)
    generate_cohort(tmp_path / "tiny", [tiny], seed=0)
    assert load_site(tmp_path / "demo" / "site-01").splits == {"train": 0.55, "val": 0.1, "test": 0.35}
    assert load_site(tmp_path / "tiny" / "site-01").splits == {"train": 0.7, "val": 0.15, "test": 0.15}
