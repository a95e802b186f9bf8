"""`m3fm-client ingest`: turn a hospital's folder into a checked, cached, queryable local dataset.

Stages (each incremental: unchanged inputs are not read again):
  0. pacs    for a site with [source] dicomweb: new instances downloaded from the PACS (client/pacs.py)
  1. index   every file under dicom/: header only, no pixels; unreadable files rejected with the reason
  2. series  group by SeriesInstanceUID; check, decode, convert to HU, find lungs and heart, cache crops
  3. tables  clinical.csv, labels.csv, reports/ checked against the schema and the task registry
  4. splits  every new patient gets a deterministic train/val/test split

Only the work folder (outside the site folder) is written. Results and every
rejection go to the site database; one bad input never stops the rest.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from client.pacs import sync_pacs
from client.series_reader import (PIPELINE_VERSION, header_chunk_job, header_job, release_volume_buffer, series_job,
                                  worker_pool)
from client.site import SiteConfig
from m3fm.data import clinical as tables
from m3fm.data.crops import REGION_SCALE, TORCH_CAST_MIN_SERIES
from m3fm.data.dicom_series import InstanceHeader
from m3fm.data.store import (Crop, Exam, IngestRun, Label, Rejection, Series, SourceFile, Split, clear_scope,
                             now, open_store, reject)
from m3fm.model.configs import get_config
from m3fm.tasks import get_task

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def scan_tree(root: Path, site_dir: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under root (symlinks to files included)."""
    found = {}
    for dirpath, _, names in os.walk(root, followlinks=False):
        for name in names:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            found[p.relative_to(site_dir).as_posix()] = (st.st_size, st.st_mtime_ns)
    return dict(sorted(found.items()))


class Member(NamedTuple):
    """One file of a series, as process_series reads it from source_files."""
    path: str
    size: int
    mtime_ns: int
    header: dict


def members_hash(rows: list[Member]) -> str:
    h = hashlib.sha1()
    for r in sorted(rows, key=lambda r: r.path):
        h.update(f"{r.path}|{r.size}|{r.mtime_ns}\n".encode())
    return h.hexdigest()


def assign_split(salt: str, patient_id: str, fractions: dict[str, float]) -> str:
    """Deterministic in (site, patient): the same patient lands in the same split on every run and machine."""
    u = int(hashlib.sha256(f"{salt}|{patient_id}".encode()).hexdigest()[:12], 16) / 16 ** 12
    edge = 0.0
    for name in ("train", "val", "test"):
        edge += fractions[name]
        if u < edge:
            return name
    return "test"


# the stages ingest_site reports to its progress callback (stage, done, total), with what a person reads for them
INGEST_STAGES = {"pacs": "retrieving new series from the PACS", "index": "reading DICOM headers",
                 "series": "checking and cropping series"}


def _files_to_read(s: Session, site: SiteConfig) -> tuple[dict, dict, list[str]]:
    """(found: path -> (size, mtime), known rows by path, new or changed paths); rows of vanished files removed and
    the old rejections of the files to read cleared."""
    found = scan_tree(site.dicom_root, site.dicom_base)
    known = {r.path: r for r in s.scalars(select(SourceFile).where(SourceFile.kind == "dicom"))}
    for path in set(known) - set(found):
        clear_scope(s, f"file:{path}")
        s.delete(known.pop(path))
    todo = [p for p, st in found.items() if p not in known or (known[p].size, known[p].mtime_ns) != st]
    for k in range(0, len(todo), 500):  # one statement per 500 files, not a delete (and a flush) per file
        s.execute(delete(Rejection).where(Rejection.scope.in_([f"file:{p}" for p in todo[k:k + 500]])))
    return found, known, todo


def _store_header(s: Session, found: dict, known: dict, rel: str, header, category, reason) -> None:
    size, mtime = found[rel]
    row = known.get(rel) or SourceFile(path=rel, kind="dicom")
    row.size, row.mtime_ns = size, mtime
    row.status = "ok" if header else "rejected"
    row.series_uid = header["series_uid"] if header else None
    row.header = header
    s.add(row)
    if not header:
        reject(s, f"file:{rel}", "file", category, reason, path=rel)


