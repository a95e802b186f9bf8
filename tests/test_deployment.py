"""Through the real processes: `m3fm-server run` (SuperLink + ServerApp), `m3fm-client start` (SuperNodes),
all on 127.0.0.1, and `m3fm-sim run --engine ray` inside a loopback-only network namespace."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from opacus.accountants import RDPAccountant
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.coordinator import free_port
from transport.flower import flower_bin, flower_env, stop
from privacy.accounting import PrivacyLedger as SiteLedger
from server.store import (PrivacyLedger, RejectedReply, Round, RoundAttempt, Run, SiteMetric, SiteReport,
                          open_server_store)

TOML = """
[run]
name = "{name}"
model = "tiny"
min_sites = 2
round_timeout = {timeout}
out_dir = "runs"
site_reports = false
[pretrain]
rounds = 1
local_steps = 1
[multitask]
rounds = {multitask}
local_steps = 1
tasks_per_step = 2  # a test of processes: two tasks' micro-batches a step, not every task's
"""


def start(args, log):
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=flower_env(),
                            start_new_session=True)


def wait_rounds(db_url, n, proc, limit_s=400):
    engine = open_server_store(db_url)
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            with Session(engine) as s:
                if len(s.scalars(select(Round)).all()) >= n:
                    return
            assert proc.poll() is None, f"m3fm-server exited with {proc.returncode} before round {n}"
            time.sleep(1)
        raise AssertionError(f"round {n} not finished within {limit_s}s")
    finally:
        engine.dispose()


def rounds_and_metrics(db_url):
    engine = open_server_store(db_url)
    with Session(engine) as s:
        run = s.scalars(select(Run)).one()
        rounds = [(r.round, r.phase, r.sites_accepted, r.flwr_run_id) for r in
                  s.scalars(select(Round).order_by(Round.round))]
        metrics = [(m.round, m.site_id, m.kind) for m in s.scalars(select(SiteMetric))]
        rejected = [(r.round, r.site_id, r.kind, r.reason) for r in s.scalars(select(RejectedReply))]
        status = run.status
    engine.dispose()
    return status, rounds, metrics, rejected


def federation(tmp, procs, sites, toml_text, log="server.log"):
    """`m3fm-server run` on server.toml plus `m3fm-client start` per site, all on 127.0.0.1 -> (server, clients,
    database URL, port)."""
    toml = tmp / "server.toml"
    toml.write_text(toml_text)
    port = free_port()
    server = start([flower_bin("m3fm-server"), "run", "--config", str(toml), "--port", str(port), "--insecure"],
                   tmp / log)
    clients = [start([flower_bin("m3fm-client"), "start", "--site", str(site.site_dir), "--superlink",
                      f"127.0.0.1:{port}", "--port", str(free_port()), "--insecure"], tmp / f"{site.site_id}.log")
               for site in sites]
    procs.extend([server, *clients])
    return server, clients, f"sqlite:///{tmp / 'runs' / 'server.db'}", port


def round_in_flight(db_url, rnd):
    """The round's training messages went out and no attempt of it ended yet: the sites are training. (The
    coordinator pulls each reply within 0.1 s of its arrival, so the window between a reply's arrival and its
    pull is too short to aim at; a crash anywhere before the round is recorded loses the same round.)"""
    try:
        with Session(open_server_store(db_url)) as s:
            return s.scalars(select(RoundAttempt).where(RoundAttempt.round == rnd,
                                                        RoundAttempt.outcome == "running")).first() is not None
    except Exception:  # noqa: BLE001 - the coordinator may be creating the tables
        return False


def status_of(db_url):
    out = subprocess.run([flower_bin("m3fm-server"), "status", "--database", db_url], capture_output=True, text=True,
                         env=flower_env(), timeout=120)
    return " ".join((out.stdout + out.stderr).split())


def test_loopback_run_survives_a_coordinator_crash_and_resumes(ingested, cluster):
    """Under DP-SGD too. The coordinator dies while the sites train round 2 (its messages are at the SuperLink);
    while it is down the second hospital restarts `m3fm-client start` (the first one's
    SuperNode reconnects by itself). The status shows the run killed; the resume retries round 2, the run
    completes with every round once, and the interrupted attempt is recorded. Each site's epsilon continues round
    1's, so the accountant outlived the client processes (round 2 trained twice is spent budget twice)."""
    procs, tmp = cluster
    _, sites, _ = ingested
    for site in sites[:2]:
        shutil.rmtree(site.work_dir / "privacy", ignore_errors=True)
    server, clients, db, port = federation(tmp, procs, sites[:2], TOML.format(name="crash", timeout=300, multitask=1) +
                                           "[privacy.dp_sgd]\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\n"
                                           "delta = 1e-5\n", log="server1.log")
    toml = tmp / "server.toml"
    wait_rounds(db, 1, server)
    deadline = time.monotonic() + 300
    while not round_in_flight(db, 2):  # the sites train round 2
        assert time.monotonic() < deadline and server.poll() is None, "round 2's messages never reached the SuperLink"
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGKILL)  # the coordinator machine dies: SuperLink and ServerApp with it
    server.wait(10)
    assert "killed" in status_of(db)  # not "running": its coordinator is gone
    assert stop(clients[1], timeout=30) == 0  # the second hospital restarts its client meanwhile
    procs.append(start([flower_bin("m3fm-client"), "start", "--site", str(sites[1].site_dir), "--superlink",
                        f"127.0.0.1:{port}", "--port", str(free_port()), "--insecure"], tmp / "restarted.log"))
    status, rounds, _, _ = rounds_and_metrics(db)
    assert status == "killed" and [r[0] for r in rounds] == [1]
    resumed = start([flower_bin("m3fm-server"), "run", "--config", str(toml), "--port", str(port), "--resume",
                     "--insecure"],
                    tmp / "server2.log")
    procs.append(resumed)
    assert resumed.wait(600) == 0, (tmp / "server2.log").read_text()[-3000:]
    status, rounds, metrics, rejected = rounds_and_metrics(db)
    assert status == "completed"
    assert [(r, phase, n) for r, phase, n, _ in rounds] == [(1, "pretrain", 2), (2, "multitask", 2)]
    assert rounds[0][3] != rounds[1][3]  # round 2 came from the resumed submission
    assert {(r, s, k) for r, s, k in metrics} == {(r, s.site_id, k) for r in (1, 2) for s in sites[:2]
                                                  for k in ("train", "evaluate")}
    # the restarted client's old SuperNode is still listed until its heartbeat lapses: its reply is the only one
    # that may not count, and it names the site it belonged to, not the SuperLink's node
    assert [(r, kind) for r, _, kind, reason in rejected if "Node Unavailable" not in reason] == []
    assert {site for _, site, _, _ in rejected} <= {sites[1].site_id}
    assert re.search(r"round 2/2 multitask 1: 2/[23] sites", " ".join((tmp / "server2.log").read_text().split()))
    engine = open_server_store(db)
    with Session(engine) as s:
        attempts = [(a.round, a.outcome) for a in s.scalars(select(RoundAttempt).order_by(RoundAttempt.id))]
    engine.dispose()
    # round 2 went out before the crash (interrupted), then again after the resume, perhaps retried when a reply
    # was lost to the restart, and counted once
    assert attempts[:2] == [(1, "ok"), (2, "interrupted")] and attempts[-1] == (2, "ok")
    assert {o for r, o in attempts[2:-1]} <= {"retried"} and all(r == 2 for r, _ in attempts[1:])
    assert "completed" in status_of(db)
    engine = open_server_store(db)
    with Session(engine) as s:
        ledger = {(r.site_id, r.round): r for r in s.scalars(select(PrivacyLedger))}
    engine.dispose()
    assert set(ledger) == {(s.site_id, r) for s in sites[:2] for r in (1, 2)}
    for site in sites[:2]:
        first, second = ledger[site.site_id, 1], ledger[site.site_id, 2]
        disk = SiteLedger(site.work_dir)  # a round-2 message a site trained on before the crash also counts
        assert [r["round"] for r in disk.rounds][0] == 1 and disk.rounds[-1]["round"] == 2
        accountant = RDPAccountant()
        accountant.history = [tuple(h) for h in disk.history]
        assert second.epsilon == pytest.approx(accountant.get_epsilon(1e-5)) and second.epsilon > first.epsilon
        assert second.mechanism == "dp-sgd per patient" and second.epsilon <= 8.0  # the unit is the patient
        assert {r["unit"] for r in disk.rounds} == {"patient"}
        both = RDPAccountant()
        both.history = [(1.1, first.sample_rate, 1), (1.1, second.sample_rate, 1)]
        assert second.epsilon >= both.get_epsilon(1e-5) * (1 - 1e-9)  # continued from round 1, never restarted
        shutil.rmtree(site.work_dir / "privacy")


