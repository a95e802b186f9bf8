"""A site's evaluation report: metrics per task on its test split, written as report.json and report.html.

The site keeps everything (ROC curve points included). What it sends to the
coordinator (`shareable`) is the metrics without curves, the split's size and
the privacy it spent: aggregates only, and every group under the site's
minimum cell size already shows "suppressed" (m3fm/metrics.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from client.federated import OpenSite, ensure_ingested
from client.site import SiteConfig, report_name
from m3fm.checkpoint import load_checkpoint, read_checkpoint, write_checkpoint
from m3fm.data.datasets import SiteData
from m3fm.evaluation import evaluate_tasks
from m3fm.metrics import SUPPRESSED, binary_views, roc_views, without_curves
from m3fm.model.configs import M3FMConfig
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.report_html import figure, page, roc_png, table, write_text_atomic
from m3fm.tasks import TASK_INDEX
from privacy.accounting import MECHANISM, PrivacyLedger
from transport.protocol import ReportConfig


class ReportError(RuntimeError):
    """The report cannot be written: no model, an occupied output folder."""


def privacy_spent(site: SiteConfig) -> dict:
    """The site's DP-SGD spend from its own accountant (privacy/dp_sgd.py): total epsilon at the last delta."""
    ledger = PrivacyLedger(site.work_dir)
    if not ledger.rounds:
        return {"mechanism": "none", "epsilon": 0.0, "private_rounds": 0}
    last = ledger.rounds[-1]
    mechanism = MECHANISM if not ledger.item_level_rounds else f"{MECHANISM}, with older per-item rounds (not a bound)"
    return {"mechanism": mechanism, "epsilon": float(last["epsilon"]), "delta": float(last["delta"]),
            "private_rounds": len(ledger.rounds), "runs": sorted({str(r["run"]) for r in ledger.rounds})}


def build_report(site: SiteConfig, model: M3FM, model_source: dict, split: str = "test", threshold: float = 0.5,
                 data: SiteData | None = None) -> dict:
    """data: the site's datasets when the caller has them open already (they are read from its database)."""
    summary = ensure_ingested(site)
    data = data or SiteData(site.database_url, site.work_dir, model.cfg)
    tasks = evaluate_tasks(model, data, load_tokenizer(model.cfg, site.tokenizer), site.min_cell_size, split, threshold, roc=True)
    return {"site_id": site.site_id, "site_name": site.name, "created_at": datetime.now(timezone.utc).isoformat(),
            "model": model_source, "split": split, "min_cell_size": site.min_cell_size, "threshold": threshold,
            "data": summary, "privacy": privacy_spent(site),
            "tasks": dict(sorted(tasks.items(), key=lambda kv: TASK_INDEX[kv[0]]))}


def shareable(report: dict) -> dict:
    """What the coordinator gets: metrics without curves, privacy spent; no ingestion details."""
    keep = ("site_id", "created_at", "model", "split", "min_cell_size", "threshold", "privacy")
    return {**{k: report[k] for k in keep}, "tasks": without_curves(report["tasks"])}


def task_rows(tasks: dict) -> list[list]:
    """One row per binary view: task, view, n, positives, AUC, 95% CI, calibration, sensitivity, specificity."""
    rows = []
    for name, m in tasks.items():
        views = binary_views(m)
        if not views:  # the numeric retrieval task: no AUC
            rows.append([name, "MAE " + (f"{m['mean_absolute_error']:.1f}" if m["mean_absolute_error"] != SUPPRESSED
                                        else SUPPRESSED), m["n"], "", "", "", "", "", ""])
        for label, v in views.items():
            rows.append([name, label, v["n"], v["positives"], v["auc"], v["auc_ci"], v["calibration_error"],
                         v["sensitivity"], v["specificity"]])
    return rows