def index_files(s: Session, site: SiteConfig, progress: Progress | None) -> int:
    """Stage 1, in this process: headers of new or changed files; rows of vanished files removed. Returns files
    read. (With a worker pool, index_and_cut runs stages 1 and 2 together.)"""
    found, known, todo = _files_to_read(s, site)
    for i, (rel, header, category, reason) in enumerate(header_job((site.dicom_base, p)) for p in todo):
        _store_header(s, found, known, rel, header, category, reason)
        if progress:
            progress("index", i + 1, len(todo))
    s.commit()
    return len(todo)


def process_series(s: Session, site: SiteConfig, progress: Progress | None) -> int:
    """Stage 2, in this process: every series whose files changed (or whose crops for the configuration are
    missing)."""
    cfg = get_config(site.model_config)
    volumes = {sc.name: tuple(sc.volume) for sc in cfg.scales}
    # plain values, read once: ORM rows expire at every commit below, and reading them again cost a SELECT per
    # file (0.6 s of the main process for 6 full-size series, while the workers waited on the 2 cores)
    groups: dict[str, list[Member]] = defaultdict(list)
    for r in s.scalars(select(SourceFile).where(SourceFile.kind == "dicom", SourceFile.status == "ok")):
        groups[r.series_uid].append(Member(r.path, r.size, r.mtime_ns, r.header))
    known = {x.series_uid: x for x in s.scalars(select(Series))}
    for uid in set(known) - set(groups):  # every file of it is gone
        _forget_series(s, uid)
    stale = [uid for uid, rows in groups.items() if not _up_to_date(s, site, known.get(uid), rows, volumes)]
    # narrow crops to float16 through torch where this process has it loaded already, or has enough series to
    # repay loading it
    torch_cast = "torch" in sys.modules or len(stale) >= TORCH_CAST_MIN_SERIES
    for i, uid in enumerate(stale):
        result = series_job(_cut_args(site, uid, groups[uid], torch_cast))
        _record_series(s, uid, groups[uid], result)
        s.commit()  # a crash loses only the series in flight
        if progress:
            progress("series", i + 1, len(stale))
    return len(stale)


