"""What ingestion's worker processes run: one file's header, one series read, checked, located and cropped.

Kept apart from client/ingest.py (the database side) so that a spawned worker imports only what it uses: numpy,
pydicom, scipy and the crop code, not SQLAlchemy or the PACS client (0.4 s a worker at start). `m3fm-client
predict` reads a series with the same functions.
"""

from __future__ import annotations

import gc
import multiprocessing
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from m3fm.data.crops import crop_plans, write_crop
from m3fm.data.dicom_series import InputRejected, InstanceHeader, check_series, load_hu, read_header
from m3fm.data.localize import LocalizationError, locate
from m3fm.model.configs import get_config

# bump when series checks, localization or cropping change: series made by an older pipeline are redone
PIPELINE_VERSION = 1


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """The ingestion worker pool, its processes started now.

    Forked where that is safe, else spawned. A spawned worker imports numpy, pydicom and scipy again and tears
    them down at the end: on the 6-series bench run (2 workers, 11.4 s) the workers did nothing for their first
    2.4 s, and closing them took a few tenths more. A forked worker starts with this process's imports and ends
    with os._exit. Fork is unsafe where another thread may hold a lock the child needs, or where a library's own
    thread pool does not survive it: so only while this is the one Python thread, with neither torch (OpenMP)
    nor grpc loaded. The workers fork before the index is built, with the collector frozen, so the children
    neither copy nor scan this process's objects."""
    fork = threading.active_count() == 1 and not {"torch", "grpc"} & set(sys.modules)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork" if fork else "spawn"))
    if fork:
        gc.freeze()
        try:
            pool.submit(int).result()  # the first task forks every worker at once
        finally:
            gc.unfreeze()
    return pool


def header_or_reason(base: Path, rel: str) -> tuple[InstanceHeader | None, str | None, str | None]:
    """One file's header -> (header, None, None), or (None, category, reason) when it cannot be used."""
    try:
        return read_header(base / rel, rel), None, None
    except InputRejected as e:
        return None, e.category, e.reason
    except Exception as e:  # noqa: BLE001 - one bad file never stops a site
        return None, "unreadable", f"header could not be read: {type(e).__name__}: {e}"


def header_job(args):
    site_dir, rel = args
    header, category, reason = header_or_reason(site_dir, rel)
    return rel, header.to_dict() if header else None, category, reason


def header_chunk_job(base: Path, rels: list[str]) -> list[tuple]:
    """header_job for a few files at once: one message to a worker, not one a file."""
    return [header_job((base, rel)) for rel in rels]


_VOLUME = [np.empty(0, dtype=np.float32)]  # this process's HU volume, reused series after series


def volume_buffer(n: int) -> np.ndarray:
    """The process's volume buffer, enlarged (once per larger series) to hold n values."""
    if _VOLUME[0].size < n:
        _VOLUME[0] = np.empty(0, dtype=np.float32)  # the old one goes first: never two at once
        _VOLUME[0] = np.empty(n, dtype=np.float32)
    return _VOLUME[0]


def release_volume_buffer() -> None:
    """Give the volume buffer back (when the series ran in the main process, after the last one)."""
    _VOLUME[0] = np.empty(0, dtype=np.float32)


def read_series(base: Path, headers: list[InstanceHeader], min_slices: int, reuse_buffer: bool = False):
    """One series' headers (paths relative to `base`) -> (checked geometry, HU volume (S, H, W), organ boxes);
    InputRejected naming the problem, and the file when one is to blame. `m3fm-client predict` reads with it too.
    With reuse_buffer the volume is a view of this process's volume buffer, valid until the next series is read."""
    geo = check_series(headers, min_slices)
    hu = load_hu(base, geo, volume_buffer(int(np.prod(geo.shape))) if reuse_buffer else None)
    try:
        return geo, hu, locate(hu, geo.spacing)
    except LocalizationError as e:
        raise InputRejected("localization_failed", f"organs not found: {e}") from None


def series_job(args):
    site_dir, work_dir, uid, header_dicts, min_slices, config, torch_cast = args
    if torch_cast and multiprocessing.parent_process() is not None:
        import torch  # a spawned worker's own torch: one thread, the workers are the parallelism

        torch.set_num_threads(1)
    headers = [InstanceHeader.from_dict(h) for h in header_dicts]
    try:
        geo, hu, boxes = read_series(site_dir, headers, min_slices, reuse_buffer=True)
    except InputRejected as e:
        return {"status": "rejected", "category": e.category, "reason": e.reason, "path": e.path}
    except Exception as e:  # noqa: BLE001 - one bad series never stops a site
        return {"status": "rejected", "category": "failed", "reason": f"{type(e).__name__}: {e}", "path": None}
    first = next(h for h in headers if h.path == geo.frames[0][0])
    row_dir, col_dir = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    # patient position (x, y, z mm) of canonical voxel (0, 0, 0), after the in-plane flips
    origin = (np.array(first.positions[geo.frames[0][1]]) + geo.flip_h * (first.rows - 1) * geo.spacing[1] * col_dir
              + geo.flip_w * (first.cols - 1) * geo.spacing[2] * row_dir)
    crops = []
    for plan in crop_plans(hu, geo.spacing, boxes, get_config(config)):
        rel = f"crops/{uid}/{plan.region}_{'x'.join(map(str, plan.shape))}.npy"
        write_crop(work_dir / rel, plan, torch_cast)
        crops.append({"region": plan.region, "scale": plan.scale, "shape": list(plan.shape),
                      "voxel_size": plan.voxel_size.tolist(), "first_slice": plan.first_slice, "path": rel})
    return {"status": "accepted", "shape": list(hu.shape), "spacing": list(geo.spacing), "origin": origin.tolist(),
            "boxes": {k: list(v) for k, v in boxes.items()}, "crops": crops, "duplicates": geo.duplicates}
