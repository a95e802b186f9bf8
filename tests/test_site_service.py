"""The warm site runtime (client/service.py): the ClientApp relays, the service keeps the site open between
rounds, reopens it when the site changed, and `m3fm-client start` restarts it when it dies."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from client import channel
from client.ingest import ingest_site
from client.service import SiteService
from client.site import load_site
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.weights.packing import pack_state
from server.store import RejectedReply, Round, SiteMetric, open_server_store
from test_deployment import TOML, federation, wait_rounds
from transport.protocol import ITEMS, EvaluateConfig


def test_the_client_app_is_a_relay_that_imports_no_torch():
    code = "import sys, client.app; print(sorted(m for m in ('torch', 'opacus', 'client.federated') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_site_service_and_the_serverapp_start_without_opacus_and_transformers():
    """Their package imports cost 1.7-2 s (Opacus) and about 4 s (transformers) at every process start: only a round
    under DP-SGD imports Opacus (the accountant, privacy/accounting.py, imports it where an epsilon is computed)."""
    code = ("import sys, client.service, server.app; from privacy.accounting import epsilon_of; "
            "print(sorted(m for m in ('opacus', 'transformers') if m in sys.modules)); "
            "epsilon_of([(1.0, 0.1, 10)], 1e-5); print('opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_channel_carries_arrays_exactly_and_only_this_user_can_connect(tmp_path):
    path = channel.socket_path(tmp_path / "work")
    server = channel.listen(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    sent = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "empty": np.zeros(0, dtype=np.int64),
            "b": np.array([1.5, -2.0], dtype=np.float64)}
    pid = os.fork()
    if pid == 0:  # a child answers one request: it echoes the arrays and names what it got
        conn, _ = server.accept()
        header, arrays = channel.recv_frame(conn)
        channel.send_frame(conn, {"got": header["op"], "keys": list(arrays)}, arrays)
        conn.close()
        os._exit(0)
    try:
        answer, back = channel.call(path, {"op": "x"}, sent, timeout=30)
    finally:
        os.waitpid(pid, 0)
        server.close()
    assert answer == {"got": "x", "keys": ["a", "empty", "b"]}
    for k, v in sent.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
    with pytest.raises(channel.ServiceUnavailable, match="not running"):
        channel.call(path, {"op": "x"}, {}, timeout=5, wait_s=0.5)


def copy_site(src_dir, dest_root):
    """A site folder and its work folder (site.toml's work_dir is ../work/<site>), so it can be changed."""
    site = load_site(src_dir)
    shutil.copytree(src_dir, dest_root / src_dir.name)
    # not what services and SuperNodes that ran there left (a socket cannot be copied; their logs are theirs)
    shutil.copytree(site.work_dir, dest_root / "work" / src_dir.name,
                    ignore=shutil.ignore_patterns("service", "service.log", "supernode.log"))
    return dest_root / src_dir.name


def test_re_ingesting_a_site_makes_its_service_reopen_it(ingested, tmp_path):
    out, sites, _ = ingested
    site_dir = copy_site(sites[0].site_dir, tmp_path)
    service = SiteService(site_dir)
    torch.manual_seed(0)
    packed = pack_state(M3FM(get_config("tiny")).state_dict())
    ask = lambda: service.handle(  # noqa: E731
        {"op": channel.EVALUATE, "config": EvaluateConfig("multitask", "tiny", split="train").to_config()},
        packed)[0]["metrics"]
    before = ask()
    assert ask() == before and service.builds == 1  # warm: served again without reopening
    key = next(k for k, v in sorted(before.items()) if k.startswith(f"{ITEMS}task:") and v > 0)
    task = key[len(f"{ITEMS}task:"):]
    labels = site_dir / "labels.csv"
    rows = list(csv.DictReader(labels.open()))
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["task"] != task)
    ingest_site(load_site(site_dir))
    after = ask()
    assert service.builds == 2
    assert before[key] > 0 and after.get(key, 0) == 0  # stale data would still score it


def service_lines(work_dir):
    return (work_dir / "service.log").read_text().splitlines() if (work_dir / "service.log").exists() else []


def test_seven_rounds_through_real_processes_keep_one_service_per_site_and_a_killed_one_comes_back(ingested, cluster):
    """SuperLink + 2 SuperNodes (`m3fm-client start`) on 127.0.0.1, 7 rounds. Site 2's service serves all 7
    with one model; site 1's is killed while it trains round 4: that round fails for site 1 alone (min_sites 1),
    `m3fm-client start` restarts it, and site 1 trains every round after (the relay waits for the restart)."""
    procs, tmp = cluster
    _, all_sites, _ = ingested
    sites = [load_site(copy_site(s.site_dir, tmp / "sites")) for s in all_sites[:2]]  # own logs, own services
    toml = TOML.format(name="warm", timeout=120, multitask=6)
    toml = toml.replace("min_sites = 2", "min_sites = 1\nexpected_sites = 2")  # round 1 waits for both sites
    toml = toml.replace("[multitask]\nrounds = 6\nlocal_steps = 1", "[multitask]\nrounds = 6\nlocal_steps = 2")
    server, clients, db, _ = federation(tmp, procs, sites, toml)
    first, second = (s.work_dir for s in sites)
    deadline = time.monotonic() + 400
    victim = None
    while victim is None and time.monotonic() < deadline:  # site 1 starts training round 4
        assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
        for line in service_lines(first):
            if m := re.search(r"\[service pid (\d+)\] request \d+: train multitask round 4 started", line):
                victim = int(m.group(1))
        time.sleep(0.05)
    assert victim is not None, "site 1 never started round 4"
    os.kill(victim, signal.SIGKILL)
    wait_rounds(db, 7, server, limit_s=600)
    assert server.wait(120) == 0, (tmp / "server.log").read_text()[-3000:]

    engine = open_server_store(db)
    with Session(engine) as s:
        trained = {(m.round, m.site_id) for m in s.scalars(select(SiteMetric).where(SiteMetric.kind == "train"))}
        rejected = {(r.round, r.site_id): r.reason for r in s.scalars(select(RejectedReply))}
        rounds = s.scalars(select(Round)).all()
    engine.dispose()
    assert len(rounds) == 7
    assert all((r, "site-02") in trained for r in range(1, 8))  # expected_sites: round 1 waited for it
    assert (4, "site-01") not in trained and "site service" in rejected.get((4, "site-01"), ""), rejected
    assert {(r, "site-01") for r in range(5, 8)} <= trained  # the next round waited for the restarted service

    done = [line for line in service_lines(second) if re.search(r"request \d+: train .* in [\d.]+s", line)]
    assert len(done) == 7
    pids = {re.search(r"service pid (\d+)", line).group(1) for line in done}
    assert len(pids) == 1  # one service process served every round of site 2
    assert all(line.endswith("models built 1)") for line in done)  # and built its model once
    restarted = {re.search(r"service pid (\d+)", line).group(1) for line in service_lines(first)
                 if re.search(r"request \d+: train .* round (5|7) in", line)}
    assert restarted and str(victim) not in restarted
    assert "restarting it" in (tmp / f"{sites[0].site_id}.log").read_text()
    # each message's ClientApp was a fork of the site's warm SuperExec (transport/superexec.py), not a new
    # `flwr-clientapp` interpreter
    node_log = (second / "supernode.log").read_text()
    assert len(re.findall(r"m3fm superexec: ClientApp for task \d+ forked as pid \d+", node_log)) >= 8
    assert "Start `flwr-clientapp` process" not in node_log
