"""Ingestion speed: series per second at a preset's series size; print a table, write benchmarks/results/ingestion.json.

  python benchmarks/ingestion.py [--preset bench] [--exams 2] [--workers 1 2] [--config base] [--cohort DIR] [--out F]

Writes a one-site cohort of the preset (bench: 512 x 512 slices at clinical spacing; each exam takes about
40 s to render on one core), then ingests it from scratch once per worker count (header index, series checks,
decode, HU, lung/heart localization, every crop of the model configuration), then once more unchanged (the
incremental no-op); --cohort DIR reuses a cohort written before with the same preset and exams (its site-01 is
copied, never changed). Then, in this process, each series stage by stage (the same functions ingestion calls), and
the decode-only floor (pydicom reading every file with its pixels, nothing else). Peak RSS per worker: the
largest of the workers (2+ workers), each row measured in a forked child whose only children are its workers;
with 1 worker ingestion runs in that child. A measurement, never
pass/fail: the machine is shared and timings are noisy.

Besides the whole run's rate: the rate after start-up (once each worker has finished its first series; counted in
slices, at the site's mean series size, since series run longest first), what a site of thousands of series sees.
A worker with 8 or more series narrows crops to float16 through torch (same bits, after a 2 s import); the stage
table shows cropping both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import tomli_w
import tomllib

# Nothing heavy at module level: a spawned ingestion worker imports the main module again (as __mp_main__), and
# with client.ingest and the cohort generator up here each worker paid about 1 s more to start than the workers
# of `m3fm-client ingest`, whose main module (client/cli.py) imports in 0.1 s.
RESULTS = Path(__file__).parent / "results" / "ingestion.json"


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from m3fm.data.crops import TORCH_CAST_MIN_SERIES
    from sim.cohort.generate import generate_cohort
    from sim.cohort.presets import build_sites

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--exams", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--config", default="base", help="model configuration whose crops are cached")
    ap.add_argument("--cohort", type=Path, help="a cohort generate_cohort wrote for this preset and exams, reused")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="m3fm-bench-ingest-"))
    rows = []
    try:
        t0 = time.perf_counter()
        if args.cohort:
            shutil.copytree(args.cohort / "site-01", tmp / "cohort" / "site-01")
        else:
            generate_cohort(tmp / "cohort", build_sites(args.preset, sites=1, exams_per_site=args.exams), seed=0,
                            workers=max(args.workers))
        generated = time.perf_counter() - t0
        site_dir = tmp / "cohort" / "site-01"
        files = [p for p in (site_dir / "dicom").rglob("*") if p.is_file()]
        megabytes = sum(p.stat().st_size for p in files) / 2**20
        for workers in args.workers:
            rows.append(in_fresh_child(measure, site_dir, workers, args.preset, args.config, len(files), megabytes))
        stages = stage_breakdown(site_dir, args.config)
    finally:
        shutil.rmtree(tmp)
    table = Table(title=f"ingestion, preset {args.preset} ({args.exams} exams, cohort {'copied' if args.cohort else 'written'} in {generated:.0f} s)")
    columns = list(dict.fromkeys(k for r in rows for k in r))  # peak RSS per worker: 2+ workers only
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r.get(c, "-")) for c in columns))
    Console(width=200).print(table)
    st = Table(title=f"one worker, stage by stage, seconds per series (mean of {stages['series']} series, "
                     f"{stages['slices_per_series']:.0f} slices each)")
    for col in stages["seconds_per_series"]:
        st.add_column(col, justify="right")
    st.add_row(*(f"{v:.3f}" for v in stages["seconds_per_series"].values()))
    Console(width=200).print(st)
    if stages["crop_seconds_per_series_torch_cast"] is not None:
        per = stages["seconds_per_series"]
        fast = per["total"] - per["crop + resize + write"] + stages["crop_seconds_per_series_torch_cast"]
        print(f"crop + resize + write with the float16 cast through torch (a worker with >= {TORCH_CAST_MIN_SERIES} "
              f"series): {stages['crop_seconds_per_series_torch_cast']:.3f} s a series; total {fast:.3f} s, "
              f"{1 / fast:.2f} series/s on one core")
    print(f"decode-only floor: {stages['decode_floor_series_per_second']:.2f} series/s on one core "
          f"(pydicom, pixels included); the stages above sum to {stages['series_per_second_one_core']:.2f} series/s")
    for name, r in stages["compressed_series_seconds"].items():
        print(f"one series as {name}: " + (r if isinstance(r, str) else
              f"{r['seconds']:.2f} s to read, locate and crop ({r['megabytes']} MB; crops equal the uncompressed "
              f"series': {r['crops_equal_uncompressed']})"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "ingestion", "rows": rows, "stages": stages, "machine": {
        "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "peak_rss_mb_main_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}}, indent=1))
    print(f"wrote {args.out}")


def measure(site_dir: Path, workers: int, preset: str, config: str, slices: int, megabytes: float) -> dict:
    """One row: the site ingested from scratch with this many workers, then once more unchanged."""
    from client.ingest import ingest_site
    from client.site import load_site

    d = tomllib.loads((site_dir / "site.toml").read_text())
    d["storage"]["work_dir"] = f"../work-{workers}"
    d["ingest"]["model_config"] = config
    (site_dir / "site.toml").write_text(tomli_w.dumps(d))
    site = load_site(site_dir)
    done = []  # when each series finished, from the start
    t0 = time.perf_counter()
    s = ingest_site(site, workers=workers,
                    progress=lambda stage, i, n: done.append(time.perf_counter() - t0) if stage == "series" else None)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ingest_site(site, workers=workers)
    warm = time.perf_counter() - t0
    assert again["files_read"] == 0 and again["series_processed"] == 0
    series = s["series_accepted"] + s["series_rejected"]
    row = {"preset": preset, "config": config, "workers": workers, "series": series, "slices": slices,
           "megabytes": round(megabytes, 1), "seconds": round(cold, 2), "series_per_second": round(series / cold, 3),
           "slices_per_second": round(slices / cold, 1), "megabytes_per_second": round(megabytes / cold, 1),
           "unchanged_rerun_seconds": round(warm, 2)}
    if len(done) > workers:  # once every worker has finished its first series: the rate a large site sees
        # series run longest first, so count what came after start-up in slices, at the mean series' size
        sizes = series_sizes(site)
        rate = sum(sizes[workers:]) / (done[-1] - done[workers - 1]) / (sum(sizes) / len(sizes))
        row["series_per_second_after_startup"] = round(rate, 3)
        row["startup_seconds"] = round(done[workers - 1], 2)
    if workers > 1:  # this process's children are the ingestion workers only (see in_fresh_child)
        row["peak_rss_mb_per_worker"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return row


def in_fresh_child(fn, *args):
    """fn(*args) in a forked child -> its JSON-able result. The child's RUSAGE_CHILDREN counts only the processes
    it starts: in this process it also counted the cohort generator's workers, whose 2.2 GB a worker was reported
    as the ingestion workers' peak (2026-12-04). A forked process starts with its own high-water mark."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            out = {"result": fn(*args)}
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            out, code = {"error": f"{type(e).__name__}: {e}"}, 1
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read() or '{"error": "the child died without a result"}')
    os.waitpid(pid, 0)
    if "error" in out:
        raise RuntimeError(f"measuring in a child process: {out['error']}")
    return out["result"]


