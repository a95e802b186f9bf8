"""Site reports and the run report: a tiny federated run (in process) whose sites evaluate the final model on
their test split, write report.json/report.html, and send the coordinator only aggregates."""

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.app import app as client_app
from client.ingest import ingest_site
from client.site import load_site
from m3fm.metrics import SUPPRESSED, roc_views
from server.config import load_server_config
from transport.flower import flower_bin, flower_env
from server.rounds import run_federation
from server.store import SiteReport, open_server_store
from sim.cohort.generate import generate_cohort
from sim.cohort.presets import build_sites
from sim.inprocess_grid import InProcessGrid

VOID = {"meta", "img", "br", "hr", "input", "link"}


class StrictHTML(HTMLParser):
    """Fails on a closing tag that does not match the open one; counts images and their data URLs."""

    def __init__(self):
        super().__init__()
        self.stack, self.images = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def parse_html(path: Path) -> StrictHTML:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    p = StrictHTML()
    p.feed(text)
    p.close()
    assert p.stack == [], f"unclosed tags {p.stack}"
    return p


@pytest.fixture(scope="module")
def report_cohort(tmp_path_factory):
    """Two tiny sites with half their patients in the test split and a minimum cell size of 3, so some tasks
    have both classes big enough for an AUC and others are suppressed."""
    out = tmp_path_factory.mktemp("report-cohort")
    generate_cohort(out, build_sites("tiny", sites=2, exams_per_site=30), seed=1, workers=2)
    sites = []
    for p in sorted(out.glob("site-*")):
        toml = p / "site.toml"
        text = toml.read_text().replace("min_cell_size = 5", "min_cell_size = 3")
        toml.write_text(text.replace('model_config = "tiny"',
                                     'model_config = "tiny"\nsplits = { train = 0.4, val = 0.1, test = 0.5 }'))
        site = load_site(p)
        ingest_site(site, workers=2)
        sites.append(site)
    return out, sites


