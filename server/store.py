"""The coordinator's database (SQLAlchemy; a SQLite file in the run folder by default, any URL allowed).

  runs              one row per named run: config and its hash, status, the Flower run ids it took
  rounds            every completed round: phase, sites replied/accepted, aggregated metrics, seconds
  site_metrics      per site and round: the metrics it sent with its training reply or its evaluation
  rejected_replies  every reply that did not count, and why (skips are rows with kind "skip")
  checkpoints       the checkpoint written after each round, with its SHA-256

A round's rows and its checkpoint row are written in one transaction after the
checkpoint file is in place, so the database never names a round whose
weights are missing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from m3fm.data.store import now, open_versioned

SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, index=True)
    config_hash: Mapped[str] = mapped_column(String)
    config: Mapped[dict] = mapped_column(JSON)
    total_rounds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String)  # running | completed | failed
    error: Mapped[str | None] = mapped_column(Text)
    flwr_run_ids: Mapped[list] = mapped_column(JSON, default=list)  # one per submission (a resume adds one), as text
    created_at: Mapped[datetime] = mapped_column(default=now)
    updated_at: Mapped[datetime] = mapped_column(default=now)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String)
    phase_round: Mapped[int] = mapped_column(Integer)
    flwr_run_id: Mapped[str | None] = mapped_column(String)  # Flower's ids are unsigned 64-bit: text here
    sites_replied: Mapped[int] = mapped_column(Integer)
    sites_accepted: Mapped[int] = mapped_column(Integer)
    train_metrics: Mapped[dict] = mapped_column(JSON)
    evaluate_metrics: Mapped[dict | None] = mapped_column(JSON)
    seconds: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[datetime] = mapped_column(default=now)


class SiteMetric(Base):
    __tablename__ = "site_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[str] = mapped_column(String)
    node_id: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)  # train | evaluate
    metrics: Mapped[dict] = mapped_column(JSON)


class RejectedReply(Base):
    __tablename__ = "rejected_replies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[str] = mapped_column(String)
    node_id: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)  # rejected | skip | evaluate
    reason: Mapped[str] = mapped_column(Text)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "round"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String)
    sha256: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(default=now)


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


def open_server_store(url: str):
    """An engine on the server database, tables created; refuses a database written by a newer schema."""
    return open_versioned(url, Base, Meta, SCHEMA_VERSION, "server")


def latest_run(s: Session, name: str | None = None) -> Run | None:
    q = select(Run).order_by(Run.id.desc())
    if name is not None:
        q = q.where(Run.name == name)
    return s.scalars(q).first()


def last_checkpoint(s: Session, run_id: int) -> Checkpoint | None:
    return s.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.round.desc())).first()