def index_and_cut(s: Session, site: SiteConfig, pool: ProcessPoolExecutor, progress: Progress | None,
                  workers: int) -> tuple[int, int, int]:
    """Stages 1 and 2 overlapped on the worker pool: a series is cut as soon as every folder holding its files (see
    _folder) has been read, while the header pass goes on, instead of after it (in a 28-series run the index took 4.8 s before
    anything was cut). A later folder can still hold a stray file of a series cut early: once the index is whole,
    a series whose files differ from those it was cut with is cut again, and a result whose files are no longer the
    series' is never recorded. The same records as index_files + process_series. Returns (files read, series cut,
    series cut again)."""
    cfg = get_config(site.model_config)
    volumes = {sc.name: tuple(sc.volume) for sc in cfg.scales}
    found, known, todo = _files_to_read(s, site)
    changing = set(todo)
    groups: dict[str, dict[str, Member]] = defaultdict(dict)  # series -> path -> file, as the index stands
    for r in known.values():
        if r.status == "ok" and r.path not in changing:
            groups[r.series_uid][r.path] = Member(r.path, r.size, r.mtime_ns, r.header)
    old_series = {x.series_uid: x for x in s.scalars(select(Series))}
    unread = Counter(_folder(p) for p in todo)  # files still to read, per folder
    in_folder: dict[str, set[str]] = defaultdict(set)  # folder -> series with files there
    for uid, members in groups.items():
        for path in members:
            in_folder[_folder(path)].add(uid)
    # series reach the workers as they become ready, so their number is not known up front: folders stand for it
    torch_cast = len(unread) >= TORCH_CAST_MIN_SERIES * workers
    chunks = [todo[k:k + 32] for k in range(0, len(todo), 32)]
    reading, cuts, cut_with = set(), {}, {}  # header futures; cut future -> (uid, files); uid -> hash cut with
    counts = {"read": 0, "recorded": 0, "cut again": 0}

    def consider(uid: str) -> None:
        """Cut the series if it has files, every folder of them is read, it was not cut yet and its record is stale."""
        members = list(groups[uid].values())
        if (members and uid not in cut_with and not any(unread[_folder(m.path)] for m in members)
                and not _up_to_date(s, site, old_series.get(uid), members, volumes)):
            cut(uid)

    def cut(uid: str) -> None:
        members = sorted(groups[uid].values())
        cut_with[uid] = members_hash(members)
        cuts[pool.submit(series_job, _cut_args(site, uid, members, torch_cast))] = (uid, members)

    def take_headers(results) -> None:
        candidates = set()
        for rel, header, category, reason in results:
            _store_header(s, found, known, rel, header, category, reason)
            folder = _folder(rel)
            if header:  # (a changed file is in no group before its header is read again)
                groups[header["series_uid"]][rel] = Member(rel, *found[rel], header)
                in_folder[folder].add(header["series_uid"])
            unread[folder] -= 1
            if not unread[folder]:
                candidates |= in_folder[folder]
        counts["read"] += len(results)
        if progress:
            progress("index", counts["read"], len(todo))
        for uid in sorted(candidates):
            consider(uid)

    def record(future) -> None:
        uid, members = cuts.pop(future)
        if members_hash(members) == cut_with.get(uid):  # not cut again since
            _record_series(s, uid, members, future.result())
            s.commit()  # a crash loses only the series in flight
            counts["recorded"] += 1
            if progress:
                progress("series", counts["recorded"], len(cut_with))

    for uid in sorted(groups):  # series none of whose files changed, but whose record is stale
        consider(uid)
    while chunks or reading:
        while chunks and len(reading) < 2 * workers:  # a few header chunks queued: series cut in between
            reading.add(pool.submit(header_chunk_job, site.dicom_base, chunks.pop(0)))
        for f in wait(reading | set(cuts), return_when=FIRST_COMPLETED)[0]:
            if f in cuts:
                record(f)
            else:
                reading.discard(f)
                take_headers(f.result())
    s.commit()
    for uid, files in sorted(groups.items()):  # the index is whole: what a stray file changed, and what is left
        if uid in cut_with and cut_with[uid] != members_hash(list(files.values())):
            wait([f for f, (u, _) in cuts.items() if u == uid])  # one writer of a series' crops at a time
            del cut_with[uid]
            counts["cut again"] += 1
        consider(uid)
    while cuts:
        for f in wait(set(cuts), return_when=FIRST_COMPLETED)[0]:
            record(f)
    for uid in set(old_series) - {u for u, files in groups.items() if files}:  # every file of it is gone
        _forget_series(s, uid)
    s.commit()
    return len(todo), len(cut_with), counts["cut again"]


def _cut_args(site: SiteConfig, uid: str, members: list[Member], torch_cast: bool) -> tuple:
    """series_job's argument for one series."""
    return (site.dicom_base, site.work_dir, uid, [m.header for m in members], site.min_slices, site.model_config,
            torch_cast)


def _folder(rel: str) -> str:
    """The folder a series counts as read with: the parent of a file's folder, since exports split one series over
    sibling folders (DIR001, DIR002 in a study's folder; the synthetic cohort does too). A series whose files lie
    wider still is cut early and again (see index_and_cut); one flat folder of every file overlaps nothing."""
    parts = rel.split("/")
    return "/".join(parts[:-2]) if len(parts) > 2 else "/".join(parts[:-1])


def _up_to_date(s: Session, site: SiteConfig, old: Series | None, rows: list[Member], volumes: dict) -> bool:
    """Whether a series' record stands: the same files, the same pipeline, every crop of the configuration."""
    return (old is not None and old.members_hash == members_hash(rows) and old.pipeline == PIPELINE_VERSION
            and _complete(s, site, old, volumes))