def series_sizes(site) -> list[int]:
    """Files per processed series, longest first: the order ingestion hands series to its workers."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from m3fm.data.store import Series, open_store

    engine = open_store(site.database_url)
    with Session(engine) as s:
        sizes = sorted(s.scalars(select(Series.files)), reverse=True)
    engine.dispose()
    return sizes


def stage_breakdown(site_dir: Path, config: str) -> dict:
    """Each series through ingestion's own functions, timed stage by stage, and the decode-only floor."""
    import numpy as np
    import pydicom

    from m3fm.data.crops import crop_plans, write_crop
    from client.series_reader import header_or_reason, volume_buffer
    from m3fm.data.dicom_series import InputRejected, check_series, load_hu
    from m3fm.data.localize import locate
    from m3fm.model.configs import get_config

    files = sorted(p for p in (site_dir / "dicom").rglob("*") if p.is_file())
    t0 = time.perf_counter()
    headers = {}
    for p in files:
        h, _, _ = header_or_reason(site_dir, str(p.relative_to(site_dir)))
        if h is not None:
            headers.setdefault(h.series_uid, []).append(h)
    header_s = time.perf_counter() - t0
    cfg, spent, slices, torch_crop = get_config(config), {}, [], []
    import torch  # loaded before the clock runs: a long run's worker pays this once (about 2 s)

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="m3fm-bench-crops-"))
    try:
        for uid, hs in headers.items():
            marks = {}
            t = time.perf_counter()
            try:
                geo = check_series(hs, 64)
            except InputRejected:
                continue
            marks["check"] = time.perf_counter() - t
            t = time.perf_counter()
            hu = load_hu(site_dir, geo, volume_buffer(int(np.prod(geo.shape))))  # as a worker reads
            marks["decode + HU"] = time.perf_counter() - t
            t = time.perf_counter()
            boxes = locate(hu, geo.spacing)
            marks["localize"] = time.perf_counter() - t
            t = time.perf_counter()
            for plan in crop_plans(hu, geo.spacing, boxes, cfg):  # resized and written a slice at a time
                write_crop(out / uid / f"{plan.region}.npy", plan)
            marks["crop + resize + write"] = time.perf_counter() - t
            t = time.perf_counter()
            for plan in crop_plans(hu, geo.spacing, boxes, cfg):  # the same, narrowed to float16 through torch
                write_crop(out / uid / f"{plan.region}.npy", plan, torch_cast=True)
            torch_crop.append(time.perf_counter() - t)
            for k, v in marks.items():
                spent.setdefault(k, []).append(v)
            slices.append(len(geo.frames))
    finally:
        shutil.rmtree(out)
    compressed = compressed_series(site_dir, next(iter(headers.values())), cfg)
    per_series = {"headers": header_s / max(len(headers), 1), **{k: float(np.mean(v)) for k, v in spent.items()}}
    t0 = time.perf_counter()
    for p in files:
        try:
            pydicom.dcmread(p).pixel_array
        except Exception:  # noqa: BLE001 - what ingestion rejects costs the floor nothing more
            pass
    floor = time.perf_counter() - t0
    return {"series": len(slices), "slices_per_series": float(np.mean(slices)) if slices else 0.0,
            "seconds_per_series": {**per_series, "total": sum(per_series.values())},
            "crop_seconds_per_series_torch_cast": float(np.mean(torch_crop)) if torch_crop else None,
            "series_per_second_one_core": 1 / sum(per_series.values()),
            "decode_floor_series_per_second": len(headers) / floor, "compressed_series_seconds": compressed}