def test_a_tiny_run_ends_with_site_reports_and_a_run_report(report_cohort, tmp_path):
    _, sites = report_cohort
    (tmp_path / "server.toml").write_text("""
[run]
name = "rep"
model = "tiny"
min_sites = 2
evaluate_every = 0
out_dir = "runs"
[pretrain]
rounds = 1
local_steps = 1
[multitask]
rounds = 1
local_steps = 2
""")
    cfg = load_server_config(tmp_path / "server.toml")
    grid = InProcessGrid(client_app, {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)})
    run_id = run_federation(grid, cfg, log=lambda *_: None)

    images_total = 0
    for site in sites:
        folder = site.work_dir / "reports" / f"rep-{run_id:04d}-round-0002"
        report = json.loads((folder / "report.json").read_text())
        assert report["split"] == "test" and report["min_cell_size"] == 3
        assert (site.work_dir / "models" / f"rep-{run_id:04d}-round-0002.pt").is_file()  # the site keeps the final model
        with_curves = [t for t, m in report["tasks"].items() if roc_views(m)]
        page = parse_html(folder / "report.html")
        assert len(page.images) == len(with_curves)  # one ROC figure per evaluated task
        assert all(src.startswith("data:image/png;base64,") for src in page.images)  # self-contained
        images_total += len(with_curves)
        for name, m in report["tasks"].items():
            views = [m] if "auc_ci" in m else list((m.get("answers") or m.get("years") or {}).values())
            for v in views:  # a small group never shows a number
                small = v["positives"] == SUPPRESSED or v["n"] == SUPPRESSED or v["positives"] in (0, v["n"])
                assert (v["auc"] == SUPPRESSED) == small, (site.site_id, name, v)
                if v["auc"] != SUPPRESSED:
                    assert v["positives"] >= 3 and v["n"] - v["positives"] >= 3
                    assert v["auc_ci"][0] <= v["auc"] <= v["auc_ci"][1]
        assert "suppressed" in (folder / "report.html").read_text()
    assert images_total >= 2

    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        reports = {r.site_id: r.report for r in s.scalars(select(SiteReport).where(SiteReport.run_id == run_id))}
    engine.dispose()
    assert set(reports) == {s.site_id for s in sites}
    sent = json.dumps(reports)
    assert '"roc"' not in sent and '"fpr"' not in sent and "exam" not in sent  # aggregates only

    run_dir = cfg.out_dir / f"run-{run_id:04d}"
    summary = json.loads((run_dir / "report.json").read_text())
    assert set(summary["auc"]) == set(reports)
    assert summary["auc"][sites[0].site_id]["nodule_presence"] == reports[sites[0].site_id]["tasks"]["nodule_presence"]["auc"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["rounds"][0]["train_loss"] > 0
    page = parse_html(run_dir / "report.html")
    assert len(page.images) >= 2  # a training-loss figure per phase: the two phases' losses are never joined
    text = (run_dir / "report.html").read_text()
    assert "<th>task</th>" in text and "pretrain.local_steps" in text and "multitask.rounds" in text
    with_ci = [(site, t) for site, cis in summary["auc_ci"].items() for t in cis]
    pooled = summary["pooled"]  # the meta-analysis of every yes/no task two or more sites scored, and no other
    both = [t for t in summary["tasks"] if sum(isinstance(r["tasks"].get(t, {}).get("auc_se"), float)
                                                for r in reports.values()) >= 2]
    assert sorted(pooled) == sorted(both)
    for t, p in pooled.items():
        aucs = [r["tasks"][t]["auc"] for r in reports.values() if isinstance(r["tasks"].get(t, {}).get("auc_se"), float)]
        assert p["sites"] == len(aucs) and min(aucs) - 1e-9 <= p["auc"] <= max(aucs) + 1e-9
    assert with_ci and len(re.findall(r"\d\.\d{3} \[\d\.\d{2}, \d\.\d{2}\]", text)) == len(with_ci) + len(pooled)

    # the same through the command lines: a site's report of the coordinator's checkpoint, never overwritten
    out = tmp_path / "cli-report"
    cmd = [flower_bin("m3fm-client"), "report", "--site", str(sites[0].site_dir),
           "--model", str(run_dir / "round-0002.pt"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nodule_presence" in done.stdout and (out / "report.html").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(), timeout=300)
    assert again.returncode == 2 and "already exists" in again.stdout
    server = subprocess.run([flower_bin("m3fm-server"), "report", str(run_id), "--config", str(tmp_path / "server.toml")],
                            capture_output=True, text=True, env=flower_env(), timeout=300)
    assert server.returncode == 0, server.stdout + server.stderr
    assert sites[0].site_id in server.stdout and re.search(r"nodule_presence .*\d\.\d{3}", server.stdout)
    assert "report.html" in server.stdout.replace("\n", "")


def test_sim_compare_prints_and_saves_mean_auc_per_task_group_for_every_arm(report_cohort, tmp_path):
    cohort_dir, sites = report_cohort
    done = subprocess.run([flower_bin("m3fm-sim"), "compare", "--cohort", str(cohort_dir), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=flower_env(), timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert list(summary["arms"]) == ["federated", "federated-scratch", "centralized", "local-only"]
    for arm, result in summary["arms"].items():
        assert re.search(rf"{arm}\s.*\d\.\d{{3}}", done.stdout), arm  # a row with numbers in the printed table
        assert set(result["sites"]) == {s.site_id for s in sites}
        assert isinstance(result["groups"]["nodule"], float) and 0 <= result["groups"]["mean"] <= 1
    # the federated arms ran the real round loop; the scratch arm had no pretraining round
    assert (tmp_path / "runs-federated" / "run-0001" / "round-0002.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "runs-federated-scratch" / "run-0001").glob("round-*.pt")) == ["round-0001.pt"]
    assert (tmp_path / "compare.md").read_text().count("\n") == 6
