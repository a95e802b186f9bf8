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

from m3fm.metrics import pooled_auc
from m3fm.report_html import figure, new_axes, page, png, table, write_text_atomic
from m3fm.tasks import TASK_INDEX
from server.store import PrivacyLedger, RejectedReply, Round, Run, SiteMetric, SiteReport
from transport.protocol import LOSS

EVALUATE_LOSS = "loss:"  # "loss:<task or objective>": how m3fm/local.py names an evaluation's mean loss
EVALUATE_AUC = "auc:"  # "auc:<task>": an evaluation's AUC of a yes/no task (m3fm/local.py)


def mean_loss(metrics: dict | None) -> float | None:
    """The mean of a reply's loss.* (training) or loss:* (evaluation) values."""
    losses = [v for k, v in (metrics or {}).items() if k.startswith((LOSS, EVALUATE_LOSS)) and isinstance(v, (int, float))]
    return float(np.mean(losses)) if losses else None


def mean_auc(metrics: dict | None) -> float | None:
    """The mean of an evaluation's auc:<task> values (yes/no tasks whose classes were big enough)."""
    aucs = [v for k, v in (metrics or {}).items() if k.startswith(EVALUATE_AUC) and isinstance(v, (int, float))]
    return float(np.mean(aucs)) if aucs else None


def run_summary(s: Session, run_id: int) -> dict:
    run = s.get(Run, run_id)
    if run is None:
        raise LookupError(f"the server database holds no run {run_id}")
    rounds = list(s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.round)))
    curves = [{"round": r.round, "phase": r.phase, "seconds": r.seconds, "sites": r.sites_accepted,
               "train_loss": mean_loss(r.train_metrics), "evaluate_loss": mean_loss(r.evaluate_metrics),
               "evaluate_auc": mean_auc(r.evaluate_metrics)} for r in rounds]
    per_site = defaultdict(lambda: defaultdict(dict))  # site -> kind -> round -> mean loss (or "auc" -> mean AUC)
    for m in s.scalars(select(SiteMetric).where(SiteMetric.run_id == run_id)):
        if (v := mean_loss(m.metrics)) is not None:
            per_site[m.site_id][m.kind][m.round] = v
        if m.kind == "evaluate" and (v := mean_auc(m.metrics)) is not None:
            per_site[m.site_id]["auc"][m.round] = v
    epsilon = {}
    for row in s.scalars(select(PrivacyLedger).where(PrivacyLedger.run_id == run_id).order_by(PrivacyLedger.round)):
        epsilon[row.site_id] = {"mechanism": row.mechanism, "epsilon": row.epsilon, "delta": row.delta,
                                "round": row.round}
    reports = {r.site_id: r.report for r in
               s.scalars(select(SiteReport).where(SiteReport.run_id == run_id).order_by(SiteReport.id))}
    tasks = sorted({t for rep in reports.values() for t in rep["tasks"]}, key=TASK_INDEX.get)
    auc = {site: {t: rep["tasks"][t]["auc"] for t in tasks if t in rep["tasks"] and "auc" in rep["tasks"][t]}
           for site, rep in sorted(reports.items())}
    auc_ci = {site: {t: rep["tasks"][t]["auc_ci"] for t in tasks
                     if isinstance(rep["tasks"].get(t, {}).get("auc_ci"), list)} for site, rep in sorted(reports.items())}
    rejected = [{"round": r.round, "site_id": r.site_id, "kind": r.kind, "reason": r.reason}
                for r in s.scalars(select(RejectedReply).where(RejectedReply.run_id == run_id).order_by(RejectedReply.id))]
    return {"run_id": run.id, "name": run.name, "status": run.status, "error": run.error,
            "total_rounds": run.total_rounds, "config": run.config, "rounds": curves,
            "site_curves": {site: {k: dict(sorted(v.items())) for k, v in kinds.items()} for site, kinds in per_site.items()},
            "auc": auc, "auc_ci": auc_ci, "pooled": pooled_over_sites(reports, tasks), "tasks": tasks,
            "site_reports": reports, "epsilon": epsilon, "rejected": rejected}


