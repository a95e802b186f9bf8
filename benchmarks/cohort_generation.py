"""Time synthetic cohort generation per preset; print a table and write benchmarks/results/cohort_generation.json.

  python benchmarks/cohort_generation.py [--preset tiny] [--workers 1 2]

A measurement, never pass/fail: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sim.cohort.generate import generate_cohort
from sim.cohort.presets import build_sites

RESULTS = Path(__file__).parent / "results" / "cohort_generation.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    rows = []
    for workers in args.workers:
        out = Path(tempfile.mkdtemp(prefix="m3fm-bench-"))
        try:
            t0 = time.perf_counter()
            summaries = generate_cohort(out / "cohort", build_sites(args.preset), seed=0, workers=workers)
            seconds = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in (out / "cohort").rglob("*") if p.is_file())
        finally:
            shutil.rmtree(out)
        exams = sum(s["exams"] for s in summaries)
        rows.append({"preset": args.preset, "workers": workers, "sites": len(summaries), "exams": exams,
                     "series": sum(s["series"] for s in summaries), "slices": sum(s["slices"] for s in summaries),
                     "seconds": round(seconds, 2), "exams_per_second": round(exams / seconds, 2),
                     "megabytes": round(size / 2**20, 1)})
    table = Table(title=f"cohort generation, preset {args.preset}")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "cohort_generation", "rows": rows, "machine": {
        "python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
