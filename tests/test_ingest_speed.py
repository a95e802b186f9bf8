"""The ingestion speed work changes nothing the model sees: each fast step equals its plain definition, bit for bit,
on the tiny cohort's series and on one full-size (bench) series, and crop files are the bytes np.save wrote."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from scipy import ndimage
from scipy.spatial import ConvexHull, Delaunay
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.ingest import ingest_site
from client.series_reader import read_series
from client.site import load_site
from m3fm.data import crops, localize
from m3fm.data import dicom_series
from m3fm.data.crops import DirectFile, crop_plan, read_memmap, write_crop
from m3fm.data.dicom_series import check_series, load_hu, read_header
from m3fm.data.store import Crop, Rejection, Series, open_store
from sim.cohort.generate import generate_cohort
from sim.cohort.presets import build_sites

from ingested_series import first_accepted_headers


def site_volumes(site):
    """(HU volume, spacing) of the site's first accepted series, as ingestion read it."""
    geo, hu, _ = read_series(site.site_dir, first_accepted_headers(site), site.min_slices)
    return hu, geo.spacing


@pytest.fixture(scope="module")
def bench_site(tmp_path_factory):
    """One full-size exam (512 x 512 slices at clinical spacing, base crops), ingested by one worker."""
    out = tmp_path_factory.mktemp("bench")
    generate_cohort(out, build_sites("bench", sites=1, exams_per_site=1), seed=3, workers=1)
    site = load_site(out / "site-01")
    summary = ingest_site(site, workers=1)
    assert summary["series_accepted"] >= 1, summary
    return site


def whole_volume_resize(x, shape):
    """The resize as three whole-volume passes (how crops were made before they streamed slice by slice)."""
    x = np.asarray(x, dtype=np.float32)
    for axis in np.argsort([t / s for t, s in zip(shape, x.shape)], kind="stable"):
        x = crops._linear_axis(x, shape[axis], int(axis))
    return x


def npy_bytes(arr: np.ndarray) -> bytes:
    half = np.empty(arr.shape, dtype=np.float16)
    np.clip(arr, -2048, 4095, out=half, casting="unsafe")
    buf = io.BytesIO()
    np.save(buf, half)
    return buf.getvalue()


def hull_by_triangulation(mask2d):
    pts = np.argwhere(mask2d)
    if len(pts) < 4 or np.linalg.matrix_rank(pts - pts.mean(0)) < 2:
        return mask2d.copy()
    grid = np.indices(mask2d.shape).reshape(2, -1).T
    return (Delaunay(pts[ConvexHull(pts).vertices]).find_simplex(grid) >= 0).reshape(mask2d.shape)


def check_localisation_steps(hu, spacing):
    f = max(1, int(round(3.0 / min(spacing[1], spacing[2]))))  # the volume locate() works on
    small = hu[:, ::f, ::f]
    area = spacing[1] * spacing[2] * f * f
    dense = small > -500
    labels, n = ndimage.label(dense)
    sizes = ndimage.sum(dense, labels, range(1, n + 1))
    body = localize._largest(dense)
    assert np.array_equal(body, labels == 1 + int(np.argmax(sizes)))
    filled = localize.fill_holes_per_slice(body)
    assert np.array_equal(filled, np.stack([ndimage.binary_fill_holes(s) for s in body]))
    air = (small < -400) & filled
    want = np.zeros_like(air)
    for k in range(air.shape[0]):
        lab, m = ndimage.label(air[k])
        if m:
            want[k] = np.isin(lab, 1 + np.flatnonzero(ndimage.sum(air[k], lab, range(1, m + 1)) * area < 400.0))
    assert want.any() and np.array_equal(localize.small_in_plane(air, area, 400.0), want)
    right, left, _ = localize.lung_masks(small, (spacing[0], spacing[1] * f, spacing[2] * f))
    lungs = right | left
    hulls = [k for k in range(lungs.shape[0]) if lungs[k].sum() > 20]
    assert hulls
    for k in hulls[::3]:
        assert np.array_equal(localize._hull(lungs[k]), hull_by_triangulation(lungs[k])), k
    tissue = (small > -150) & (small < 250) & filled
    for r in (1, 2, 3):
        assert np.array_equal(localize.open_in_plane(tissue, r),
                              ndimage.binary_opening(tissue, structure=np.ones((1, 2 * r + 1, 2 * r + 1)))), r


