"""The coordinator's run report: site x task AUC, learning curves, epsilon per site, replies that did not count.

Built from the server database alone (server/store.py), so `m3fm-server report`
can write it for any run, finished or not, as often as wanted: it is a view of
the database, which keeps everything, and it is replaced in place. The AUCs
are what sites sent in their reports (client/report.py), already suppressed
where a group was under the site's minimum cell size.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from m3fm.metrics import SUPPRESSED
from m3fm.report_html import figure, new_axes, page, png, table, write_text_atomic
from m3fm.tasks import TASK_INDEX
from server.store import PrivacyLedger, RejectedReply, Round, Run, SiteMetric, SiteReport
from transport.protocol import LOSS

EVALUATE_LOSS = "loss:"  # "loss:<task or objective>": how m3fm/local.py names an evaluation's mean loss


def mean_loss(metrics: dict | None) -> float | None:
    """The mean of a reply's loss.* (training) or loss:* (evaluation) values."""
    losses = [v for k, v in (metrics or {}).items() if k.startswith((LOSS, EVALUATE_LOSS)) and isinstance(v, (int, float))]
    return float(np.mean(losses)) if losses else None


def run_summary(s: Session, run_id: int) -> dict:
    run = s.get(Run, run_id)
    if run is None:
        raise LookupError(f"the server database holds no run {run_id}")
    rounds = list(s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round)))
    curves = [{"round": r.round, "phase": r.phase, "seconds": r.seconds, "sites": r.sites_accepted,
               "train_loss": mean_loss(r.train_metrics), "evaluate_loss": mean_loss(r.evaluate_metrics)}
              for r in rounds]
    per_site = defaultdict(lambda: defaultdict(dict))  # site -> kind -> round -> mean loss
    for m in s.scalars(select(SiteMetric).where(SiteMetric.run_id == run_id)):
        if (v := mean_loss(m.metrics)) is not None:
            per_site[m.site_id][m.kind][m.round] = v
    epsilon = {}
    for row in s.scalars(select(PrivacyLedger).where(PrivacyLedger.run_id == run_id).order_by(PrivacyLedger.round)):
        epsilon[row.site_id] = {"mechanism": row.mechanism, "epsilon": row.epsilon, "delta": row.delta,
                                "round": row.round}
    reports = {r.site_id: r.report for r in
               s.scalars(select(SiteReport).where(SiteReport.run_id == run_id).order_by(SiteReport.id))}
    tasks = sorted({t for rep in reports.values() for t in rep["tasks"]}, key=TASK_INDEX.get)
    auc = {site: {t: rep["tasks"][t]["auc"] for t in tasks if t in rep["tasks"] and "auc" in rep["tasks"][t]}
           for site, rep in sorted(reports.items())}
    rejected = [{"round": r.round, "site_id": r.site_id, "kind": r.kind, "reason": r.reason}
                for r in s.scalars(select(RejectedReply).where(RejectedReply.run_id == run_id).order_by(RejectedReply.id))]
    return {"run_id": run.id, "name": run.name, "status": run.status, "error": run.error,
            "total_rounds": run.total_rounds, "config": run.config, "rounds": curves,
            "site_curves": {site: {k: dict(sorted(v.items())) for k, v in kinds.items()} for site, kinds in per_site.items()},
            "auc": auc, "tasks": tasks, "site_reports": reports, "epsilon": epsilon, "rejected": rejected}


def curve_png(summary: dict, kind: str) -> str | None:
    """Mean loss per round: the weighted mean over sites (thick) and each site (thin)."""
    key = {"train": "train_loss", "evaluate": "evaluate_loss"}[kind]
    points = [(r["round"], r[key]) for r in summary["rounds"] if r[key] is not None]
    if not points:
        return None
    fig, ax = new_axes(6, 3.5)
    ax.plot(*zip(*points), marker="o", lw=2.5, color="black", label="all sites")
    for site, kinds in sorted(summary["site_curves"].items()):
        if kinds.get(kind):
            ax.plot([int(r) for r in kinds[kind]], list(kinds[kind].values()), marker=".", lw=1, label=site)
    for a, b in zip(summary["rounds"], summary["rounds"][1:]):
        if a["phase"] != b["phase"]:  # pretraining (MIM + MLM) and multitask (QA) losses are not comparable
            ax.axvline(a["round"] + 0.5, color="#999", ls=":", lw=1)
    ax.set(xlabel="round", ylabel=f"mean {kind} loss", title=f"{kind} loss per round (dotted: next phase)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return png(fig)


def render_html(summary: dict) -> str:
    tasks = summary["tasks"]
    matrix = table(["site", *tasks], [[site, *[row.get(t, "") for t in tasks]] for site, row in summary["auc"].items()])
    rounds = table(["round", "phase", "sites", "seconds", "mean train loss", "mean evaluation loss"],
                   [[r["round"], r["phase"], r["sites"], float(r["seconds"]), r["train_loss"], r["evaluate_loss"]]
                    for r in summary["rounds"]])
    curves = "".join(figure(img, f"{kind} loss") for kind in ("train", "evaluate") if (img := curve_png(summary, kind)))
    eps = table(["site", "mechanism", "epsilon", "delta", "after round"],
                [[site, e["mechanism"], e["epsilon"], e["delta"], e["round"]] for site, e in summary["epsilon"].items()])
    rejected = table(["round", "site", "kind", "reason"], [[r["round"], r["site_id"], r["kind"], r["reason"]]
                                                          for r in summary["rejected"]])
    about = table(["", ""], [["run", f"{summary['name']} (id {summary['run_id']})"], ["status", summary["status"]],
                             ["error", summary["error"] or ""], ["rounds", summary["total_rounds"]],
                             ["config", json.dumps(summary["config"])]])
    return page(f"M3FM federated run {summary['name']}", [
        ("About", about), ("AUC per site and task (test split; mean over views)", matrix or "<p>no site reports</p>"),
        ("Learning curves", curves or "<p>no losses recorded</p>"), ("Rounds", rounds),
        ("Privacy spent", eps if summary["epsilon"] else "<p>no differential privacy in this run</p>"),
        ("Replies that did not count", rejected if summary["rejected"] else "<p>none</p>")])


def write_run_report(engine, run_id: int, out_dir: Path) -> tuple[Path, Path, dict]:
    with Session(engine) as s:
        summary = run_summary(s, run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "report.json", out_dir / "report.html"
    for path, text in zip(paths, (json.dumps(summary, indent=1, default=str), render_html(summary))):
        write_text_atomic(path, text)
    return *paths, summary


def shown_auc(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else (SUPPRESSED if v == SUPPRESSED else "")