def compressed_series(site_dir: Path, headers, cfg) -> dict:
    """One series re-encoded in each compressed transfer syntax (pydicom + pylibjpeg encoders), then read, located
    and cropped as ingestion does (decode, HU, boxes, resize; no write): seconds for the series, its size, and that
    its boxes and crops equal the uncompressed series'."""
    import numpy as np
    import pydicom
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    from client.series_reader import read_series
    from m3fm.data.crops import crop_plans, resize
    from m3fm.data.dicom_series import read_header

    geo, hu, boxes = read_series(site_dir, headers, 64)
    want = [resize(p.source, p.shape) for p in crop_plans(hu, geo.spacing, boxes, cfg)]
    out = {}
    for name, syntax in (("rle", RLELossless), ("jpeg2000", JPEG2000Lossless), ("jpeg-ls", JPEGLSLossless)):
        d = Path(tempfile.mkdtemp(prefix=f"m3fm-bench-{name}-"))
        try:
            for h in headers:
                ds = pydicom.dcmread(site_dir / h.path)
                try:
                    ds.compress(syntax, generate_instance_uid=False)
                except Exception as e:  # noqa: BLE001 - an encoder this install lacks: say so, measure the rest
                    out[name] = f"not measured: {type(e).__name__}: {e}"[:120]
                    break
                (d / h.path).parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(d / h.path)
            else:
                # the compressed files' own headers: the uncompressed ones say where raw pixels lay in other files
                own = [read_header(d / h.path, h.path) for h in headers]
                t = time.perf_counter()
                geo, hu2, boxes2 = read_series(d, own, 64, reuse_buffer=True)
                got = [resize(p.source, p.shape) for p in crop_plans(hu2, geo.spacing, boxes2, cfg)]
                out[name] = {"seconds": round(time.perf_counter() - t, 2), "megabytes": round(
                    sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 2**20, 1),
                    "crops_equal_uncompressed": boxes2 == boxes and all(np.array_equal(a, b) for a, b in zip(got, want))}
        finally:
            shutil.rmtree(d)
    return out


if __name__ == "__main__":
    main()
