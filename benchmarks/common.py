"""What every benchmark shares: machine facts, a rich table, and results/NAME.json. Measurements, never pass/fail:
the machine may be shared and noisy, so compare ratios taken in one run."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/NAME.py` from a checkout

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    from m3fm.envinfo import environment

    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {**environment(), "cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "platform": platform.platform(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def report(name: str, title: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print rows as a table and write results/NAME.json with the machine's facts."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in rows[0] if rows else []:
        table.add_column(col, justify="left" if col == next(iter(rows[0])) else "right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    Console(width=160).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "rows": rows, **(extra or {}), "machine": machine()}, indent=1))
    print(f"wrote {path}")
    return path


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS")), 0)
    except OSError:
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: resident pages, each shared page split among its sharers (forked children share
    most of their parent's pages; summed RSS would count them once per child)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


def tree_rss(root: int, of=rss_bytes) -> int:
    """Resident memory (or `of`: pss_bytes) of a process and all its descendants (from /proc; no psutil here)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += of(pid)
        todo += children.get(pid, [])
    return total


def tiny_cohort(folder: Path, sites: int = 1, exams: int = 16) -> list[Path]:
    """A tiny synthetic cohort written and ingested into folder (reused when it is there already)."""
    from client.ingest import ingest_site
    from client.site import load_site
    from sim.cohort.generate import generate_cohort
    from sim.cohort.presets import build_sites

    if not (folder / "cohort.json").is_file():
        generate_cohort(folder, build_sites("tiny", sites=sites, exams_per_site=exams), seed=0, workers=2)
    dirs = sorted(p for p in folder.glob("site-*") if (p / "site.toml").is_file())
    for p in dirs:
        ingest_site(load_site(p), workers=2)
    return dirs


def rss_bytes_peak() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")), 0)
