"""`m3fm-server run` as a function: start a SuperLink, submit the run, follow it, report how it ended.

Progress comes from the server database (a row per finished round); the
outcome from Flower (`flwr ls`), because `flwr run` exits 0 even when the run
failed. The SuperLink is this process's child: it is stopped when the run
ends, on Ctrl-C and on SIGTERM, and dies with it (server/lifecycle.py). Every
way a run ends is written to the database: completed or failed (by the
ServerApp), stopped (`flwr stop`, Ctrl-C, SIGTERM: here), killed (found by
`settle_dead_coordinators` when the coordinator process is gone).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import ServerConfig
from server.lifecycle import CoordinatorLock, OperatorNotes
from server.store import (Coordinator, EnrolledSite, Round, Run, SiteReport, interrupt_attempts, now,
                          open_server_store)
from transport.flower import (flower_env, register_supernode, run_status, start_superlink, stop, stream_run_log,
                              submit_run, wait_for_port, write_app_dir, write_connection)
from transport.processes import is_alive, proc_identity, record_tree, stop_leftovers
from transport.protocol import LOSS

CONNECTION = "m3fm"


@dataclass
class Security:
    """TLS (a folder made by `m3fm-server certs`: ca.crt, server.pem, server.key) and node authentication
    (only sites enrolled with `m3fm-server enroll` may connect). Neither: plaintext, on request only."""
    tls_dir: Path | None = None
    node_auth: bool = False

    def superlink_args(self) -> tuple[str, ...]:
        args: tuple[str, ...] = ("--insecure",)
        if self.tls_dir is not None:
            d = self.tls_dir
            args = ("--ssl-ca-certfile", str(d / "ca.crt"), "--ssl-certfile", str(d / "server.pem"),
                    "--ssl-keyfile", str(d / "server.key"))
        return args + (("--enable-supernode-auth",) if self.node_auth else ())

    def __post_init__(self) -> None:  # checked once, where it is made
        if self.tls_dir is not None:
            missing = [f for f in ("ca.crt", "server.pem", "server.key") if not (self.tls_dir / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{self.tls_dir} lacks {', '.join(missing)} (make them with "
                                        "`m3fm-server certs --out DIR --host NAME`)")


@dataclass
class Outcome:
    flwr_run_id: int
    status: str  # Flower's, e.g. finished:completed
    run_id: int | None  # ours (server database)
    rounds: list[int]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def find_run(engine, flwr_run_id: int) -> Run | None:
    with Session(engine) as s:
        for run in s.scalars(select(Run).order_by(Run.id.desc()).limit(20)):
            if str(flwr_run_id) in (run.flwr_run_ids or []):
                s.expunge(run)
                return run
    return None


def register_enrolled(engine, home: Path, env: dict, log) -> int:
    """Admit every enrolled site's key on the SuperLink just started; -> how many."""
    with Session(engine) as s:
        sites = [(e.name, e.public_key) for e in s.scalars(select(EnrolledSite).order_by(EnrolledSite.name))]
    if not sites:
        raise RuntimeError("node authentication is on but no site is enrolled; run `m3fm-server enroll SITE.pub "
                           "--name SITE` for each site first")
    for name, key in sites:
        path = home / f"{name}.pub"
        path.write_text(key + "\n")
        register_supernode(path, name, CONNECTION, env)
    log(f"node authentication: {len(sites)} enrolled site key(s) registered ({', '.join(n for n, _ in sites)})")
    return len(sites)


