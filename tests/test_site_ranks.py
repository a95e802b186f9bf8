"""A site on several ranks (client/ranks.py), real rank processes on gloo: its service's reply to a training request
is the reply it gives on one device, and a rank that dies mid-round fails that request cleanly, leaves no process
behind, and the next request is served by fresh ranks."""

import json
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch

from client import channel
from client.service import SiteService
from client.site import load_site
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.checkpoint import read_checkpoint, write_checkpoint
from m3fm.reference import convert
from m3fm.weights.packing import pack_state
from privacy.budget import DPSGDConfig
from privacy.accounting import PrivacyLedger
from server.config import load_server_config
from server.rounds import initial_weights, phase_config
from server.task_sum import task_aware_average
from server.coordinator import free_port
from test_deployment import rounds_and_metrics, start
from test_reference import reference_state
from test_site_service import copy_site
from transport.flower import flower_bin
from transport.protocol import LOSS, NUM_EXAMPLES, SECONDS, SERVICE_TIME, RoundConfig, counts_of


def weights():
    torch.manual_seed(0)
    return pack_state(M3FM(get_config("tiny")).state_dict())


def train(phase: str, steps: int = 2, **kw) -> dict:
    return {"op": channel.TRAIN, "config": RoundConfig(
        phase=phase, phase_round=1, rounds=1, local_steps=steps, lr=1e-3, batch_size=2, model="tiny",
        run_name="ranks", server_round=1, seed=3, **kw).to_config()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


# pretraining over ranks (micro-batches shared): the real round below, whose round 1 pretrains on 2 ranks. Slow: the
# real round below compares each two-rank reply with the one-device reply too
@pytest.mark.slow
@pytest.mark.parametrize("phase,extra", [("multitask", {})])
def test_a_site_on_two_ranks_replies_as_it_does_on_one_device(ingested, tmp_path, phase, extra):
    out, sites, _ = ingested
    site_dir = copy_site(sites[0].site_dir, tmp_path)
    one = SiteService(site_dir)
    two = SiteService(site_dir, devices=2)
    try:
        request, packed = train(phase, **extra), weights()
        a_head, a_weights = one.handle(request, packed)
        b_head, b_weights = two.handle(request, packed)
        assert two.group is not None and len(two.group.procs) == 2 and one.group is None
    finally:
        two.group.stop()
    a, b = a_head["metrics"], b_head["metrics"]
    # counts per group and per task or scale, and the losses: the site's totals whatever the number of ranks
    timed = (LOSS, SECONDS, SERVICE_TIME)
    counted = sorted(k for k in a if not k.startswith(timed))
    assert counted and counted == sorted(k for k in b if not k.startswith(timed))
    assert {k: a[k] for k in counted} == {k: b[k] for k in counted}
    assert any(k.startswith(LOSS) for k in a)
    for k in (k for k in a if k.startswith(LOSS)):
        assert b[k] == pytest.approx(a[k], rel=1e-4), k
    assert a_weights.keys() == b_weights.keys()
    moved = 0
    for k, v in a_weights.items():
        np.testing.assert_allclose(b_weights[k], v, rtol=0, atol=1e-4, err_msg=k)
        moved += not np.array_equal(v, packed[k])
    assert moved  # the round trained


def test_a_rank_dying_mid_round_fails_the_request_cleanly_and_the_next_one_works(ingested, tmp_path):
    out, sites, _ = ingested
    site_dir = copy_site(sites[0].site_dir, tmp_path)
    log = tmp_path / "service.log"
    service = SiteService(site_dir, devices=2, log_path=log)
    ranks_json = load_site(site_dir).work_dir / "service" / "ranks.json"
    try:
        group = service.rank_group()
        group.start()
        first = json.loads(ranks_json.read_text())["pids"]
        killed = threading.Event()

        def kill_rank_1_once_it_trains():  # a long round; rank 1 is killed while it is in it
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed.is_set():
                lines = log.read_text().splitlines() if log.exists() else []
                if any(f"[rank 1 pid {first[1]}] request 1: train" in line for line in lines):
                    time.sleep(2)  # well into its steps
                    os.kill(first[1], signal.SIGKILL)
                    killed.set()
                time.sleep(0.2)

        threading.Thread(target=kill_rank_1_once_it_trains, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {first[1]}\) exited with code -9"):
            service.handle(train("multitask", steps=400), weights())
        assert killed.is_set() and time.monotonic() - t0 < 60  # it failed when the rank died, not at a timeout
        assert not any(alive(p) for p in first)  # no rank left waiting in a collective
        assert group.procs == []
        head, trained = service.handle(train("multitask"), weights())  # the next request: fresh ranks
        second = json.loads(ranks_json.read_text())["pids"]
        assert set(second).isdisjoint(first) and all(alive(p) for p in second)
        assert head["metrics"][NUM_EXAMPLES] > 0 and trained
    finally:
        service.group.stop()
    assert not any(alive(p) for p in second)


ROUND_TOML = """
[run]
name = "two-ranks"
model = "tiny-ref"
init = "converted.pt"
min_sites = 2
round_timeout = 300
out_dir = "runs"
site_reports = false
[pretrain]
rounds = 1
local_steps = 2
micro_batches = 2
[multitask]
rounds = 1
local_steps = 2
tasks_per_step = 2  # a test of processes: two tasks' micro-batches a step, not every task's
"""


def test_a_real_round_with_one_site_on_two_ranks_aggregates_what_its_replies_give(ingested, cluster):
    """`m3fm-client start --devices 2` at one hospital, one device at the other, real SuperLink and SuperNodes, the
    run started from converted published-format weights ([run] init): both rounds complete, the two-rank site's
    service trained on both ranks, the round-0 model is the converted checkpoint, and each round's global model is
    the task-aware average of the replies each site gives on one device from the previous global model."""
    procs, tmp = cluster
    _, sites, _ = ingested
    copies = [load_site(copy_site(s.site_dir, tmp)) for s in sites[:2]]
    cfg_ref = get_config("tiny-ref")
    converted, _ = convert(reference_state(cfg_ref), cfg_ref)
    write_checkpoint(tmp / "converted.pt", converted, cfg_ref)
    toml = tmp / "server.toml"
    toml.write_text(ROUND_TOML)
    port = free_port()
    server = start([flower_bin("m3fm-server"), "run", "--config", str(toml), "--port", str(port), "--insecure"],
                   tmp / "server.log")
    procs.append(server)
    for site, devices in zip(copies, (2, 1)):
        procs.append(start([flower_bin("m3fm-client"), "start", "--site", str(site.site_dir), "--superlink",
                            f"127.0.0.1:{port}", "--port", str(free_port()), "--insecure", "--devices", str(devices)],
                           tmp / f"{site.site_id}.log"))
    assert server.wait(600) == 0, (tmp / "server.log").read_text()[-3000:]
    status, rounds, _, rejected = rounds_and_metrics(f"sqlite:///{tmp / 'runs' / 'server.db'}")
    assert status == "completed" and [(r, n) for r, _, n, _ in rounds] == [(1, 2), (2, 2)] and rejected == []
    log = (copies[0].work_dir / "service.log").read_text()
    for rank in (0, 1):  # both rounds trained on both ranks of the first site
        assert len(re.findall(rf"\[rank {rank} pid \d+\] request \d+: train \w+ round \d+ in", log)) == 2, log[-3000:]
    assert "[rank" not in (copies[1].work_dir / "service.log").read_text()

    cfg = load_server_config(toml)
    round0 = initial_weights(cfg)
    assert all(torch.equal(round0[k], converted[k]) for k in converted)  # round 0: the converted weights
    previous = pack_state(round0)
    checkpoints = sorted((tmp / "runs").rglob("round-*.pt"))
    assert len(checkpoints) == 2
    for rnd, path in enumerate(checkpoints, start=1):
        request = {"op": channel.TRAIN, "config": dict(phase_config(cfg, rnd))}
        replies = []
        for site in copies:
            head, arrays = SiteService(site.site_dir).handle(request, previous)
            replies.append((arrays, {g: int(n) for g, n in counts_of(head["metrics"]).items()}))
        expected, contributors = task_aware_average(previous, replies)
        assert max(contributors.values()) == 2
        got = pack_state(read_checkpoint(path)["model"])
        for k, v in expected.items():
            np.testing.assert_allclose(got[k], v, rtol=0, atol=2e-4, err_msg=f"round {rnd} {k}")
        previous = got


def test_dp_sgd_on_two_ranks_spends_what_one_device_spends_and_records_it_once(ingested, tmp_path):
    out, sites, _ = ingested
    site_dir = copy_site(sites[0].site_dir, tmp_path)
    work = load_site(site_dir).work_dir
    request = train("multitask", steps=3, extra=DPSGDConfig(noise_multiplier=1.1, max_grad_norm=1.0).to_config())
    spent = {}
    for devices in (1, 2):
        shutil.rmtree(work / "privacy", ignore_errors=True)
        service = SiteService(site_dir, devices=devices)
        try:
            head, trained = service.handle(request, weights())
        finally:
            if service.group is not None:
                service.group.stop()
        spent[devices] = {k: v for k, v in head["metrics"].items() if k.startswith("dp.")}
        assert trained and [r["round"] for r in PrivacyLedger(work).rounds] == [1]  # one record, by rank 0
    assert spent[1]["dp.epsilon"] > 0 and spent[2] == spent[1]
