"""`m3fm-server run` as a function: start a SuperLink, submit the run, follow it, report how it ended.

Progress comes from the server database (a row per finished round); the
outcome from Flower (`flwr ls`), because `flwr run` exits 0 even when the run
failed. The SuperLink is this process's child: it is stopped when the run
ends, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import ServerConfig
from server.flower import (flower_env, register_supernode, run_status, start_superlink, stop, submit_run,
                           wait_for_port, write_app_dir, write_connection)
from server.store import EnrolledSite, Round, Run, open_server_store

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
    client-resources-num-cpus, client-resources-num-gpus) runs it on Flower's simulation engine (Ray)."""
    security = security or Security()
    base = cfg.out_dir / "superlink"
    home = base / "flwr-home"
    env = flower_env(home)
    tls = security.tls_dir
    write_connection(home, CONNECTION, f"{host}:{port}", insecure=tls is None,
                     root_certificates=None if tls is None else (tls / "ca.crt").resolve())
    app_dir = write_app_dir(base / "app")
    engine = open_server_store(cfg.database_url)
    old = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    link = start_superlink(base, host, port, base / "superlink.log", simulation=simulation is not None, env=env,
                           extra_args=security.superlink_args())
    try:
        wait_for_port(host, port, link)
        if security.node_auth:
            register_enrolled(engine, home, env, log)
        log(f"SuperLink on {host}:{port} (pid {link.pid}, log {base / 'superlink.log'}); sites join with "
            f"`m3fm-client start --site SITE_DIR --superlink {host}:{port}`")
        rc = {"config": str(cfg.path), "resume": resume, "database": cfg.database_url, **(run_config or {})}
        flwr_id = submit_run(app_dir, CONNECTION, rc, env, federation_config=simulation)
        log(f"submitted Flower run {flwr_id}")
        shown: set[int] = set()
        status, last_status_check, run = "pending", 0.0, None
        deadline = time.monotonic() + max_hours * 3600
        while time.monotonic() < deadline:
            run = run or find_run(engine, flwr_id)
            if run is not None:
                with Session(engine) as s:
                    for r in s.scalars(select(Round).where(Round.run_id == run.id, Round.flwr_run_id == str(flwr_id))
                                       .order_by(Round.round)):
                        if r.round not in shown:
                            shown.add(r.round)
                            log(_round_line(r, cfg.total_rounds))
            if link.poll() is not None:
                raise RuntimeError(f"the SuperLink exited with code {link.returncode}; see {base / 'superlink.log'}")
            if time.monotonic() - last_status_check > status_every_s:
                status, last_status_check = run_status(CONNECTION, flwr_id, env), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(poll_s)
        else:
            status = f"gave up after {max_hours} h"
        run = find_run(engine, flwr_id)
        error = run.error if run is not None and run.status != "completed" else None
        if error is None and status != "finished:completed":
            error = f"Flower reports the run as {status}; see {base / 'superlink.log'}"
        if run is not None and (report := cfg.run_dir(run.id) / "report.html").is_file():
            log(f"run report: {report} (m3fm-server report {run.id} --config {cfg.path} writes it again)")
        return Outcome(flwr_id, status, run.id if run else None, sorted(shown), error)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        stop(link)
        engine.dispose()


def _round_line(r: Round, total: int) -> str:
    losses = {k[5:]: v for k, v in (r.train_metrics or {}).items() if k.startswith("loss.")}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in list(losses.items())[:4]) + (" ..." if len(losses) > 4 else "")
    return (f"round {r.round}/{total} {r.phase} {r.phase_round}: {r.sites_accepted}/{r.sites_replied} sites, "
            f"{r.seconds:.0f}s; {shown}")


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

