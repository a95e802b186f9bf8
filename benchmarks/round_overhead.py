"""A round's fixed cost on loopback: round wall time minus the slowest site's compute, through the real processes
(`m3fm-server run`: SuperLink + ServerApp; one `m3fm-client start` per site, each with its warm service), on the
ingested tiny cohort, and where it goes.

  python benchmarks/round_overhead.py [--rounds 6] [--local-steps 2] [--sites 3] [--work /tmp/m3fm-bench]

Two pretraining rounds, then multitask rounds, no evaluation (the README main job's shape). Round wall time is
the coordinator's (wait for sites, send, wait, aggregate, checkpoint); compute is the seconds each site's reply
reports for its local training. The breakdown per round (seconds):
  wait sites              from the round's start until min_sites are connected (the first round: the sites'
                          SuperNodes joining the run; part of the round's time, not of any message's)
  to first / last reply   from the round's start (sites connected, messages configured and pushed)
  to clientapp            from the push to the last ClientApp process's start: SuperLink, the SuperNode's pull
                          of the message (it looks every 0.25 s), the SuperExec's look for a task (0.1 s)
  clientapp               the slowest ClientApp process's age when it asked its service: the fork of the
                          site's warm SuperExec (transport/superexec.py), the task's pull from the SuperNode
  service - compute       the service's request beyond training: weights in, weights out
  relay - service         the channel between ClientApp and service
  reply path              from the last relay's answer to the coordinator having the last reply: the reply's
                          way out of the ClientApp, the SuperNode's push, the SuperLink, the coordinator's pull
  after last reply        aggregation of the last reply, the checkpoint and the database commit
A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.config import load_server_config
from server.store import Round, RoundTiming, Run, SiteMetric, open_server_store
from sim.federation import run_deployment, write_server_toml
from transport.protocol import CLIENTAPP_AGE, CLIENTAPP_STARTED, RELAY_ANSWERED, RELAY_TIME, SECONDS, SERVICE_TIME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds in all (2 pretraining, the rest multitask)")
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--sites", type=int, default=3, help="tiny sites (3 share this machine's 2 cores)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    args = ap.parse_args()
    sites = common.tiny_cohort(args.work / "fed-cohort", sites=3, exams=16)[:args.sites]
    out = Path(tempfile.mkdtemp(prefix="overhead-", dir=args.work))
    plan = {"evaluate_every": 0, "pretrain": {"rounds": 2, "local_steps": args.local_steps},
            "multitask": {"rounds": args.rounds - 2, "local_steps": args.local_steps}}
    toml = write_server_toml(out / "server.toml", "overhead", "tiny", len(sites), plan, site_reports=False)
    code = run_deployment(toml, sites, out, log=print, max_s=1200)
    if code != 0:
        raise SystemExit(f"the run failed (exit {code}); logs in {out / 'logs'}")
    engine = open_server_store(load_server_config(toml).database_url)
    rows = []
    with Session(engine) as s:
        run = s.scalars(select(Run).order_by(Run.id.desc())).first()
        timings = {t.round: t.marks for t in s.scalars(select(RoundTiming).where(RoundTiming.run_id == run.id))}
        for r in s.scalars(select(Round).where(Round.run_id == run.id).order_by(Round.round)):
            sites = [m.metrics for m in s.scalars(select(SiteMetric).where(
                SiteMetric.run_id == run.id, SiteMetric.round == r.round, SiteMetric.kind == "train"))]
            slowest = max(sites, key=lambda m: m[SECONDS])
            marks = timings.get(r.round, {})
            pushed = marks.get("start_unix", 0.0) + marks.get("configured", 0.0)  # messages go out right after
            rows.append({"round": r.round, "phase": r.phase, "sites": r.sites_accepted, "round_s": r.seconds,
                         "compute_s": slowest[SECONDS], "fixed_s": r.seconds - slowest[SECONDS],
                         "wait_sites_s": marks.get("sites"), "first_reply_s": marks.get("first_reply"), "last_reply_s": marks.get("last_reply"),
                         "to_clientapp_s": max(m.get(CLIENTAPP_STARTED, 0.0) for m in sites) - pushed,
                         "clientapp_s": max(m.get(CLIENTAPP_AGE, 0.0) for m in sites),
                         "service_minus_compute_s": max(m.get(SERVICE_TIME, 0.0) - m[SECONDS] for m in sites),
                         "relay_minus_service_s": max(m.get(RELAY_TIME, 0.0) - m.get(SERVICE_TIME, 0.0) for m in sites),
                         "reply_path_s": marks.get("start_unix", 0.0) + marks.get("last_reply", 0.0)
                         - max(m.get(RELAY_ANSWERED, 0.0) for m in sites),
                         "after_last_reply_s": r.seconds - marks.get("last_reply", r.seconds)})
    engine.dispose()
    fixed = sorted(r["fixed_s"] for r in rows)
    common.report("round_overhead", "a round's fixed cost, loopback, real processes, warm site services", rows,
                  {"local_steps": args.local_steps, "sites": len(sites), "median_fixed_s": fixed[len(fixed) // 2]})


if __name__ == "__main__":
    main()