def coordinate(cfg: ServerConfig, resume: bool, host: str, port: int, log=print, simulation: dict | None = None,
               run_config: dict | None = None, poll_s: float = 2.0, status_every_s: float = 10.0,
               max_hours: float = 72.0, security: Security | None = None) -> Outcome:
    """Run the whole federated run; `simulation` (Flower's federation config: num-supernodes,
    client-resources-num-cpus, client-resources-num-gpus) runs it on Flower's simulation engine (Ray).
    Raises CoordinatorBusy when another coordinator holds out_dir, Stopped on SIGTERM/SIGINT."""
    security = security or Security()
    base = cfg.out_dir / "superlink"
    lock = CoordinatorLock(base / "coordinator.lock")
    lock.acquire()
    if stopped := stop_leftovers(base / "processes.json"):
        log(f"stopped what was left of the previous coordinator: {', '.join(stopped)}")
    engine = open_server_store(cfg.database_url)
    settle_dead_coordinators(engine, log)
    me = _record_coordinator(engine, cfg.name)
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    link, app_log, outcome, flwr_id, status = None, None, "failed", None, "pending"
    try:
        home = base / "flwr-home"
        env = flower_env(home)
        tls = security.tls_dir
        write_connection(home, CONNECTION, f"{host}:{port}", insecure=tls is None,
                         root_certificates=None if tls is None else (tls / "ca.crt").resolve())
        app_dir = write_app_dir(base / "app")
        # the SuperLink's state in memory: in its SQLite file every message's objects went into the database, and a
        # secure round's masked vectors (256 MiB each) held its lock past the ServerApp's heartbeat, which failed
        # the run (benchmarks/secagg.py --superlink-db file). Nothing of ours needs that state after a restart:
        # a resumed run is a new Flower run from our checkpoint (server.db), sites reconnect and are registered again
        link = start_superlink(base, host, port, base / "superlink.log", simulation=simulation is not None, env=env,
                               extra_args=security.superlink_args(), database=False)
        wait_for_port(host, port, link)
        enrolled = register_enrolled(engine, home, env, log) if security.node_auth else 0
        log(f"SuperLink on {host}:{port} (pid {link.pid}, log {base / 'superlink.log'}); sites join with "
            f"`m3fm-client start --site SITE_DIR --superlink {host}:{port}`")
        rc = {"config": str(cfg.path), "resume": resume, "database": cfg.database_url,
              "coordinator": proc_identity(os.getpid()), "enrolled-sites": enrolled, **(run_config or {})}
        flwr_id = submit_run(app_dir, CONNECTION, rc, env, federation_config=simulation)
        started = time.monotonic()
        _update(engine, Coordinator, me, flwr_run_id=str(flwr_id))
        app_log_path = base / "serverapp.log"
        app_log, notes = stream_run_log(CONNECTION, flwr_id, app_log_path, env), OperatorNotes(app_log_path)
        log(f"submitted Flower run {flwr_id} (its ServerApp's output: {app_log_path})")
        shown: set[int] = set()
        reported: list[str] = []
        last_status_check, run, asked_after_stream = 0.0, None, False
        deadline = time.monotonic() + max_hours * 3600
        while time.monotonic() < deadline:
            record_tree(base / "processes.json", os.getpid())
            run = run or find_run(engine, flwr_id)  # the ServerApp creates its row a few seconds in
            _show_rounds(engine, run, flwr_id, cfg.total_rounds, shown, log, started)
            _show_notes(notes, log)
            if cfg.site_reports:
                _show_reports(engine, run, reported, log)
            if link.poll() is not None:
                raise RuntimeError(f"the SuperLink exited with code {link.returncode}; see {base / 'superlink.log'}")
            # the log stream ends within 0.5 s of Flower marking the run finished: ask at once, not at the next
            # status_every_s (each ask is a `flwr ls`, so a stream that broke for another reason is asked about once)
            stream_ended = app_log.poll() is not None and not asked_after_stream
            if stream_ended or time.monotonic() - last_status_check > status_every_s:
                asked_after_stream = asked_after_stream or stream_ended
                status, last_status_check = run_status(CONNECTION, flwr_id, env), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(poll_s)
        else:
            status = f"gave up after {max_hours} h"
        run = run or find_run(engine, flwr_id)
        _show_rounds(engine, run, flwr_id, cfg.total_rounds, shown, log, started)  # those recorded after the last look
        _show_notes(notes, log)
        if cfg.site_reports:
            _show_reports(engine, run, reported, log)
        if status == "finished:stopped":
            run = end_run(engine, flwr_id, "stopped", "stopped by `flwr stop` (the SuperLink's Control API)")
        elif status != "finished:completed":
            run = end_run(engine, flwr_id, "failed",
                          f"Flower reports the run as {status}; see {base / 'superlink.log'}")
        else:
            run = find_run(engine, flwr_id)  # as the ServerApp left it
        outcome = run.status if run is not None else "failed"
        error = run.error if run is not None and run.status != "completed" else None
        if error is None and status != "finished:completed":
            error = f"Flower reports the run as {status}; see {base / 'superlink.log'}"
        if run is not None and (report := cfg.run_dir(run.id) / "report.html").is_file():
            log(f"run report: {report} (m3fm-server report {run.id} --config {cfg.path} writes it again)")
        return Outcome(flwr_id, status, run.id if run else None, sorted(shown), error)
    except Stopped as e:
        outcome = "stopped"
        if flwr_id is not None:
            end_run(engine, flwr_id, "stopped", f"the coordinator was stopped by {e}; continue with --resume")
        raise
    except Exception as e:  # the SuperLink died, flwr failed: the run ends with the coordinator
        if flwr_id is not None:
            end_run(engine, flwr_id, "failed", f"the coordinator failed: {type(e).__name__}: {e}")
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if app_log is not None:  # its stream ends once Flower has the run finished: a few seconds for the last lines
            try:
                app_log.wait(10 if status.startswith("finished") else 0)
            except subprocess.TimeoutExpired:
                stop(app_log)
        if link is not None:
            stop(link)
        _update(engine, Coordinator, me, outcome=outcome, ended_at=now())
        engine.dispose()
        (base / "processes.json").unlink(missing_ok=True)
        lock.release()


