"""Secure aggregation cost: a SecAgg+ round against a plaintext round, per model size; prints a table and writes
benchmarks/results/secagg.json.

  python benchmarks/secagg.py [--sizes 1e7 1e8 base large huge] [--sites 3] [--chunk-values 33554432]

Each (size, mode) runs in a child process: our secure round (server/secure.py: Flower's SecAggPlusWorkflow once
per chunk of the update, transport/secure_chunks.py) with secaggplus_mod at the sites, over an in-process grid
(sim/inprocess_grid.py); each site sends a random update of that many float32 parameters (a model name means its
state dict's size), made at chunk 0 and kept on disk as a site keeps it. So the figures are the protocol's own
cost (quantization, masks, key agreement, Shamir shares, unmasking, the site's update on disk), not training
or the network; the sites are benchmarks/secagg_site_app.py's, as in the deployment engine. The plaintext row
sends the weights and folds the sites' updates one reply at a time. Time is split between the server and the
sites (the time spent inside the site's ClientApp calls); peak memory is traced (tracemalloc, which sees NumPy's
buffers) separately while a site call runs and while the server runs, plus the child's peak RSS. A size that
fails (out of memory, over --limit-s) is reported as skipped. A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "secagg.json"


def one(size: int, sites: int, secure: bool, chunk_values: int) -> dict:
    import tempfile

    import flwr.compat.common.recorddict_compat as compat
    import numpy as np
    from flwr.app import Array, ArrayRecord, Context, Message
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from secagg_site_app import clientapp as secure_site  # benchmarks/: the deployment engine's sites too
    from secagg_site_app import random_values
    from server.secure import SecAggConfig, secure_train_round
    from sim.inprocess_grid import InProcessGrid

    weights = random_values(size, 0.02, seed=0)
    folder = Path(tempfile.mkdtemp(prefix="secagg-bench-"))
    plain_site = ClientApp()
    timing = {"site_s": 0.0, "site_peak": 0, "server_peak": 0}

    @plain_site.train()
    def train(msg: Message, context: Context) -> Message:  # an update, as a site sends it after training
        params = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
        update = [random_values(p.size, 0.01, seed=context.node_id) for p in params]
        res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    app = secure_site if secure else plain_site

    def timed_app(msg, ctx):  # site time and site peak memory, apart from the server's
        timing["server_peak"] = max(timing["server_peak"], tracemalloc.get_traced_memory()[1])
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        try:
            return app(msg, ctx)
        finally:
            timing["site_s"] += time.perf_counter() - t0
            timing["site_peak"] = max(timing["site_peak"], tracemalloc.get_traced_memory()[1])
            tracemalloc.reset_peak()

    grid = InProcessGrid(timed_app, {n: {"work": str(folder / f"site-{n}")} for n in range(1, sites + 1)}, keep=False)
    tracemalloc.start()
    t0 = time.perf_counter()
    chunks = 1
    if secure:
        secagg = SecAggConfig(clipping_range=0.1, chunk_values=chunk_values)
        out, contributors, done = secure_train_round(grid, secagg, ArrayRecord({"model": Array(weights)}), {}, 1,
                                                     list(range(1, sites + 1)))
        assert out is not None and contributors == {"model": sites}, "the secure round failed"
        mean = out["model"]
        chunks = -(-size // chunk_values)
    else:
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([weights]), {}), keep_input=True)
        ids = grid.push_messages([Message(content, dst_node_id=n, message_type="train") for n in range(1, sites + 1)])
        mean = np.zeros(size, dtype=np.float32)
        for i in ids:  # pulled and folded one reply at a time, as the coordinator does (server/delivery.py)
            reply = grid.pull_messages([i])[0]
            mean += parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, True).parameters)[0] / sites
            del reply
        mean += weights
    total = time.perf_counter() - t0
    timing["server_peak"] = max(timing["server_peak"], tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert mean.shape == (size,)
    return {"parameters": size, "mode": f"secagg+ x{chunks}" if secure else "plaintext", "sites": sites,
            "round_s": round(total, 2), "server_s": round(total - timing["site_s"], 2),
            "site_s": round(timing["site_s"] / sites, 2), "server_peak_mb": round(timing["server_peak"] / 2**20),
            "site_peak_mb": round(timing["site_peak"] / 2**20), "model_mb": round(4 * size / 2**20),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def seconds_per_stage(timings) -> dict[str, float]:
    """{"stage", "s"} records -> seconds summed per stage."""
    out: dict[str, float] = {}
    for t in timings:
        out[t["stage"]] = out.get(t["stage"], 0.0) + t["s"]
    return out


def deployment_one(size: int, sites: int, secure: bool, chunk_values: int, limit_s: float,
                   superlink_db: str = "memory") -> dict:
    """One round through the real processes: a SuperLink, `sites` SuperNodes (transport/supernode.py, warm
    ClientApp forks) and the ServerApp of benchmarks/secagg_app.py. Each process tree's resident memory is sampled
    every 0.2 s as PSS (forked ClientApps share their parent's pages): the coordinator's (SuperLink, its SuperExec
    and the ServerApp) and each site's (SuperNode, its SuperExec and ClientApp processes). Extra = peak - the
    tree's own level once every SuperNode had joined, and for the coordinator also less the ServerApp's own
    level before the round (its imports and the global model it holds in any case)."""
    import shutil
    import tempfile

    import tomli_w

    # benchmarks/common.py by module name: a `benchmarks` package in site-packages shadows our folder
    from common import pss_bytes, tree_rss
    from server.coordinator import free_port
    from transport.flower import (APP_PYPROJECT, flower_env, run_status, start_superlink, start_supernode, stop,
                                  submit_run, wait_for_port, write_connection)

    work = Path(tempfile.mkdtemp(prefix="secagg-deploy-"))
    env = flower_env(work / "flwr-home")
    here = Path(__file__).resolve().parent  # secagg_app.py, secagg_site_app.py: imported by module name
    env.update(PYTHONPATH=os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    port = free_port()
    write_connection(work / "flwr-home", "bench", f"127.0.0.1:{port}")
    app = json.loads(json.dumps(APP_PYPROJECT))
    app["project"]["name"] = "m3fm-secagg-bench"
    app["tool"]["flwr"]["app"]["components"] = {"serverapp": "secagg_app:serverapp",
                                                "clientapp": "secagg_site_app:clientapp"}
    app["tool"]["flwr"]["app"]["config"] = {"values": 0, "sites": 0, "secure": 0, "chunk-values": 0, "out": ""}
    (work / "app").mkdir()
    (work / "app" / "pyproject.toml").write_text(tomli_w.dumps(app))
    link, nodes = None, []
    try:
        link = start_superlink(work / "link", "127.0.0.1", port, work / "superlink.log", extra_args=("--insecure",),
                               env=env, database=superlink_db == "file")
        wait_for_port("127.0.0.1", port, link)
        for i in range(sites):
            (work / f"site-{i}").mkdir()
            nodes.append(start_supernode(f"127.0.0.1:{port}", free_port(), f'work="{work / f"site-{i}"}"',
                                         work / f"site-{i}.log", extra_args=("--insecure",), env=env))
        time.sleep(8)  # joined and idle
        idle = {"coordinator": tree_rss(link.pid, pss_bytes),
                **{f"site-{i}": tree_rss(n.pid, pss_bytes) for i, n in enumerate(nodes)}}
        peak = dict(idle)
        run_id = submit_run(work / "app", "bench", {"values": size, "sites": sites, "secure": int(secure),
                                                   "chunk-values": chunk_values, "out": str(work / "out.json")}, env)
        t0, status, last = time.monotonic(), "pending", 0.0
        while time.monotonic() - t0 < limit_s:
            peak["coordinator"] = max(peak["coordinator"], tree_rss(link.pid, pss_bytes))
            for i, n in enumerate(nodes):
                peak[f"site-{i}"] = max(peak[f"site-{i}"], tree_rss(n.pid, pss_bytes))
            if time.monotonic() - last > 5:
                status, last = run_status("bench", run_id, env), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(0.2)
        out = json.loads((work / "out.json").read_text()) if (work / "out.json").exists() else {}
        if not out.get("ok"):
            raise RuntimeError(f"run {status}: {out.get('error', '')[-1500:] or 'no result'}")
        # where the round went: each stage's wall time at the ServerApp, and the busiest site's time in its ClientApps
        stage_s = seconds_per_stage(out.get("stages", []))
        site_s: dict[str, float] = {}
        for i in range(sites):
            timings = work / f"site-{i}" / "timings.jsonl"
            lines = timings.read_text().splitlines() if timings.exists() else []
            for k, v in seconds_per_stage(json.loads(line) for line in lines).items():
                site_s[k] = max(v, site_s.get(k, 0.0))
        extra = {k: (peak[k] - idle[k]) / 2**20 for k in peak}
        extra["coordinator"] -= out["serverapp_idle_peak_mb"]
        model_mb = 4 * size / 2**20
        return {"parameters": size, "model_mb": round(model_mb), "superlink_db": superlink_db,
                "mode": f"secagg+ x{-(-size // chunk_values)}" if secure else "plaintext", "sites": sites,
                "round_s": round(out["round_s"], 1), "coordinator_extra_mb": round(extra["coordinator"]),
                "coordinator_extra_x_model": round(extra["coordinator"] / model_mb, 2),
                "site_extra_mb": round(max(extra[f"site-{i}"] for i in range(sites))),
                "site_extra_x_model": round(max(extra[f"site-{i}"] for i in range(sites)) / model_mb, 2),
                "server_stage_s": {k: round(v, 1) for k, v in stage_s.items()},
                "site_clientapp_s": {k: round(v, 1) for k, v in site_s.items()}}
    finally:
        for n in nodes:
            stop(n, timeout=20)
        if link is not None:
            stop(link, timeout=30)
        if os.environ.get("KEEP_WORK") is None:
            shutil.rmtree(work, ignore_errors=True)


def values_of(size: str) -> int:
    """A number of values, or a model configuration's state-dict size (built on the meta device: no memory)."""
    try:
        return int(float(size))
    except ValueError:
        import torch

        from m3fm.model.configs import get_config
        from m3fm.model.m3fm import M3FM
        with torch.device("meta"):
            return sum(t.numel() for t in M3FM(get_config(size)).state_dict().values())


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", nargs="+", default=["1e7", "1e8", "base", "large", "huge"],
                    help="values per update, or a model configuration (its state dict's size)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--chunk-values", type=int, default=2**25, help="values per SecAgg+ instance")
    ap.add_argument("--engine", choices=("inprocess", "deployment"), default="inprocess")
    ap.add_argument("--limit-s", type=float, default=900, help="per round")
    ap.add_argument("--superlink-db", choices=("memory", "file"), default="memory",
                    help="the SuperLink's state: Flower's in-memory store (as `m3fm-server run` starts it) or a "
                         "SQLite file (as it did before: secure rounds at 100M failed on its lock)")
    ap.add_argument("--out", type=Path, help="the JSON written (default: benchmarks/results/secagg[_deployment].json)")
    ap.add_argument("--modes", nargs="+", choices=("plain", "secure"), default=["plain", "secure"])
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # size sites secure: run in this (child) process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(float(args.one[0])), int(args.one[1]), args.one[2] == "1", args.chunk_values)))
        return
    rows, skipped = [], []
    for size in (values_of(s) for s in args.sizes):
        for secure in [m == "secure" for m in args.modes]:
            try:
                row = (deployment_one(size, args.sites, secure, args.chunk_values, args.limit_s, args.superlink_db)
                       if args.engine == "deployment" else inprocess_row(size, args.sites, secure, args))
            except Exception as e:  # noqa: BLE001 - a size that does not fit or finish is reported, not fatal
                skipped.append({"parameters": size, "mode": "secagg+" if secure else "plaintext",
                                "why": f"{type(e).__name__}: {str(e)[-300:]}"})
                break
            rows.append(row)
            print(json.dumps(row), flush=True)
        if rows and rows[-1]["parameters"] == size and "secagg" in rows[-1]["mode"] and len(rows) >= 2:
            secure_row, plain_row = rows[-1], rows[-2]
            secure_row["secure_over_plain"] = round(secure_row["round_s"] / plain_row["round_s"], 2)
            for side in ("coordinator", "site"):  # what secure aggregation adds to the plaintext round's peak
                if f"{side}_extra_mb" in secure_row:
                    added = secure_row[f"{side}_extra_mb"] - plain_row[f"{side}_extra_mb"]
                    secure_row[f"{side}_secagg_added_x_model"] = round(added / secure_row["model_mb"], 2)
    from rich.console import Console
    from rich.table import Table

    where = "in-process" if args.engine == "inprocess" else "deployment engine (real processes)"
    table = Table(title=f"SecAgg+ (chunks of {args.chunk_values} values) vs plaintext round, {args.sites} sites, "
                        f"{where}")
    columns = list(dict.fromkeys(c for r in rows for c in r))
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    Console(width=220).print(table)
    for s in skipped:
        print("skipped:", s)
    path = args.out or (RESULTS if args.engine == "inprocess" else RESULTS.with_name("secagg_deployment.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": f"secagg {args.engine}", "chunk_values": args.chunk_values,
                                "rows": rows, "skipped": skipped, "machine": {
                                    "python": platform.python_version(), "cpus": os.cpu_count(),
                                    "platform": platform.platform(), "memory_available_mb": round(available_mb())}},
                               indent=1))
    print(f"wrote {path}")


def inprocess_row(size: int, sites: int, secure: bool, args) -> dict:
    """The in-process round in a child process of its own (its peak RSS is its own)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--one", str(size), str(sites), str(int(secure)),
                          "--chunk-values", str(args.chunk_values)],
                         capture_output=True, text=True, timeout=args.limit_s, env=env)
    if out.returncode != 0:
        raise RuntimeError((out.stderr or out.stdout).strip()[-300:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
