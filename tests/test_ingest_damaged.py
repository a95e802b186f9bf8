"""A messy hospital export: every problem reported with its file and reason, the rest ingested, nothing
written into the source tree, and a second run reads nothing again. Plus pydicom's own CT test files."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, MRImageStorage, RLELossless
from sqlalchemy import select
from sqlalchemy.orm import Session

import m3fm.data.clinical
import m3fm.data.dicom_series
from client.ingest import ingest_site
from client.site import load_site
from m3fm.data.dicom_series import check_series, load_hu, read_header
from m3fm.data.store import Crop, Exam, Rejection, Series, open_store
from dicom_edits import break_pixel_data, clone_series, enhanced_ct, flip_in_plane, series_files
from test_cli import script


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def query(site, model):
    engine = open_store(site.database_url)
    with Session(engine) as s:
        out = list(s.scalars(select(model)))
    engine.dispose()
    return out


@pytest.fixture(scope="module")
def damaged(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    site_dir = root / "site-01"
    shutil.copytree(cohort[0] / "site-01", site_dir)
    original = series_files(site_dir / "dicom")
    base = min(original.values(), key=len)  # the shortest series keeps the copies small
    bad = site_dir / "dicom" / "damaged"
    made = {}
    made["truncated"], files = clone_series(base, bad / "truncated", "trunc")
    files[5].write_bytes(files[5].read_bytes()[: files[5].stat().st_size // 2])
    (bad / "notes.txt").write_text("export log: 3 studies\n")

    def to_mr(ds, k):
        ds.Modality, ds.SOPClassUID = "MR", MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    made["mr"], _ = clone_series(base, bad / "mr", "mr", to_mr)
    made["scout"], _ = clone_series(base[:1], bad / "scout", "scout",
                                    lambda ds, k: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    made["gap"], files = clone_series(base, bad / "gap", "gap")
    files[len(files) // 2].unlink()
    made["undecodable"], _ = clone_series(base, bad / "undecodable", "undec",
                                          lambda ds, k: break_pixel_data(ds) if k == 3 else None)
    dup = site_dir / "dicom" / "zz_reexport" / "copy.dcm"
    dup.parent.mkdir()
    shutil.copy(base[2], dup)
    # the same exam stored the ways other scanners store it: each must give the very same crops
    made["rle"], _ = clone_series(base, bad / "rle", "rle", lambda ds, k: ds.compress(RLELossless, generate_instance_uid=False))
    made["j2k"], _ = clone_series(base, bad / "j2k", "j2k",
                                  lambda ds, k: ds.compress(JPEG2000Lossless, generate_instance_uid=False))
    made["flipped"], _ = clone_series(base, bad / "flipped", "flip", flip_in_plane)
    made["enhanced"] = enhanced_ct(base, bad / "enhanced.dcm", "enh")
    clinical = (site_dir / "clinical.csv").read_text().splitlines()
    cells = clinical[3].split(",")
    cells[clinical[0].split(",").index("age")] = "sixty"
    clinical[3] = ",".join(cells)
    (site_dir / "clinical.csv").write_text("\n".join(clinical) + "\n")
    with open(site_dir / "labels.csv", "a") as fh:
        fh.write("NOPE0001E1,emphysema,Yes,,,,\n")
    before = snapshot(site_dir)
    res = subprocess.run([script("m3fm-client"), "ingest", str(site_dir), "--workers", "2"], capture_output=True,
                         text=True, timeout=600)
    return {"site": load_site(site_dir), "original": original, "base": base, "made": made, "before": before,
            "result": res, "exam_row": clinical[3].split(",")[1]}


def test_each_problem_is_reported_with_its_file_and_reason(damaged):
    res, site, made = damaged["result"], damaged["site"], damaged["made"]
    assert res.returncode == 0, res.stdout + res.stderr
    found = [(r.category, r.path, r.row, r.column, r.reason) for r in query(site, Rejection)]

    def one(category, path=None, **kw):
        hits = [f for f in found if f[0] == category and (path is None or (f[1] or "").endswith(path))
                and all(f[{"row": 2, "column": 3}[k]] == v for k, v in kw.items())]
        assert hits, (category, path, found)
        return hits[0][4]

    assert "truncated file" in one("truncated", "damaged/truncated/0005.dcm")
    assert "not a DICOM file" in one("not_dicom", "damaged/notes.txt")
    assert "modality MR, not CT" in one("not_ct", "damaged/mr/0000.dcm")
    assert "localizer" in one("localizer", "damaged/scout/0000.dcm")
    assert "missing slice" in one("missing_slice", "damaged/gap/0000.dcm")
    assert made["truncated"] in one("missing_slice", "damaged/truncated/0000.dcm")  # its series lost a slice
    assert "same SOP instance as" in one("duplicate_instance", "zz_reexport/copy.dcm")
    assert "cannot be decoded" in one("undecodable", "damaged/undecodable/0003.dcm")
    assert "could not convert string to float: 'sixty'" in one("table", "clinical.csv", row=4, column="age")
    assert "unknown exam id 'NOPE0001E1'" in one("table", "labels.csv", column="exam_id")
    for words in ("truncated", "not_dicom", "not_ct", "localizer", "missing_slice", "duplicate_instance",
                  "undecodable", "table"):
        assert words in res.stdout  # the summary table counts every reason


def test_everything_else_is_ingested(damaged):
    site, original, made = damaged["site"], damaged["original"], damaged["made"]
    status = {x.series_uid: x.status for x in query(site, Series)}
    assert all(status[uid] == "accepted" for uid in original)  # the duplicate did not cost its series
    for name in ("rle", "j2k", "flipped", "enhanced"):
        assert status[made[name]] == "accepted", name
    for name in ("truncated", "mr", "scout", "gap", "undecodable"):
        assert status[made[name]] == "rejected", name
    exams = {e.exam_id: e for e in query(site, Exam)}
    assert len(exams) == len((site.site_dir / "clinical.csv").read_text().splitlines()) - 1
    assert exams[damaged["exam_row"]].clinical["age"] is None  # the bad cell is dropped, its row kept
    # compressed, re-oriented and multi-frame copies decode to the very same crops
    crops = {}
    for c in query(site, Crop):
        crops.setdefault(c.series_uid, {})[c.region] = np.load(site.work_dir / c.path)
    uid = next(u for u, files in original.items() if files == damaged["base"])
    for name in ("rle", "j2k", "flipped", "enhanced"):
        for region, arr in crops[uid].items():
            np.testing.assert_array_equal(crops[made[name]][region], arr, err_msg=f"{name} {region}")


def test_source_tree_unchanged_and_second_run_reads_nothing(damaged, monkeypatch):
    site = damaged["site"]
    assert snapshot(site.site_dir) == damaged["before"]

    def refuse(*a, **k):
        raise AssertionError(f"re-read {a[:1]}")
    monkeypatch.setattr(m3fm.data.dicom_series.pydicom, "dcmread", refuse)
    monkeypatch.setattr(m3fm.data.clinical, "read_csv", refuse)
    summary = ingest_site(site, workers=1)
    assert (summary["files_read"], summary["series_processed"], summary["tables_read"]) == (0, 0, False)
    assert summary["series_rejected"] == 5 and snapshot(site.site_dir) == damaged["before"]


def test_pydicom_ct_test_files_decode_and_a_single_slice_is_too_few(tmp_path):
    ct_small = Path(get_testdata_file("CT_small.dcm"))
    enhanced = Path(get_testdata_file("eCT_Supplemental.dcm", download=False))  # from the pydicom-data package
    h = read_header(ct_small, "CT_small.dcm")
    hu = load_hu(ct_small.parent, check_series([h], min_slices=1))
    ds = pydicom.dcmread(ct_small)
    np.testing.assert_array_equal(hu[0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    # enhanced multi-frame CT: 2 frames, geometry and rescale from functional groups, rows stored right-to-left
    e = read_header(enhanced, "eCT_Supplemental.dcm")
    geo = check_series([e], min_slices=1)
    assert e.frames == 2 and geo.flip_w and load_hu(enhanced.parent, geo).shape == (2, 512, 512)
    site = tmp_path / "site"
    (site / "dicom").mkdir(parents=True)
    shutil.copy(ct_small, site / "dicom" / "CT_small.dcm")
    shutil.copy(enhanced, site / "dicom" / "eCT_Supplemental.dcm")
    (site / "site.toml").write_text('site_id = "pyd"\ntasks = []\n[ingest]\nmin_slices = 16\nmodel_config = "tiny"\n')
    res = subprocess.run([script("m3fm-client"), "ingest", str(site)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "nothing usable" in res.stdout  # no series, no clinical records
    reasons = {r.path: (r.category, r.reason) for r in query(load_site(site), Rejection)}
    assert reasons["dicom/CT_small.dcm"][0] == "too_few_slices"
    assert "1 slice, fewer than the minimum 16" in reasons["dicom/CT_small.dcm"][1]
    assert "2 slices, fewer than the minimum 16" in reasons["dicom/eCT_Supplemental.dcm"][1]