def _complete(s: Session, site: SiteConfig, series: Series, volumes: dict[str, tuple]) -> bool:
    """Rejected series are final until their files change; accepted ones need every crop of the configuration."""
    if series.status != "accepted":
        return True
    have = {c.region: tuple(c.shape) for c in s.scalars(select(Crop).where(Crop.series_uid == series.series_uid))
            if (site.work_dir / c.path).exists()}
    for region, scale in REGION_SCALE.items():
        want = volumes[scale]
        got = have.get(region)
        if got is None or (got[1:] != want[1:] if region.startswith("slab_") else got != want):
            return False  # slabs keep every native slice: only their in-plane size is fixed
    return True


def _forget_series(s: Session, uid: str) -> None:
    s.execute(delete(Crop).where(Crop.series_uid == uid))
    clear_scope(s, f"series:{uid}")
    s.execute(delete(Series).where(Series.series_uid == uid))


def _record_series(s: Session, uid: str, rows: list[Member], result: dict) -> None:
    _forget_series(s, uid)
    h = InstanceHeader.from_dict(rows[0].header)
    series = Series(series_uid=uid, exam_id=h.accession, patient_id=h.patient_id, study_date=h.study_date,
                    description=h.description, status=result["status"], members_hash=members_hash(rows),
                    pipeline=PIPELINE_VERSION,
                    files=len(rows), scanner={"manufacturer": h.manufacturer, "model": h.model, "kernel": h.kernel,
                                              "thickness": h.thickness})
    if result["status"] == "rejected":
        series.category, series.reason = result["category"], result["reason"]
        # name the file to blame, or else the series' first file, so someone can find it
        first = sorted(r.path for r in rows)[0]
        path = result["path"] or first
        reason = f"series {uid} ({len(rows)} file{'s' if len(rows) > 1 else ''}): {result['reason']}"
        reject(s, f"series:{uid}", "series", result["category"], reason, path=path, series_uid=uid)
    else:
        series.shape, series.spacing = result["shape"], result["spacing"]
        series.origin, series.boxes = result["origin"], result["boxes"]
        for c in result["crops"]:
            s.add(Crop(series_uid=uid, **c))
        for dup, original in result["duplicates"]:
            reject(s, f"series:{uid}", "file", "duplicate_instance",
                   f"same SOP instance as {original}: the copy is ignored", path=dup, series_uid=uid)
    s.add(series)


def read_tables(s: Session, site: SiteConfig) -> bool:
    """Stage 3: re-read clinical.csv, labels.csv and reports/ when any of them changed. Returns whether it read."""
    reports_dir = site.site_dir / "reports"
    found = scan_tree(reports_dir, site.site_dir) if reports_dir.is_dir() else {}
    for name in ("clinical.csv", "labels.csv"):
        p = site.site_dir / name
        if p.is_file():
            st = p.stat()
            found[name] = (st.st_size, st.st_mtime_ns)
    known = {r.path: (r.size, r.mtime_ns) for r in s.scalars(select(SourceFile).where(SourceFile.kind != "dicom"))}
    if found == known and s.scalar(select(Exam.exam_id).limit(1)) is not None:
        return False
    s.execute(delete(SourceFile).where(SourceFile.kind != "dicom"))
    for p, (size, mtime) in found.items():
        s.add(SourceFile(path=p, kind="report" if p.startswith("reports/") else "table", size=size, mtime_ns=mtime,
                         status="ok"))
    records, problems = tables.read_clinical(site.site_dir / "clinical.csv")
    reports, report_problems = tables.read_reports(site.site_dir / "reports", set(records))
    labels, label_problems = tables.read_labels(site.site_dir / "labels.csv", set(records), set(site.tasks))
    s.execute(delete(Exam))
    s.execute(delete(Label))
    s.execute(delete(Rejection).where(Rejection.scope == "tables"))
    for exam_id, r in records.items():
        s.add(Exam(exam_id=exam_id, patient_id=r["patient_id"], study_date=r["study_date"], clinical=r,
                   sentences=tables.clinical_sentences(r), report=reports.get(exam_id)))
    for row in labels:
        s.add(Label(**row))
    for p in problems + report_problems + label_problems:
        reject(s, "tables", "table", "table", p.message, path=p.file, row=p.row, column=p.column)
    s.commit()
    return True