def test_localisation_steps_equal_their_slice_by_slice_definitions(ingested, bench_site):
    """Labels, hole filling, airway removal, convex hulls and the opening: the fast forms give the masks of the
    per-slice scipy calls they replaced, so the organ boxes are the same."""
    _, sites, _ = ingested
    for site in (*sites, bench_site):
        check_localisation_steps(*site_volumes(site))


@pytest.mark.parametrize("src,dst", [((7, 9, 11), (4, 13, 5)), ((20, 30, 40), (33, 17, 40)), ((5, 5, 5), (16, 16, 16)),
                                     ((64, 40, 40), (16, 40, 24)), ((30, 20, 25), (30, 41, 12))])
def test_crops_stream_to_the_bytes_of_a_whole_volume_resize(tmp_path, monkeypatch, src, dst):
    """Slice-by-slice resizing, float16 narrowing and direct writes in chunks (with a tail that is no whole block,
    and where O_DIRECT is missing) give the very bytes np.save wrote for the whole-volume resize."""
    x = (np.random.default_rng(0).normal(size=src) * 1500).astype(np.float32)
    x[0, 0, 0] = 9000.0  # metal: clipped to float16's exact integers
    plan = crops.CropPlan("r", "s", x, dst, np.ones(3, np.float32), 0)
    want = npy_bytes(whole_volume_resize(x, dst))
    assert np.array_equal(crops.resize(x, dst), whole_volume_resize(x, dst))
    monkeypatch.setattr(DirectFile, "CHUNK", 8192)  # many chunks even for a small crop
    write_crop(tmp_path / "a.npy", plan)
    assert (tmp_path / "a.npy").read_bytes() == want and not (tmp_path / "a.tmp.npy").exists()
    write_crop(tmp_path / "t.npy", plan, torch_cast=True)
    assert (tmp_path / "t.npy").read_bytes() == want
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    write_crop(tmp_path / "b.npy", plan)
    assert (tmp_path / "b.npy").read_bytes() == want


@pytest.mark.parametrize("cast", [crops.HalfCast, crops.HalfBits])
def test_fast_casts_narrow_to_float16_as_numpy_does(cast):
    """Both fast casts (torch's for long runs, the bit arithmetic otherwise) give numpy's float16 bits: ties to
    even, subnormals, signed zeros, values past float16's exact integers and past the clip."""
    rng = np.random.default_rng(5)
    ties = np.float16(rng.uniform(-2048, 2048, 20000)).astype(np.float32)
    ties += np.spacing(np.float16(ties)).astype(np.float32) / 2  # exactly halfway between two float16 values
    tiny = (rng.normal(size=20000) * 1e-5).astype(np.float32)  # float16 subnormals and underflow to zero
    s = np.concatenate([rng.uniform(-3000, 9000, 100000).astype(np.float32), ties, tiny,
                        np.float32([0.0, -0.0, 4095.0, 4095.5, -2048.5, 2049.0, 65504.0, np.inf, -np.inf])])
    want = np.empty(s.shape, np.float16)
    np.clip(s, -2048, 4095, out=want, casting="unsafe")
    got = np.empty(s.shape, np.float16)
    cast(got)(s)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_bit_cast_matches_numpy_across_the_clip_range():
    """Every 997th float32 bit pattern from 0 to 4096 and from -0 to -4096 (both signs, every exponent, mantissas
    of every kind), and every float32 in one binade's worth of mantissa around a float16 rounding boundary."""
    steps = [np.arange(0, 0x45800000, 997, dtype=np.uint32), np.arange(0x80000000, 0xC5800000, 997, dtype=np.uint32),
             np.arange(0x44FFE000 - 4096, 0x44FFE000 + 4096, dtype=np.uint32)]  # around 2047 -> 2048
    for bits in steps:
        x = bits.view(np.float32)
        got, want = np.empty(x.shape, np.float16), np.clip(x, -2048, 4095).astype(np.float16)
        crops.HalfBits(got)(x)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_a_full_size_series_crops_are_the_whole_volume_resize(bench_site):
    """Every base crop of the bench series on disk: the bytes of the whole-volume resize of its cut."""
    hu, spacing = site_volumes(bench_site)
    engine = open_store(bench_site.database_url)
    with Session(engine) as s:
        series = s.scalars(select(Series).where(Series.status == "accepted").order_by(Series.series_uid)).first()
        rows = list(s.scalars(select(Crop).where(Crop.series_uid == series.series_uid)))
    engine.dispose()
    assert len(rows) == 6
    for c in rows:
        box = series.boxes[crops.REGION_BOX[c.region]]
        target = (0, *c.shape[1:]) if c.region.startswith("slab_") else tuple(c.shape)
        plan = crop_plan(hu, spacing, box, target)
        assert plan.shape == tuple(c.shape) and plan.first_slice == c.first_slice
        got = (bench_site.work_dir / c.path).read_bytes()
        whole = crops.cut(hu, crops.widen(box, spacing, target))  # padded with air all at once, as before
        assert got == npy_bytes(whole_volume_resize(whole, plan.shape)), c.region
        assert read_memmap(bench_site.work_dir / c.path).shape == tuple(c.shape)