def test_a_site_killed_mid_run_leaves_the_others_to_finish_the_secure_round(ingested, cluster):
    """Under SecAgg+ in chunks, so the masked vectors cross Flower's real transport (object store, inflation):
    the in-process grids never deflate a message, and a reply shape that only breaks there did once."""
    procs, tmp = cluster
    _, sites, _ = ingested
    secure = "[privacy.secagg]\nclipping_range = 0.5\nchunk_values = 200000\n"  # tiny's update in 2 chunks
    # expected_sites: round 1 waits for the third site's SuperNode, which may connect seconds after the first two
    toml = TOML.format(name="killed-site", timeout=120, multitask=1).replace("min_sites = 2",
                                                                              "min_sites = 2\nexpected_sites = 3")
    server, clients, db, _ = federation(tmp, procs, sites, toml + secure)
    wait_rounds(db, 1, server)
    os.killpg(clients[2].pid, signal.SIGKILL)  # the third hospital's machine dies between rounds
    assert server.wait(600) == 0, (tmp / "server.log").read_text()[-3000:]
    status, rounds, metrics, _ = rounds_and_metrics(db)
    assert status == "completed" and [(r, n) for r, _, n, _ in rounds] == [(1, 3), (2, 2)]
    assert {s for r, s, k in metrics if r == 2 and k == "train"} == {sites[0].site_id, sites[1].site_id}


