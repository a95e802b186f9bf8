"""This repository is a Flower app (`[tool.flwr.app]` in pyproject.toml), the app `m3fm-server run` submits, and
`flwr run .` runs it against a SuperLink a Flower user started themselves."""

import json
import subprocess
import time
import tomllib
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.coordinator import free_port
from server.store import Round, Run, open_server_store
from transport.flower import (APP_PYPROJECT, flower_bin, flower_env, run_status, start_superlink, wait_for_port,
                              write_connection)

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_app_is_the_one_m3fm_server_runs():
    mine = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    theirs = APP_PYPROJECT["tool"]["flwr"]["app"]
    assert mine["components"] == theirs["components"] and mine["config"] == theirs["config"]
    assert mine["publisher"] == theirs["publisher"]


SERVER_TOML = """
[run]
name = "flwr-run-dot"
model = "tiny"
min_sites = 2
round_timeout = 300
out_dir = "{out}"
site_reports = false
[pretrain]
rounds = 1
local_steps = 1
[multitask]
rounds = 1
local_steps = 1
tasks_per_step = 2  # a test of processes: two tasks' micro-batches a step, not every task's
"""


def test_flwr_run_dot_runs_this_repository_against_a_plain_superlink(ingested, cluster):
    """A Flower user's way in: their own `flower-superlink`, our sites, and `flwr run .` from this repository with
    the run config naming a server.toml. No m3fm-server process anywhere."""
    procs, tmp = cluster
    _, sites, _ = ingested
    home = tmp / "flwr-home"
    env = flower_env(home)
    port = free_port()
    write_connection(home, "mine", f"127.0.0.1:{port}")
    link = start_superlink(tmp / "superlink", "127.0.0.1", port, tmp / "superlink.log", env=env,
                           extra_args=("--insecure",), database=False)
    procs.append(link)
    wait_for_port("127.0.0.1", port, link)
    for site in sites[:2]:
        procs.append(subprocess.Popen([flower_bin("m3fm-client"), "start", "--site", str(site.site_dir), "--superlink",
                                       f"127.0.0.1:{port}", "--port", str(free_port()), "--insecure"],
                                      stdout=open(tmp / f"{site.site_id}.log", "ab"), stderr=subprocess.STDOUT,
                                      env=flower_env(), start_new_session=True))
    toml = tmp / "server.toml"
    toml.write_text(SERVER_TOML.format(out=tmp / "runs"))
    submitted = subprocess.run([flower_bin("flwr"), "run", ".", "mine", "--run-config", f'config="{toml}"',
                                "--format", "json"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = int(json.loads(submitted.stdout)["run-id"])
    deadline, status = time.monotonic() + 480, "pending"
    while time.monotonic() < deadline and not status.startswith("finished"):
        time.sleep(2)
        status = run_status("mine", run_id, env)
    logs = "".join((tmp / name).read_text(errors="replace")[-1500:] for name in ("superlink.log", "site-01.log"))
    assert status == "finished:completed", f"{status}\n{logs}"
    listed = subprocess.run([flower_bin("flwr"), "ls", "mine"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and str(run_id) in listed.stdout, listed.stdout + listed.stderr
    shown = subprocess.run([flower_bin("flwr"), "log", str(run_id), "mine", "--show"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert shown.returncode == 0 and "round 2/2 (multitask 1/1): 2/2 sites accepted" in shown.stdout, \
        (shown.stdout + shown.stderr)[-2000:]
    engine = open_server_store(f"sqlite:///{tmp / 'runs' / 'server.db'}")
    with Session(engine) as s:
        run = s.scalars(select(Run)).one()
        rounds = [(r.phase, r.sites_accepted, r.flwr_run_id) for r in s.scalars(select(Round).order_by(Round.round))]
    engine.dispose()
    assert run.status == "completed" and run.name == "flwr-run-dot"
    assert rounds == [("pretrain", 2, str(run_id)), ("multitask", 2, str(run_id))]