def test_series_read_from_where_the_headers_said_equal_pydicoms_decode(ingested, bench_site):
    """load_hu reads uncompressed pixels straight from the offsets the header pass recorded: the same HU volume as
    decoding every file again with pydicom, on every tiny-cohort site and on the full-size series."""
    _, sites, _ = ingested
    for site in (*sites, bench_site):
        headers = first_accepted_headers(site)
        geo = check_series(headers, site.min_slices)
        assert set(geo.pixels) == {h.path for h in headers}  # every file took the direct read
        direct = load_hu(site.site_dir, geo)
        geo.pixels.clear()
        assert np.array_equal(direct, load_hu(site.site_dir, geo))


@pytest.mark.parametrize("signed,stored,syntax", [(0, 16, ExplicitVRLittleEndian), (0, 12, ExplicitVRLittleEndian),
                                                  (1, 12, ExplicitVRLittleEndian), (1, 16, ImplicitVRLittleEndian)])
def test_direct_pixel_read_corrects_unused_bits_as_pydicom_does(ingested, tmp_path, signed, stored, syntax):
    """Signed and unsigned pixels, 12 of 16 bits stored with garbage in the unused ones, implicit and explicit VR:
    the direct read gives pydicom's pixel_array; a file that changed size since its header was read is left to
    pydicom."""
    _, sites, _ = ingested
    src = sites[0].site_dir / first_accepted_headers(sites[0])[0].path
    ds = pydicom.dcmread(src)
    rng = np.random.default_rng(stored + signed)
    values = rng.integers(-2000 if signed else 0, 2000 if signed else 4000, size=(ds.Rows, ds.Columns))
    raw = values.astype(np.int16 if signed else np.uint16)
    if stored < 16:  # garbage above the stored bits, which pydicom shifts out (and sign-extends when signed)
        raw = (raw.view(np.uint16) & np.uint16(0x0FFF)) | (rng.integers(0, 16, raw.shape, dtype=np.uint16) << 12)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = signed, stored, stored - 1
    ds.PixelData = raw.astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = read_header(path, "one.dcm")
    assert "pixel_offset" in header.extra
    got = dicom_series._native_frames(path, header.extra, 1, ds.Rows, ds.Columns)
    want = pydicom.dcmread(path).pixel_array
    assert got.dtype == want.dtype and np.array_equal(got[0], want)
    if stored < 16:
        assert not np.array_equal(got[0].view(np.uint16), raw)  # the garbage was there to remove
    with open(path, "ab") as f:
        f.write(b"\0\0")
    assert dicom_series._native_frames(path, header.extra, 1, ds.Rows, ds.Columns) is None