def assign_splits(s: Session, site: SiteConfig) -> None:
    """Stage 4: patients seen for the first time get their split; nobody ever moves."""
    have = set(s.scalars(select(Split.patient_id)))
    patients = set(s.scalars(select(Exam.patient_id))) | set(
        s.scalars(select(Series.patient_id).where(Series.status == "accepted")))
    for p in sorted(patients - have):
        s.add(Split(patient_id=p, split=assign_split(site.site_id, p, site.splits)))
    s.commit()


def summarize(s: Session, site: SiteConfig) -> dict:
    accepted = s.scalars(select(Series).where(Series.status == "accepted")).all()
    imaged = {x.exam_id for x in accepted}
    labelled = {}
    for task in site.tasks:
        exams = set(s.scalars(select(Label.exam_id).where(Label.task == task)))
        labelled[task] = len(exams if get_task(task).scale is None else exams & imaged)
    exams = s.scalars(select(Exam)).all()
    return {
        "site_id": site.site_id,
        "files": s.query(SourceFile).filter(SourceFile.kind == "dicom").count(),
        "series_accepted": len(accepted),
        "series_rejected": s.query(Series).filter(Series.status == "rejected").count(),
        "rejected": dict(Counter(r.category for r in s.scalars(select(Rejection)))),
        "exams": len(exams),
        "exams_with_images": len(imaged & {e.exam_id for e in exams}),
        "series_without_exam": len(imaged - {e.exam_id for e in exams}),
        "patients": len({e.patient_id for e in exams} | {x.patient_id for x in accepted}),
        "labelled": labelled,
        "splits": dict(Counter(s.scalars(select(Split.split)))),
        "crops": s.query(Crop).count(),
    }


def ingest_site(site: SiteConfig, workers: int = 1, progress: Progress | None = None) -> dict:
    t0 = time.perf_counter()
    site.work_dir.mkdir(parents=True, exist_ok=True)
    engine = open_store(site.database_url)
    with Session(engine) as s:
        run = IngestRun(started_at=now())
        s.add(run)
        s.commit()
        pool = worker_pool(workers) if workers > 1 else None  # one pool for both stages
        try:
            pacs = sync_pacs(s, site, progress) if site.dicomweb else None
            recut = 0
            if pool is not None:
                files_read, series_processed, recut = index_and_cut(s, site, pool, progress, workers)
            else:  # one process: nothing to overlap
                files_read = index_files(s, site, progress)
                series_processed = process_series(s, site, progress)
        finally:
            if pool is not None:
                pool.shutdown()
            release_volume_buffer()  # with one worker the series ran in this process
        tables_read = read_tables(s, site)
        assign_splits(s, site)
        summary = summarize(s, site)
        if pacs is not None:
            summary["pacs"] = pacs
        summary.update(files_read=files_read, series_processed=series_processed, series_cut_again=recut,
                       tables_read=tables_read, seconds=round(time.perf_counter() - t0, 2), database=site.database_url)
        run.finished_at, run.summary = now(), summary
        s.commit()
    engine.dispose()
    return summary


def rejection_rows(site: SiteConfig) -> list[tuple[str, str, str, str]]:
    """(file, row, column, problem) for every recorded rejection, for people to read."""
    engine = open_store(site.database_url)
    with Session(engine) as s:
        rows = [(r.path or (f"series {r.series_uid}" if r.series_uid else ""), "" if r.row is None else str(r.row),
                 r.column or "", r.reason) for r in s.scalars(select(Rejection).order_by(Rejection.id))]
    engine.dispose()
    return rows
