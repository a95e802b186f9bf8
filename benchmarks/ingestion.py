"""Ingestion speed: series per second at a preset's series size; print a table, write benchmarks/results/ingestion.json.

  python benchmarks/ingestion.py [--preset bench] [--exams 2] [--workers 1 2] [--config base]

Writes a one-site cohort of the preset (bench: 512 x 512 slices at clinical spacing; each exam takes about
40 s to render on one core), then ingests it from scratch once per worker count (header index, series checks,
decode, HU, lung/heart localization, every crop of the model configuration), then once more unchanged (the
incremental no-op). A measurement, never pass/fail: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import tomli_w
import tomllib
from rich.console import Console
from rich.table import Table

from client.ingest import ingest_site
from client.site import load_site
from sim.cohort.generate import generate_cohort
from sim.cohort.presets import build_sites

RESULTS = Path(__file__).parent / "results" / "ingestion.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--exams", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--config", default="base", help="model configuration whose crops are cached")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="m3fm-bench-ingest-"))
    rows = []
    try:
        t0 = time.perf_counter()
        generate_cohort(tmp / "cohort", build_sites(args.preset, sites=1, exams_per_site=args.exams), seed=0,
                        workers=max(args.workers))
        generated = time.perf_counter() - t0
        site_dir = tmp / "cohort" / "site-01"
        files = [p for p in (site_dir / "dicom").rglob("*") if p.is_file()]
        megabytes = sum(p.stat().st_size for p in files) / 2**20
        for workers in args.workers:
            d = tomllib.loads((site_dir / "site.toml").read_text())
            d["storage"]["work_dir"] = f"../work-{workers}"
            d["ingest"]["model_config"] = args.config
            (site_dir / "site.toml").write_text(tomli_w.dumps(d))
            site = load_site(site_dir)
            t0 = time.perf_counter()
            s = ingest_site(site, workers=workers)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = ingest_site(site, workers=workers)
            warm = time.perf_counter() - t0
            assert again["files_read"] == 0 and again["series_processed"] == 0
            series = s["series_accepted"] + s["series_rejected"]
            rows.append({"preset": args.preset, "config": args.config, "workers": workers, "series": series,
                         "slices": len(files), "megabytes": round(megabytes, 1), "seconds": round(cold, 2),
                         "series_per_second": round(series / cold, 3), "slices_per_second": round(len(files) / cold, 1),
                         "megabytes_per_second": round(megabytes / cold, 1), "unchanged_rerun_seconds": round(warm, 2)})
    finally:
        shutil.rmtree(tmp)
    table = Table(title=f"ingestion, preset {args.preset} ({args.exams} exams, cohort written in {generated:.0f} s)")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    Console(width=200).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "ingestion", "rows": rows, "machine": {
        "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "peak_rss_mb_main_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
