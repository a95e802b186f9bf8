"""The coordinator's database (SQLAlchemy; a SQLite file in the run folder by default, any URL allowed).

  runs              one row per named run: config and its hash, status, the Flower run ids it took
  rounds            every completed round: phase, sites replied/accepted, aggregated metrics, seconds
  site_metrics      per site and round: the metrics it sent with its training reply or its evaluation
  rejected_replies  every reply that did not count, and why (skips are rows with kind "skip")
  checkpoints       the checkpoint written after each round, with its SHA-256
  enrolled_sites    sites whose public key `m3fm-server enroll` registered (node authentication)
  privacy_ledger    epsilon per site per round (DP-SGD, the site's running total) and per round of
                    the whole model (central DP); schema 2 added it and enrolled_sites (create_all adds the tables to a
                    schema-1 database, nothing else changes)
  site_reports      each site's evaluation report after the run (aggregates only, small groups suppressed;
                    schema 3)
  round_attempts    every time a round's training messages went out: to how many sites, how many replies were
                    lost (and whose), and how the attempt ended (ok | retried | interrupted | failed); a round
                    retried after lost replies or a coordinator crash has several (schema 4)
  coordinators      every `m3fm-server run` process: pid and start time, host, and how it ended (completed | failed |
                    stopped | killed); how `m3fm-server status` tells a killed run from a running one (schema 4)

A round's rows and its checkpoint row are written in one transaction after the
checkpoint file is in place, so the database never names a round whose
weights are missing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from m3fm.data.store import now, open_versioned

SCHEMA_VERSION = 5  # 5: round_timings


# how a run stands: the ServerApp writes running/completed/failed; the coordinator process writes stopped (`flwr stop`,
# Ctrl-C, SIGTERM); `m3fm-server status` or the next coordinator writes killed (its coordinator vanished unannounced)
RUN_STATES = ("running", "completed", "failed", "stopped", "killed")


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, index=True)
    config_hash: Mapped[str] = mapped_column(String)
    config: Mapped[dict] = mapped_column(JSON)
    total_rounds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String)  # RUN_STATES
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


class PrivacyLedger(Base):
    __tablename__ = "privacy_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    site_id: Mapped[str] = mapped_column(String)  # "*" for central DP (the released aggregate)
    mechanism: Mapped[str] = mapped_column(String)  # "dp-sgd per patient" | "central-dp per site"
    epsilon: Mapped[float] = mapped_column(Float)  # total after this round
    epsilon_round: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=now)


class SiteReport(Base):
    __tablename__ = "site_reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)  # the round whose weights were evaluated
    site_id: Mapped[str] = mapped_column(String)
    node_id: Mapped[str] = mapped_column(String)
    report: Mapped[dict] = mapped_column(JSON)  # client/report.shareable
    created_at: Mapped[datetime] = mapped_column(default=now)


class RoundAttempt(Base):
    __tablename__ = "round_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)  # 1, 2, ... over every submission of the run
    flwr_run_id: Mapped[str | None] = mapped_column(String)
    sent: Mapped[int] = mapped_column(Integer)  # sites the training message went to
    lost: Mapped[int] = mapped_column(Integer, default=0)  # replies lost in transport (server/delivery.py)
    outcome: Mapped[str] = mapped_column(String)  # running | ok | retried | interrupted | failed
    detail: Mapped[str | None] = mapped_column(Text)  # whose replies were lost and why, or what interrupted it
    started_at: Mapped[datetime] = mapped_column(default=now)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)


class RoundTiming(Base):
    """Where a recorded round's wall time went, as the coordinator saw it (server/rounds.py RoundClock): seconds
    from the round's start to each mark (sites connected, messages sent, first and last reply, aggregated,
    evaluated, checkpointed)."""
    __tablename__ = "round_timings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    marks: Mapped[dict] = mapped_column(JSON)


class Coordinator(Base):
    __tablename__ = "coordinators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_name: Mapped[str] = mapped_column(String, index=True)
    flwr_run_id: Mapped[str | None] = mapped_column(String)
    pid: Mapped[int] = mapped_column(Integer)
    process: Mapped[str] = mapped_column(String)  # "pid:start time" (transport/processes.py): names it for life
    host: Mapped[str] = mapped_column(String)
    outcome: Mapped[str | None] = mapped_column(String)  # None while it runs
    started_at: Mapped[datetime] = mapped_column(default=now)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)


class EnrolledSite(Base):
    __tablename__ = "enrolled_sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    public_key: Mapped[str] = mapped_column(Text)  # OpenSSH text
    fingerprint: Mapped[str] = mapped_column(String, unique=True)  # SHA-256 of the key text
    enrolled_at: Mapped[datetime] = mapped_column(default=now)


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


def interrupt_attempts(s: Session, run_id: int, detail: str) -> None:
    """Mark the run's attempts still 'running' as interrupted: the coordinator ended (or was stopped) mid-round."""
    s.execute(update(RoundAttempt).where(RoundAttempt.run_id == run_id, RoundAttempt.outcome == "running")
              .values(outcome="interrupted", ended_at=now(), detail=detail))