def _show_rounds(engine, run: Run | None, flwr_id: int, total: int, shown: set[int], log,
                 started: float | None = None) -> None:
    """Log each round of this submission not shown yet, with the time since `started` (time.monotonic()) and an
    estimate of the time left: the mean round of this submission so far times the rounds still to come."""
    if run is None:
        return
    with Session(engine) as s:
        rounds = s.scalars(select(Round).where(Round.run_id == run.id, Round.flwr_run_id == str(flwr_id))
                           .order_by(Round.round)).all()
        for i, r in enumerate(rounds):
            if r.round not in shown:
                shown.add(r.round)
                mean = sum(x.seconds for x in rounds[:i + 1]) / (i + 1)
                elapsed = None if started is None else time.monotonic() - started
                log(_round_line(r, total, elapsed, mean * (total - r.round)))


def _show_notes(notes: OperatorNotes, log) -> None:
    """What the ServerApp said to the operator since the last look: sites missing, replies lost."""
    for note in notes.new():
        log(f"ServerApp: {note}")


def _show_reports(engine, run: Run | None, reported: list[str], log) -> None:
    """After the last round every site evaluates the final model on its test split and writes its report, which
    takes a while at a hospital's size: say so once, then log each site's report as it lands (server/rounds.py
    records them one by one). `reported` holds what was shown: "" for the first line, then site ids."""
    if run is None:
        return
    with Session(engine) as s:
        if s.get(Run, run.id).status != "completed":
            return
        sites = s.scalars(select(SiteReport.site_id).where(SiteReport.run_id == run.id)
                          .order_by(SiteReport.id)).all()
    if not reported:
        reported.append("")
        log("rounds done: each site is evaluating the final model on its test split and writing its report")
    for site in sites:
        if site not in reported:
            reported.append(site)
            log(f"site report {len(reported) - 1} in: {site}")


def end_run(engine, flwr_id: int, status: str, error: str) -> Run | None:
    """Record how a run ended where its ServerApp could not: a stop outranks the failure the stop caused in the
    ServerApp; a completed run stays completed. -> the run as it now stands (None: the ServerApp never made it)."""
    run = find_run(engine, flwr_id)
    if run is None:
        return None
    with Session(engine, expire_on_commit=False) as s:  # the row is read after the session closes
        row = s.get(Run, run.id)
        if row.status == "running" or (status == "stopped" and row.status == "failed"):
            row.status, row.error, row.updated_at = status, error, now()
            interrupt_attempts(s, row.id, f"the run ended ({status}) before the round was recorded")
            s.commit()
        s.expunge(row)
        return row


def _record_coordinator(engine, name: str) -> int:
    with Session(engine) as s:
        row = Coordinator(run_name=name, pid=os.getpid(), process=proc_identity(os.getpid()),
                          host=socket.gethostname())
        s.add(row)
        s.commit()
        return row.id


def _update(engine, table, row_id: int, **values) -> None:
    with Session(engine) as s:
        row = s.get(table, row_id)
        for k, v in values.items():
            setattr(row, k, v)
        s.commit()


def settle_dead_coordinators(engine, log=None) -> list[int]:
    """Coordinators on this host that ended without saying how (SIGKILL, power loss): their process is gone. Mark
    them and the runs they left 'running' as killed; -> the ids of those runs."""
    killed = []
    with Session(engine) as s:
        for c in s.scalars(select(Coordinator).where(Coordinator.outcome.is_(None),
                                                     Coordinator.host == socket.gethostname())):
            if is_alive(c.process):
                continue
            c.outcome, c.ended_at = "killed", now()
            run = next((r for r in s.scalars(select(Run).where(Run.name == c.run_name, Run.status == "running"))
                        if c.flwr_run_id in (r.flwr_run_ids or [])), None)
            if run is not None:
                run.status, run.updated_at = "killed", now()
                run.error = (f"its coordinator (pid {c.pid} on {c.host}) ended without recording why (killed or "
                             "crashed); continue with `m3fm-server run --resume`")
                killed.append(run.id)
                if log:
                    log(f"run {run.id} ({run.name!r}) was left running by a coordinator that died; marked killed")
        s.commit()
    return killed


def _round_line(r: Round, total: int, elapsed_s: float | None = None, left_s: float | None = None) -> str:
    losses = {k[len(LOSS):]: v for k, v in (r.train_metrics or {}).items() if k.startswith(LOSS)}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in list(losses.items())[:4]) + (" ..." if len(losses) > 4 else "")
    clock = "" if elapsed_s is None else f" ({_duration(elapsed_s)} elapsed, about {_duration(left_s or 0)} left)"
    return (f"round {r.round}/{total} {r.phase} {r.phase_round}: {r.sites_accepted}/{r.sites_replied} sites, "
            f"{r.seconds:.0f}s{clock}; {shown}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

