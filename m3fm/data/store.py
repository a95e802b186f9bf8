"""The site database (SQLAlchemy; a SQLite file in the site's work folder by default).

  source_files  every input file seen: size and mtime (how re-runs know it is unchanged), status, header
  series        every series found: accepted or rejected with the reason, geometry, organ boxes
  crops         cached task crops (float16 .npy memmaps under the work folder) with their voxel sizes
  exams         exam -> patient, clinical record and its sentences, report
  labels        checked label rows
  splits        patient -> train / val / test
  rejections    every rejected file, series or table cell, with its reason (what the summary counts)
  ingest_runs   when ingestion ran and what it found

Nothing here leaves the site.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, delete, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SCHEMA_VERSION = 1


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SourceFile(Base):
    __tablename__ = "source_files"
    path: Mapped[str] = mapped_column(String, primary_key=True)  # relative to the site folder
    kind: Mapped[str] = mapped_column(String)  # dicom | table | report
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String)  # ok | rejected
    series_uid: Mapped[str | None] = mapped_column(String, index=True)
    header: Mapped[dict | None] = mapped_column(JSON)


class Series(Base):
    __tablename__ = "series"
    series_uid: Mapped[str] = mapped_column(String, primary_key=True)
    exam_id: Mapped[str] = mapped_column(String, index=True)  # AccessionNumber
    patient_id: Mapped[str] = mapped_column(String, index=True)
    study_date: Mapped[str] = mapped_column(String)
    description: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String)  # accepted | rejected
    category: Mapped[str | None] = mapped_column(String)
    reason: Mapped[str | None] = mapped_column(Text)
    members_hash: Mapped[str] = mapped_column(String)  # which files (and versions) this result came from
    pipeline: Mapped[int] = mapped_column(Integer, default=1)  # version of the checks and crops that made it
    files: Mapped[int] = mapped_column(Integer)
    shape: Mapped[list | None] = mapped_column(JSON)  # (S, H, W) canonical
    spacing: Mapped[list | None] = mapped_column(JSON)  # (s, h, w) mm
    origin: Mapped[list | None] = mapped_column(JSON)  # patient (x, y, z) mm of canonical voxel (0, 0, 0)
    boxes: Mapped[dict | None] = mapped_column(JSON)  # region -> [s0, s1, h0, h1, w0, w1]
    scanner: Mapped[dict | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=now)


class Crop(Base):
    __tablename__ = "crops"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(ForeignKey("series.series_uid"), index=True)
    region: Mapped[str] = mapped_column(String)  # lung_right | lung_left | heart | lungs | slab_right | slab_left
    scale: Mapped[str] = mapped_column(String)
    shape: Mapped[list] = mapped_column(JSON)
    voxel_size: Mapped[list] = mapped_column(JSON)  # (s, h, w) mm of the crop's voxels
    first_slice: Mapped[int] = mapped_column(Integer)  # canonical slice index of the crop's slice 0 (slabs)
    path: Mapped[str] = mapped_column(String)  # relative to the work folder


class Exam(Base):
    __tablename__ = "exams"
    exam_id: Mapped[str] = mapped_column(String, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String, index=True)
    study_date: Mapped[str | None] = mapped_column(String)
    clinical: Mapped[dict] = mapped_column(JSON)
    sentences: Mapped[list] = mapped_column(JSON)
    report: Mapped[str | None] = mapped_column(Text)


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exam_id: Mapped[str] = mapped_column(String, index=True)
    task: Mapped[str] = mapped_column(String, index=True)
    answer: Mapped[str | None] = mapped_column(String)
    years_to_event: Mapped[float | None] = mapped_column(Float)
    censored: Mapped[int | None] = mapped_column(Integer)
    side: Mapped[str | None] = mapped_column(String)
    slice_location: Mapped[float | None] = mapped_column(Float)


class Split(Base):
    __tablename__ = "splits"
    patient_id: Mapped[str] = mapped_column(String, primary_key=True)
    split: Mapped[str] = mapped_column(String)  # train | val | test


class Rejection(Base):
    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String, index=True)  # what re-processing clears: file:P, series:UID, table:F
    kind: Mapped[str] = mapped_column(String)  # file | series | table
    category: Mapped[str] = mapped_column(String)
    path: Mapped[str | None] = mapped_column(String)  # the file to blame
    series_uid: Mapped[str | None] = mapped_column(String)
    row: Mapped[int | None] = mapped_column(Integer)
    column: Mapped[str | None] = mapped_column(String)
    reason: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(default=now)


class IngestRun(Base):
    __tablename__ = "ingest_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    summary: Mapped[dict | None] = mapped_column(JSON)


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


def open_versioned(url: str, base, meta, version: int, what: str):
    """An engine with `base`'s tables created (and a SQLite file's folder); refuses a newer schema version."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    base.metadata.create_all(engine)
    with Session(engine) as s:
        row = s.get(meta, "schema_version")
        if row is None:
            s.add(meta(key="schema_version", value=str(version)))
            s.commit()
        elif int(row.value) > version:
            raise RuntimeError(f"{url}: {what} database schema {row.value} is newer than this m3fm-fed ({version})")
        elif int(row.value) < version:  # migrations so far only add tables, which create_all just did
            row.value = str(version)
            s.commit()
    return engine


def open_store(url: str):
    """An engine on the site database, tables created; refuses a database written by a newer schema."""
    return open_versioned(url, Base, Meta, SCHEMA_VERSION, "site")


def clear_scope(s: Session, scope: str) -> None:
    s.execute(delete(Rejection).where(Rejection.scope == scope))


def reject(s: Session, scope: str, kind: str, category: str, reason: str, path: str | None = None,
           series_uid: str | None = None, row: int | None = None, column: str | None = None) -> None:
    s.add(Rejection(scope=scope, kind=kind, category=category, reason=reason, path=path, series_uid=series_uid,
                    row=row, column=column))
