"""`m3fm-sim run`: every hospital on one machine, driven the way users drive the real thing.

deployment engine: `m3fm-server run` (a SuperLink and the ServerApp) and one
`m3fm-client start` (a SuperNode) per site, as separate processes on 127.0.0.1.
ray engine: the same ServerApp and ClientApp on Flower's simulation engine; a
virtual SuperNode per site (partition i serves site i, `sim-sites` in the run
config). Ray binds the machine's own address: on a machine that must keep
traffic on loopback, run it inside `unshare -n sh -c 'ip link set lo up; exec CMD'`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import tomli_w
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.ingest import ingest_site
from client.site import load_site, report_name
from m3fm.tasks import HEADLINE_TASKS
from server.config import load_server_config
from server.coordinator import coordinate, free_port
from transport.flower import flower_bin, flower_env, stop, wait_for_port
from server.store import RejectedReply, Round, SiteMetric, latest_run, open_server_store

# rounds per preset: small enough for the README's 10-minute run on 2 cores. A round's fixed cost is about a second
# (issue 15), so the demo spreads its steps over several rounds: two short pretraining rounds, eight multitask rounds
# of 150 steps on the headline tasks, and an evaluation after the last round only.
RUN_PLANS = {
    "tiny": {"evaluate_every": 1, "pretrain": {"rounds": 1, "local_steps": 2},
             "multitask": {"rounds": 1, "local_steps": 2}},
    # the learning benchmark's settings (benchmarks/learning.py) on the headline tasks, at a budget that fits 10 min
    "demo": {"evaluate_every": 0, "pretrain": {"rounds": 2, "local_steps": 10, "lr": 1e-3, "batch_size": 8},
             "multitask": {"rounds": 8, "local_steps": 150, "tasks_per_step": 1, "lr": 1e-3, "batch_size": 8,
                           "warmup_steps": 20, "tasks": list(HEADLINE_TASKS)}},
}


def prepare_cohort(out: Path, cohort: Path | None, preset: str, log=print, progress=None) -> list[Path]:
    """The cohort's site folders, generated (preset) when no cohort is given and none is in `out` yet;
    progress(site_id, exams written, exams) as it goes."""
    if cohort is None:
        cohort = out / "cohort"
        if not (cohort / "cohort.json").is_file():
            from sim.cohort.generate import generate_cohort
            from sim.cohort.presets import build_sites

            log(f"generating the {preset} cohort in {cohort} ...")
            generate_cohort(cohort, build_sites(preset), seed=0, workers=2, exam_progress=progress)
    sites = sorted(p for p in Path(cohort).glob("site-*") if (p / "site.toml").is_file())
    if not sites:
        raise FileNotFoundError(f"{cohort} holds no site folders (site-*/site.toml)")
    return sites


def ingest_all(sites: list[Path], log=print, progress=None) -> str:
    """Ingest every site (incremental: unchanged sites take a moment); returns their common model config.
    progress(stage, done, total), the stage "SITE_ID index" or "SITE_ID series" (client/ingest.py's stages)."""
    configs = set()
    for path in sites:
        site = load_site(path)
        t0 = time.perf_counter()
        per_site = None if progress is None else (lambda stage, done, total, sid=site.site_id:
                                                  progress(f"{sid} {stage}", done, total))
        summary = ingest_site(site, workers=2, progress=per_site)
        log(f"ingested {site.site_id}: {summary['series_accepted']} series, {summary['exams']} exams "
            f"({time.perf_counter() - t0:.1f}s)")
        configs.add(site.model_config)
    if len(configs) != 1:
        raise ValueError(f"the sites cached crops for different model configurations {sorted(configs)}")
    return configs.pop()


def write_server_toml(path: Path, name: str, model: str, n_sites: int, plan: dict, out_dir: str = "runs",
                      site_reports: bool = True, seed: int = 0) -> Path:
    plan = dict(plan)
    doc = {"run": {"name": name, "model": model, "seed": seed, "min_sites": n_sites, "round_timeout": 900.0,
                   "evaluate_every": plan.pop("evaluate_every", 1), "out_dir": out_dir, "site_reports": site_reports},
           "strategy": {"name": "fedavg"}, **plan}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def run_deployment(server_toml: Path, sites: list[Path], out: Path, log=print, max_s: float = 3600) -> int:
    """`m3fm-server run` plus one `m3fm-client start` per site, all on loopback; returns the server's exit code."""
    port = free_port()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([flower_bin("m3fm-server"), "run", "--config", str(server_toml), "--port", str(port),
                               "--insecure"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(flower_env(), COLUMNS="400"),  # whole lines: this side's console wraps them
                              start_new_session=True, text=True, errors="replace")
    # what the coordinator says (rounds with elapsed time and estimate, site reports) goes to its log and to the
    # person waiting, as `m3fm-server run` would show it on a terminal
    relay = threading.Thread(target=_relay, args=(server.stdout, logs / "server.log", log), daemon=True)
    relay.start()
    clients = []

    def stopped(signum, frame):  # SIGTERM would end this process without the `finally` that stops the others
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        wait_for_port("127.0.0.1", port, server, timeout=120)
        # the sites share this machine: each gets its share of the cores for torch's threads. Left at torch's default
        # (every core) four sites ran 8 threads on 2 cores and a 100-step round took 123-154 s instead of 11-12
        env = flower_env()
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(sites))))
        for site in sites:
            clients.append(subprocess.Popen(
                [flower_bin("m3fm-client"), "start", "--site", str(site), "--superlink", f"127.0.0.1:{port}",
                 "--port", str(free_port()), "--insecure"], stdout=open(logs / f"{site.name}.log", "ab"),
                stderr=subprocess.STDOUT, env=env, start_new_session=True))
        log(f"SuperLink on 127.0.0.1:{port}; {len(clients)} SuperNodes started; logs in {logs}")
        try:
            return server.wait(max_s)
        except subprocess.TimeoutExpired:
            log(f"the run did not finish within {max_s:.0f}s; stopping it")
            return 124
    finally:
        for p in clients:
            stop(p, timeout=20)
        stop(server, timeout=30)
        relay.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)


