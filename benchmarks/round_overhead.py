"""Federation overhead per round on loopback: (round wall time - slowest site's compute) / slowest site's compute,
through the real processes (`m3fm-server run`: SuperLink + ServerApp; one `m3fm-client start` per site), on the
ingested tiny cohort.

  python benchmarks/round_overhead.py [--local-steps 2] [--work /tmp/m3fm-bench]

Rounds 1-2 pretrain and round 3 multitask, no evaluation between rounds (the last round always evaluates, so its
overhead includes the evaluation messages). Round wall time is the server's (send, wait, aggregate, checkpoint);
site compute is the seconds each site's training reply reports. What is left is transport, Flower's message
handling, and starting a ClientApp process per message. A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import load_server_config
from server.store import Round, Run, SiteMetric, open_server_store
from sim.federation import run_deployment, write_server_toml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    args = ap.parse_args()
    sites = common.tiny_cohort(args.work / "fed-cohort", sites=3, exams=16)
    out = Path(tempfile.mkdtemp(prefix="overhead-", dir=args.work))
    plan = {"evaluate_every": 0, "pretrain": {"rounds": 2, "local_steps": args.local_steps},
            "multitask": {"rounds": 1, "local_steps": args.local_steps}}
    toml = write_server_toml(out / "server.toml", "overhead", "tiny", len(sites), plan, site_reports=False)
    code = run_deployment(toml, sites, out, log=print, max_s=1200)
    if code != 0:
        raise SystemExit(f"the run failed (exit {code}); logs in {out / 'logs'}")
    engine = open_server_store(load_server_config(toml).database_url)
    rows = []
    with Session(engine) as s:
        run = s.scalars(select(Run).order_by(Run.id.desc())).first()
        for r in s.scalars(select(Round).where(Round.run_id == run.id).order_by(Round.round)):
            compute = [m.metrics["seconds"] for m in s.scalars(select(SiteMetric).where(
                SiteMetric.run_id == run.id, SiteMetric.round == r.round, SiteMetric.kind == "train"))]
            slowest = max(compute)
            rows.append({"round": r.round, "phase": r.phase, "sites": r.sites_accepted,
                         "evaluates": r.evaluate_metrics is not None, "round_s": r.seconds,
                         "slowest_site_compute_s": slowest, "overhead_s": r.seconds - slowest,
                         "overhead_ratio": (r.seconds - slowest) / slowest})
    engine.dispose()
    common.report("round_overhead", "federation overhead per round, loopback, real processes", rows,
                  {"local_steps": args.local_steps, "sites": len(sites)})


if __name__ == "__main__":
    main()
