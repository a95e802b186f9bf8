"""Secure aggregation cost: a SecAgg+ round against a plaintext round, per model size; prints a table and writes
benchmarks/results/secagg.json.

  python benchmarks/secagg.py [--sizes 1e6 1e7 5e7 1e8 2.5e8] [--sites 3]

Each (size, mode) runs in a child process: Flower's SecAggPlusWorkflow (server) and secaggplus_mod (sites)
over an in-process grid (sim/inprocess_grid.py), the sites sending a random update of that many float32
parameters, so the figures are the protocol's own cost (masking, quantization, key agreement, Shamir shares,
unmasking), not training or the network. Time is split between the server and the sites (the time spent inside
the site's ClientApp calls); peak memory is traced (tracemalloc, which sees NumPy's buffers) separately while a
site call runs and while the server runs, plus the child's peak RSS. A size is skipped when the previous size's
peak RSS, scaled up, would not fit in the memory available. A measurement, never pass/fail.
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


def one(size: int, sites: int, secure: bool) -> dict:
    import flwr.compat.common.recorddict_compat as compat
    import numpy as np
    from flwr.app import Context, Message
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from server.secure import SecAggConfig, run_secagg
    from sim.inprocess_grid import InProcessGrid

    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.02, size).astype(np.float32)
    app = ClientApp(mods=[secaggplus_mod] if secure else [])
    timing = {"site_s": 0.0, "site_peak": 0, "server_peak": 0}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        params = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
        update = [(rng.normal(0, 0.01, p.shape)).astype(np.float32) for p in params]  # an update, as sites send
        res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), 1, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

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

    grid = InProcessGrid(timed_app, {n: {} for n in range(1, sites + 1)})
    parameters = ndarrays_to_parameters([weights])
    tracemalloc.start()
    t0 = time.perf_counter()
    if secure:
        mean = run_secagg(grid, SecAggConfig(clipping_range=0.1), list(range(1, sites + 1)), [weights], {}).mean
    else:
        content = compat.fitins_to_recorddict(FitIns(parameters, {}), keep_input=True)
        replies = grid.send_and_receive([Message(content, dst_node_id=n, message_type="train")
                                         for n in range(1, sites + 1)])
        mean = [np.mean([parameters_to_ndarrays(compat.recorddict_to_fitres(r.content, True).parameters)[0]
                         for r in replies], axis=0)]
    total = time.perf_counter() - t0
    timing["server_peak"] = max(timing["server_peak"], tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    assert mean is not None and mean[0].shape == (size,)
    return {"parameters": size, "mode": "secagg+" if secure else "plaintext", "sites": sites,
            "round_s": round(total, 2), "server_s": round(total - timing["site_s"], 2),
            "site_s": round(timing["site_s"] / sites, 2), "server_peak_mb": round(timing["server_peak"] / 2**20),
            "site_peak_mb": round(timing["site_peak"] / 2**20),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 5e7, 1e8, 2.5e8])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--limit-s", type=float, default=900, help="per child process")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # size sites secure: run in this (child) process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(float(args.one[0])), int(args.one[1]), args.one[2] == "1")))
        return
    rows, skipped, last = [], [], None
    for size in (int(s) for s in args.sizes):
        if last is not None and last["process_peak_rss_mb"] * size / last["parameters"] > 0.9 * available_mb():
            skipped.append({"parameters": size, "why": f"predicted peak {last['process_peak_rss_mb'] * size / last['parameters']:.0f} MB "
                                                      f"> 90% of {available_mb():.0f} MB available"})
            continue
        for secure in (False, True):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent),
                                                               os.environ.get("PYTHONPATH", "")]))
            try:
                out = subprocess.run([sys.executable, __file__, "--one", str(size), str(args.sites), str(int(secure))],
                                     capture_output=True, text=True, timeout=args.limit_s, env=env)
            except subprocess.TimeoutExpired:
                skipped.append({"parameters": size, "mode": "secagg+" if secure else "plaintext",
                                "why": f"over {args.limit_s:.0f} s"})
                break
            if out.returncode != 0:
                skipped.append({"parameters": size, "why": (out.stderr or out.stdout).strip()[-300:]})
                break
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            last = row if secure else last
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SecAgg+ vs plaintext round, {args.sites} sites, in-process")
    for col in ("parameters", "mode", "round_s", "server_s", "site_s", "server_peak_mb", "site_peak_mb",
                "process_peak_rss_mb"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("parameters", "mode", "round_s", "server_s", "site_s", "server_peak_mb",
                                            "site_peak_mb", "process_peak_rss_mb")))
    Console(width=200).print(table)
    for s in skipped:
        print("skipped:", s)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "secagg", "rows": rows, "skipped": skipped, "machine": {
        "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "memory_available_mb": round(available_mb())}}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