def test_a_crop_past_the_volume_edge_is_padded_slice_by_slice_to_the_same_bytes(tmp_path):
    """Crops widened past the volume (on either side, in every axis) are padded per slice as they are read:
    the bytes of resizing the materialised, air-padded cut."""
    vol = (np.random.default_rng(1).normal(size=(20, 30, 26)) * 800).astype(np.float32)
    cases = [([(-5, 25), (-3, 33), (2, 20)], (12, 16, 9)), ([(10, 30), (0, 30), (-4, 30)], (20, 30, 30)),
             ([(-8, 4), (5, 9), (-1, 9)], (3, 8, 8))]
    for ranges, shape in cases:
        padded = crops.padded_cut(vol, ranges)
        assert isinstance(padded, crops.PaddedCut)
        want = crops.cut(vol, ranges)
        assert np.array_equal(np.asarray(padded), want)
        assert np.array_equal(np.stack([padded[i] for i in range(padded.shape[0])]), want)
        write_crop(tmp_path / "c.npy", crops.CropPlan("r", "s", padded, shape, np.ones(3, np.float32), 0))
        assert (tmp_path / "c.npy").read_bytes() == npy_bytes(whole_volume_resize(want, shape))
    assert crops.padded_cut(vol, [(0, 20), (0, 30), (0, 26)]).base is vol  # inside: a view, nothing padded


def site_records(site) -> dict:
    """What ingestion recorded and wrote, in a form two runs can be compared by."""
    engine = open_store(site.database_url)
    with Session(engine) as s:
        series = {x.series_uid: (x.status, x.category, x.reason, x.files, x.members_hash, x.boxes, x.origin)
                  for x in s.scalars(select(Series))}
        rejections = sorted((r.scope, r.category, r.reason, r.path or "") for r in s.scalars(select(Rejection)))
        crop_rows = sorted((c.series_uid, c.region, tuple(c.shape), c.first_slice, c.path) for c in s.scalars(select(Crop)))
    engine.dispose()
    crop_bytes = {row[-1]: (site.work_dir / row[-1]).read_bytes() for row in crop_rows}
    return {"series": series, "rejections": rejections, "crops": crop_rows, "bytes": crop_bytes}


def test_overlapped_index_and_cutting_record_what_one_process_does(cohort, tmp_path):
    """With a (forked) worker pool, series are cut while the index goes on. A series with one file in a folder
    read last is cut early without it, cut again once the index is whole, and ends as the one-process run records
    it; so does every other series, rejection and crop byte, and a second run does nothing."""
    out, _ = cohort
    runs = {}
    for workers in (1, 2):
        site_dir = tmp_path / f"w{workers}" / "site-01"
        shutil.copytree(out / "site-01", site_dir, ignore=shutil.ignore_patterns("work*"))
        first = sorted(p for p in (site_dir / "dicom").rglob("*") if p.is_file())[0]
        stray = site_dir / "dicom" / "zzz-late" / first.name
        stray.parent.mkdir()
        first.rename(stray)  # sorts after every other folder
        site = load_site(site_dir)
        if workers == 1:
            summary = ingest_site(site, workers=1)
        else:  # a fresh process, whose workers fork (pytest's may hold torch, and then they spawn)
            code = "import json, sys; from client.ingest import ingest_site; from client.site import load_site; " \
                   "print(json.dumps(ingest_site(load_site(sys.argv[1]), workers=2)))"
            done = subprocess.run([sys.executable, "-c", code, str(site_dir)], capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr
            summary = json.loads(done.stdout.splitlines()[-1])
        runs[workers] = (summary, site_records(site), site)
    (one, rec1, _), (two, rec2, site2) = runs[1], runs[2]
    assert two["series_cut_again"] == 1 and one["series_cut_again"] == 0
    assert rec1 == rec2 and rec2["series"] and rec2["bytes"]
    for key in ("files_read", "series_processed", "series_accepted", "series_rejected", "crops"):
        assert one[key] == two[key], key
    again = ingest_site(site2, workers=2)
    assert (again["files_read"], again["series_processed"]) == (0, 0) and site_records(site2) == rec2


@pytest.mark.parametrize("before,method", [("", "fork"), ("thread", "spawn"), ("torch", "spawn")])
def test_ingestion_workers_fork_only_where_forking_is_safe(before, method):
    """A fresh one-thread process forks its workers; one with another thread, or with torch (OpenMP) loaded,
    spawns them. Either way the workers run jobs."""
    code = f"""import threading
if {before!r} == "thread":
    threading.Thread(target=threading.Event().wait, daemon=True).start()
if {before!r} == "torch":
    import torch
from client.series_reader import worker_pool
pool = worker_pool(2)
print(pool._mp_context.get_start_method(), pool.submit(sum, [1, 2]).result())
pool.shutdown()"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [method, "3"]