def test_flwr_stop_ends_the_run_as_stopped_and_a_second_coordinator_is_refused(ingested, cluster):
    procs, tmp = cluster
    _, sites, _ = ingested
    # many rounds: the run must still be going when `flwr stop` comes, however slow the second coordinator is
    server, _, db, _ = federation(tmp, procs, sites[:2], TOML.format(name="stoppable", timeout=120, multitask=30))
    toml = tmp / "server.toml"
    wait_rounds(db, 1, server)
    # while it runs, a second coordinator on the same run folder refuses to start
    second = subprocess.run([flower_bin("m3fm-server"), "run", "--config", str(toml), "--port", str(free_port()),
                             "--resume", "--insecure"], capture_output=True, text=True, env=flower_env(), timeout=120)
    assert second.returncode == 2 and "another coordinator is running" in " ".join(second.stdout.split())
    flwr_id = rounds_and_metrics(db)[1][0][3]
    home = tmp / "runs" / "superlink" / "flwr-home"
    done = subprocess.run([flower_bin("flwr"), "stop", flwr_id, "m3fm"], capture_output=True, text=True,
                          env=flower_env(home), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert server.wait(120) == 1
    status, rounds, _, _ = rounds_and_metrics(db)
    assert status == "stopped" and len(rounds) < 31
    shown = status_of(db)
    log = (tmp / "server.log").read_text(errors="replace")[-3000:]
    for said in ("stopped", "flwr stop", "coordinator: pid", "ended (stopped)"):
        assert said in shown, f"{said!r} not in the status:\n{shown}\n--- server.log ---\n{log}"


SECURE_TOML = """
[run]
name = "ray-secure"
model = "tiny"
min_sites = 3
round_timeout = 300
out_dir = "runs"
[pretrain]
rounds = 1
local_steps = 2
[multitask]
rounds = 1
local_steps = 2
tasks_per_step = 2  # a test of processes: two tasks' micro-batches a step, not every task's
[privacy.secagg]
clipping_range = 0.5
chunk_values = 100000  # the tiny model's update in 4 chunks, one SecAgg+ instance each
[privacy.central_dp]
clipping = "client"
noise_multiplier = 0.5
clipping_norm = 1.0
"""


def assert_secure_run_with_reports(stdout: str, tmp_path) -> None:
    """SECURE_TOML's run under `m3fm-sim run --out tmp_path/out` finished: both rounds with the three sites, each
    round in the ledger as central DP, and every site's report beside the run report."""
    assert "round 2/2 multitask 1: 3/3 sites" in stdout, stdout[-3000:]
    # the wait for the reports shows too, one line per site as its report lands
    assert "rounds done: each site is evaluating" in stdout and "site report 3 in: site-0" in stdout
    for site in ("site-01", "site-02", "site-03"):
        assert (tmp_path / "out" / "metrics" / f"{site}.json").is_file()
        # after the run each site wrote its report and m3fm-sim copied it beside the run report
        assert (tmp_path / "out" / "reports" / "run-0001" / site / "report.html").is_file()
    assert (tmp_path / "out" / "reports" / "run-0001" / "run" / "report.html").is_file()
    engine = open_server_store(f"sqlite:///{tmp_path / 'runs' / 'server.db'}")
    with Session(engine) as s:
        assert [(r.round, r.sites_accepted) for r in s.scalars(select(Round).order_by(Round.round))] == [(1, 3), (2, 3)]
        assert [(r.round, r.mechanism) for r in s.scalars(select(PrivacyLedger).order_by(PrivacyLedger.round))] == \
            [(1, "central-dp per site"), (2, "central-dp per site")]
        assert sorted(r.site_id for r in s.scalars(select(SiteReport))) == ["site-01", "site-02", "site-03"]
    engine.dispose()


@pytest.mark.slow
def test_ray_engine_runs_secure_aggregation_with_central_dp_in_a_loopback_only_namespace(cohort, ingested, tmp_path):
    """The tiny run on Flower's simulation engine, every training round through SecAgg+ in chunks (sites clip,
    mask; the server unmasks only the sums and adds the central noise), all traffic on a loopback-only network
    namespace. Slow: tests/test_ray_cluster.py runs the same on a two-node Ray cluster."""
    out_dir, _ = cohort
    toml = tmp_path / "server.toml"
    toml.write_text(SECURE_TOML)
    cmd = (f"ip link set lo up; exec {flower_bin('m3fm-sim')} run --cohort {out_dir} --preset tiny --engine ray "
           f"--out {tmp_path / 'out'} --server-config {toml}")
    done = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, env=flower_env(),
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert_secure_run_with_reports(done.stdout, tmp_path)