def phase_curves_png(summary: dict, kind: str, phase: str) -> str | None:
    """One phase's mean loss (or, kind "auc", mean validation AUC) per round: the weighted mean over sites (thick)
    and each site (thin). One figure per phase: pretraining (MIM + MLM) and multitask (QA) losses are not
    comparable, so no line joins them."""
    key = {"train": "train_loss", "evaluate": "evaluate_loss", "auc": "evaluate_auc"}[kind]
    in_phase = {r["round"] for r in summary["rounds"] if r["phase"] == phase}
    points = [(r["round"], r[key]) for r in summary["rounds"] if r["round"] in in_phase and r[key] is not None]
    if not points:
        return None
    fig, ax = new_axes(5, 3.2)
    ax.plot(*zip(*points), marker="o", lw=2.5, color="black", label="all sites")
    for site, kinds in sorted(summary["site_curves"].items()):
        mine = sorted((int(r), v) for r, v in kinds.get(kind, {}).items() if int(r) in in_phase)
        if mine:
            ax.plot(*zip(*mine), marker=".", lw=1, label=site)
    what = {"train": "mean training loss", "evaluate": "mean validation loss", "auc": "mean validation AUC"}[kind]
    ax.set(xlabel="round", ylabel=what, title=f"{phase}: {what}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return png(fig)


def flat(config: dict, prefix: str = "") -> list[list]:
    """A nested run configuration as (field, value) rows: `pretrain.rounds`, `strategy.name`, ..."""
    rows = []
    for k, v in config.items():
        if isinstance(v, dict):
            rows += flat(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):  # the phases
            for x in v:
                rows += flat({f: y for f, y in x.items() if f != "name"}, f"{prefix}{x['name']}.")
        else:
            rows.append([f"{prefix}{k}", ", ".join(map(str, v)) if isinstance(v, list) else v])
    return rows


def pooled_over_sites(reports: dict[str, dict], tasks: list[str]) -> dict[str, dict]:
    """Per yes/no task that two or more sites could score: the fixed-effect meta-analysis of their AUCs
    (m3fm.metrics.pooled_auc), built from what each site sent (AUC and DeLong standard error, never scores)."""
    pooled = {}
    for t in tasks:
        views = [rep["tasks"][t] for rep in reports.values() if isinstance(rep["tasks"].get(t, {}).get("auc_se"), float)]
        if len(views) >= 2:
            pooled[t] = pooled_auc([v["auc"] for v in views], [v["auc_se"] for v in views])
    return pooled


def auc_cell(summary: dict, site: str, task: str):
    """'0.812 [0.70, 0.92]' where the site sent a CI, else the AUC (or suppressed)."""
    v, ci = summary["auc"][site].get(task, ""), summary.get("auc_ci", {}).get(site, {}).get(task)
    return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(v, float) and ci else v


def auc_matrix(summary: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of the AUC matrix: tasks down, sites across (17 tasks fit a page's height, not its width)."""
    sites, pooled = list(summary["auc"]), summary.get("pooled", {})

    def across(t: str) -> str:
        p = pooled.get(t)
        return f"{p['auc']:.3f} [{p['auc_ci'][0]:.2f}, {p['auc_ci'][1]:.2f}] I² {p['i2']:.0%}" if p else ""
    return (["task", *sites, *(["all sites (fixed-effect)"] if pooled else [])],
            [[t, *[auc_cell(summary, site, t) for site in sites], *([across(t)] if pooled else [])]
             for t in summary["tasks"]])


def above_chance(summary: dict) -> list[tuple[str, str, float]]:
    """(site, task, lower CI bound) wherever a site's test AUC is above 0.5 with 95% confidence."""
    return [(site, t, ci[0]) for site, cis in summary.get("auc_ci", {}).items() for t, ci in cis.items() if ci[0] > 0.5]


def pooled_above_chance(summary: dict) -> list[tuple[str, float]]:
    """(task, lower CI bound) wherever the sites' pooled AUC is above 0.5 with 95% confidence."""
    return [(t, p["auc_ci"][0]) for t, p in summary.get("pooled", {}).items() if p["auc_ci"][0] > 0.5]


def render_html(summary: dict) -> str:
    sites = list(summary["auc"])
    matrix = table(*auc_matrix(summary))
    rounds = table(["round", "phase", "sites", "seconds", "mean train loss", "mean validation loss",
                    "mean validation AUC"],
                   [[r["round"], r["phase"], r["sites"], float(r["seconds"]), r["train_loss"], r["evaluate_loss"],
                     r["evaluate_auc"]] for r in summary["rounds"]])
    phases = list(dict.fromkeys(r["phase"] for r in summary["rounds"]))
    curves = "".join(figure(img, f"{phase}: {kind}") for kind in ("train", "evaluate") for phase in phases
                     if (img := phase_curves_png(summary, kind, phase)))
    aucs = "".join(figure(img, f"{phase}: validation AUC") for phase in phases
                   if (img := phase_curves_png(summary, "auc", phase)))
    eps = table(["site", "mechanism", "epsilon", "delta", "after round"],
                [[site, e["mechanism"], e["epsilon"], e["delta"], e["round"]] for site, e in summary["epsilon"].items()])
    rejected = table(["round", "site", "kind", "reason"], [[r["round"], r["site_id"], r["kind"], r["reason"]]
                                                          for r in summary["rejected"]])
    about = table(["", ""], [["run", f"{summary['name']} (id {summary['run_id']})"], ["status", summary["status"]],
                             ["error", summary["error"] or ""], ["rounds", summary["total_rounds"]]])
    config = table(["setting", "value"], flat(summary["config"] or {}))
    return page(f"M3FM federated run {summary['name']}", [
        ("About", about),
        ("AUC per task and site (test split, 95% DeLong CI; mean over views for multi-answer tasks; all sites: "
         "fixed-effect meta-analysis of the sites' yes/no AUCs, I² the share of their spread beyond chance)",
         matrix if sites else "<p>no site reports</p>"),
        ("Learning curves (one figure per phase)", curves or "<p>no losses recorded</p>"),
        ("Validation AUC over rounds (where evaluation ran)", aucs or "<p>no evaluation with an AUC in this run</p>"),
        ("Rounds", rounds), ("Configuration", config),
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


def auc_table(summary: dict):
    """The AUC matrix as a rich Table for a terminal (`m3fm-server report`, `m3fm-sim run`)."""
    from rich.table import Table

    headers, rows = auc_matrix(summary)
    t = Table(title=f"run {summary['run_id']} {summary['name']!r} ({summary['status']}): test AUC [95% CI] per task "
                    "and site")
    for h in headers:
        t.add_column(h)
    for row in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    return t