def _relay(stream, path: Path, log) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for line in stream:
            f.write(line)
            f.flush()
            log(f"coordinator: {line.rstrip()}")


def run_ray(server_toml: Path, sites: list[Path], log=print, cpus_per_site: int = 1, gpus_per_site: float = 0.0,
            ray_address: str | None = None):
    """Flower's simulation engine on Ray: a Ray of its own on this machine, or with `ray_address` (HOST:PORT of a
    cluster's head, as `ray start --head` prints it) the existing cluster, whose nodes then host the virtual sites.
    Flower 1.41's federation config cannot name an address (its Ray init arguments are CPUs, GPUs and logging),
    so it goes to ray.init the way Ray reads it: RAY_ADDRESS in the environment the simulation process inherits."""
    cfg = load_server_config(server_toml)
    if ray_address:
        os.environ["RAY_ADDRESS"] = ray_address
        log(f"joining the Ray cluster at {ray_address}")
    options = {"num-supernodes": len(sites), "client-resources-num-cpus": int(cpus_per_site),
               "client-resources-num-gpus": float(gpus_per_site)}
    return coordinate(cfg, False, "127.0.0.1", free_port(), log=log, simulation=options,
                      run_config={"sim-sites": ",".join(str(p.resolve()) for p in sites)})


def write_site_metrics(server_toml: Path, out: Path) -> dict[str, Path]:
    """Each site's metrics per round (what it sent: counts, losses, evaluation), one JSON per site."""
    cfg = load_server_config(server_toml)
    engine = open_server_store(cfg.database_url)
    written = {}
    with Session(engine) as s:
        run = latest_run(s, cfg.name)
        if run is None:
            return {}
        per_site: dict[str, dict] = {}
        for m in s.scalars(select(SiteMetric).where(SiteMetric.run_id == run.id).order_by(SiteMetric.round)):
            per_site.setdefault(m.site_id, {"site_id": m.site_id, "run_id": run.id, "rounds": {}})
            per_site[m.site_id]["rounds"].setdefault(str(m.round), {})[m.kind] = m.metrics
        for r in s.scalars(select(RejectedReply).where(RejectedReply.run_id == run.id)):
            per_site.setdefault(r.site_id, {"site_id": r.site_id, "run_id": run.id, "rounds": {}})
            per_site[r.site_id].setdefault("not_counted", []).append({"round": r.round, "kind": r.kind,
                                                                      "reason": r.reason})
        summary = {"run_id": run.id, "status": run.status, "rounds": [
            {"round": r.round, "phase": r.phase, "sites": r.sites_accepted, "train": r.train_metrics,
             "evaluate": r.evaluate_metrics} for r in s.scalars(select(Round).where(Round.run_id == run.id)
                                                                 .order_by(Round.round))]}
    engine.dispose()
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    for site_id, data in per_site.items():
        written[site_id] = out / "metrics" / f"{site_id}.json"
        written[site_id].write_text(json.dumps(data, indent=1), encoding="utf-8")
    (out / "metrics" / "run.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return written


def gather_reports(server_toml: Path, sites: list[Path], out: Path) -> list[Path]:
    """Copies of the run report and of each site's report of the latest run into out/reports/run-NNNN/ (the
    originals stay where they were written: the coordinator's out_dir and each site's work folder)."""
    cfg = load_server_config(server_toml)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        run = latest_run(s, cfg.name)
    engine.dispose()
    if run is None:
        return []
    dest = out / "reports" / f"run-{run.id:04d}"
    sources = {"run": cfg.run_dir(run.id)}
    for path in sites:
        site = load_site(path)
        name = report_name(cfg.name, run.id, cfg.total_rounds)
        written = sorted((site.work_dir / "reports").glob(f"{name}*"), key=lambda p: p.stat().st_mtime)
        if written:  # the newest: a site asked twice writes beside its first report
            sources[site.site_id] = written[-1]
    copied = []
    for name, folder in sources.items():
        for f in ("report.json", "report.html"):
            if (folder / f).is_file():
                (dest / name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / f, dest / name / f)
                copied.append(dest / name / f)
    return copied