def render_html(report: dict) -> str:
    tasks = report["tasks"]
    headline = [[n, m["group"], m["n"], m.get("auc", "")] for n, m in tasks.items()]
    figures = "".join(figure(roc_png(n, curves), n) for n, m in tasks.items() if (curves := roc_views(m)))
    p = report["privacy"]
    privacy = (table(["mechanism", "epsilon", "delta", "private rounds"],
                     [[p["mechanism"], p["epsilon"], p.get("delta", ""), p["private_rounds"]]]))
    d = report["data"]
    data = table(["field", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in d.items()])
    about = table(["", ""], [["site", f"{report['site_name']} ({report['site_id']})"], ["split", report["split"]],
                             ["model", json.dumps(report["model"])], ["minimum cell size", report["min_cell_size"]],
                             ["threshold", report["threshold"]], ["written", report["created_at"]]])
    return page(f"M3FM evaluation: {report['site_name']}", [
        ("About", about),
        ("AUC per task", table(["task", "group", "n", "AUC (mean over views)"], headline)),
        ("Per view, with DeLong 95% CI", table(["task", "view", "n", "positives", "AUC", "95% CI", "calibration error",
                                                 "sensitivity", "specificity"], task_rows(tasks))),
        ("ROC curves", figures or "<p>no task has both classes above the minimum cell size</p>"),
        ("Privacy spent", privacy), ("Data (ingestion summary)", data)])


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """report.json and report.html in out_dir; an existing report there is never overwritten."""
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    for p in (json_path, html_path):
        if p.exists():
            raise ReportError(f"{p} already exists; choose another --out folder (reports are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in ((json_path, json.dumps(report, indent=1)), (html_path, render_html(report))):
        write_text_atomic(path, text)
    return json_path, html_path


def load_model(path: Path) -> tuple[M3FM, dict]:
    """A model from an m3fm checkpoint (a site's received model or a coordinator round) -> (model, source)."""
    payload = read_checkpoint(path)
    try:
        cfg = M3FMConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{path}: its model configuration cannot be read ({type(e).__name__}: {e})") from None
    model = M3FM(cfg)
    load_checkpoint(path, model, payload=payload)
    extra = payload.get("extra") or {}
    return model, model_source(path, cfg.name, extra.get("run_name", ""), extra.get("round", payload.get("step", 0)),
                               extra.get("tokenizer", ""))


def model_source(path: Path, config: str, run: str, server_round: int, tokenizer: str = "") -> dict:
    """Which model a report evaluated (and the fingerprint of the tokenizer it was trained with, when recorded)."""
    return {"checkpoint": str(path), "config": config, "run": run, "round": server_round, "tokenizer": tokenizer}



def latest_model(site: SiteConfig) -> Path:
    found = sorted((site.work_dir / "models").glob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ReportError(f"site {site.site_id} holds no model in {site.work_dir / 'models'}: take part in a run "
                          "(the coordinator sends the final model) or pass --model CHECKPOINT")
    return found[-1]


def report_round(o: OpenSite, config: dict) -> dict:
    """The coordinator's end-of-run request, the final weights already in `o.model`: keep the final model, write
    the site's report, return what is shared. Asked again (a resumed run, another coordinator's run of the same
    name), the site writes beside, never over."""
    site, rc = o.site, ReportConfig.from_config(config)
    run_name, server_round = rc.run_name or "run", rc.server_round
    name = report_name(run_name, rc.run_id, server_round)
    out_dir = unused(site.work_dir / "reports" / name)
    model_path = unused(site.work_dir / "models" / f"{name}.pt")
    write_checkpoint(model_path, o.model.state_dict(), o.model.cfg, step=server_round,
                     extra={"run_name": run_name, "round": server_round})
    report = build_report(site, o.model, model_source(model_path, o.model.cfg.name, run_name, server_round),
                          rc.split, rc.threshold, data=o.data)
    write_report(report, out_dir)
    return shareable(report)


def unused(path: Path) -> Path:
    """path, or path-2, path-3, ... : the first that does not exist yet."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
