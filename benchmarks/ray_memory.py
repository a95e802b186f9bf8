"""Memory per virtual site in a Ray simulation (Flower's simulation engine) with many sites: the resident memory
of this process and every process it started (Ray's raylet, GCS, workers), sampled while the tiny run goes, for
12, 25 and 50 virtual SuperNodes (goal: 50 sites in 24 GiB).

  python benchmarks/ray_memory.py [--sites 12 25 50] [--work /tmp/m3fm-bench]

Every virtual site is a site of its own (its site_id, site folder, work folder and database), without generating
and ingesting 50 cohorts: site k is a clone of tiny-cohort site k mod 3 (site.toml with a new site_id and
storage.work_dir; dicom/, clinical.csv, labels.csv and reports/ symlinked; site.db copied, the crops
hard-linked), ingested again under its own name, which reads nothing new and records a finished ingestion whose
summary names the clone's site_id. The clone keeps its source's patient splits: splits are drawn once (salted with
the site_id when a patient is first seen) and never move, and splits drawn again under the new site_id left some
7-12-patient clones with under min_cell_size training items, so they skipped multitask rounds and the run fell
below run.min_sites. Ray binds the machine's address, so this re-runs itself inside a loopback-only network
namespace (`unshare -n`). A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import common


def clone_sites(sources: list[Path], n: int, folder: Path) -> list[Path]:
    """n distinct ingested sites under folder (kept for the next run): vsite-001 .. vsite-NNN, site k a clone of
    sources[k mod len(sources)] with its own site_id, work folder and database."""
    import tomli_w

    from client.federated import SiteNotReady, ensure_ingested
    from client.ingest import ingest_site
    from client.site import SiteConfigError, load_site

    def ingested_as(site_dir: Path, site_id: str) -> bool:
        try:
            return ensure_ingested(load_site(site_dir)).get("site_id") == site_id
        except (SiteConfigError, SiteNotReady):
            return False

    out = []
    for k in range(n):
        src, site_id = load_site(sources[k % len(sources)]), f"vsite-{k + 1:03d}"
        site_dir, work_dir = folder / site_id, folder / "work" / site_id
        if not ingested_as(site_dir, site_id):
            shutil.rmtree(site_dir, ignore_errors=True)
            shutil.rmtree(work_dir, ignore_errors=True)
            site_dir.mkdir(parents=True)
            for name in (src.dicom_dir, "clinical.csv", "labels.csv", "reports"):
                if (src.site_dir / name).exists():
                    (site_dir / name).symlink_to(src.site_dir / name)  # size and mtime as the source's: not re-read
            doc = tomllib.loads((src.site_dir / "site.toml").read_text(encoding="utf-8"))
            doc.update(site_id=site_id, name=f"{site_id} (clone of {src.site_id})")
            doc.setdefault("storage", {})["work_dir"] = str(work_dir)
            (site_dir / "site.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
            work_dir.mkdir(parents=True)
            shutil.copytree(src.work_dir / "crops", work_dir / "crops", copy_function=os.link)  # read-only memmaps
            shutil.copy2(src.work_dir / "site.db", work_dir / "site.db")  # with its splits (see the docstring)
            summary = ingest_site(load_site(site_dir))
            if summary["files_read"] or summary["series_processed"] or not ingested_as(site_dir, site_id):
                raise SystemExit(f"{site_dir}: the clone was not taken as ingested: {summary}")
        out.append(site_dir)
    return out


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
    outcome = run_ray(toml, sites[:n], log=lambda *_: None)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if not outcome.ok:
        raise SystemExit(f"{n} virtual sites: the run failed ({outcome.status}) after {seconds:.0f} s, peak RSS "
                         f"{peak[0] / 2**30:.2f} GiB: {outcome.error}")
    added = peak[0] - base
    return {"virtual_sites": n, "run_s": seconds, "peak_rss_gib": peak[0] / 2**30, "added_rss_gib": added / 2**30,
            "per_site_mib": added / n / 2**20, "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[12, 25, 50])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inside:  # the same command inside a loopback-only network namespace
        inner = " ".join([sys.executable, os.path.abspath(__file__), "--inside", "--work", str(args.work), "--sites",
                          *map(str, args.sites)])
        raise SystemExit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up; exec {inner}"]))
    cohort = common.tiny_cohort(args.work / "fed-cohort", sites=3, exams=16)
    sites = clone_sites(cohort, max(args.sites), args.work / "ray-sites")
    rows = [measure(sites, n, args.work) for n in args.sites]
    common.report("ray_memory", "resident memory of a Ray simulation per number of virtual sites", rows,
                  {"note": "every virtual site is a distinct site (its own site_id and database, a clone of one of "
                           "the 3 tiny-cohort sites); Ray runs them on a pool of actors (one per CPU here), each "
                           "keeping up to client.service.LOCAL_SITES sites warm"})


if __name__ == "__main__":
    main()
