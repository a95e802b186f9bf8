"""Memory per virtual site in a Ray simulation (Flower's simulation engine) with many sites: the resident memory
of this process and every process it started (Ray's raylet, GCS, workers), sampled while the tiny run goes, for
3, 6 and 12 virtual SuperNodes over the tiny cohort (virtual site i serves cohort site i mod 3).

  python benchmarks/ray_memory.py [--sites 3 6 12] [--work /tmp/m3fm-bench]

Ray binds the machine's address, so this re-runs itself inside a loopback-only network namespace
(`unshare -n`). A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common


def measure(sites: list[Path], n: int, work: Path) -> dict:
    from sim.federation import run_ray, write_server_toml

    out = Path(tempfile.mkdtemp(prefix=f"ray-{n}-", dir=work))
    plan = {"evaluate_every": 0, "pretrain": {"rounds": 1, "local_steps": 1}, "multitask": {"rounds": 1, "local_steps": 1}}
    toml = write_server_toml(out / "server.toml", f"ray-{n}", "tiny", n, plan, site_reports=False)
    base, peak, stop = common.tree_rss(os.getpid()), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], common.tree_rss(os.getpid()))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    outcome = run_ray(toml, [sites[i % len(sites)] for i in range(n)], log=lambda *_: None)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if not outcome.ok:
        raise SystemExit(f"{n} virtual sites: the run failed ({outcome.status}): {outcome.error}")
    added = peak[0] - base
    return {"virtual_sites": n, "run_s": seconds, "peak_rss_gib": peak[0] / 2**30, "added_rss_gib": added / 2**30,
            "per_site_mib": added / n / 2**20, "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 6, 12])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inside:  # the same command inside a loopback-only network namespace
        inner = " ".join([sys.executable, os.path.abspath(__file__), "--inside", "--work", str(args.work), "--sites",
                          *map(str, args.sites)])
        raise SystemExit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up; exec {inner}"]))
    cohort = common.tiny_cohort(args.work / "fed-cohort", sites=3, exams=16)
    rows = [measure(cohort, n, args.work) for n in args.sites]
    common.report("ray_memory", "resident memory of a Ray simulation per number of virtual sites", rows,
                  {"note": "Ray runs virtual sites on a pool of actors (one per CPU here), so memory follows the "
                           "actors, not the number of sites"})


if __name__ == "__main__":
    main()
