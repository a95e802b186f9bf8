"""`m3fm-client predict` on one series of the synthetic cohort (a real DICOM folder, the CLI as a process): answers
for every task of the model; a broken series gets ingestion's reason and a non-zero exit."""

import json
import shutil
import subprocess

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from m3fm.checkpoint import write_checkpoint
from m3fm.data.dicom_series import read_header
from m3fm.data.store import Exam, Series, SourceFile, open_store
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.tasks import TASKS
from transport.flower import flower_bin


def accepted_series(site, tmp_path):
    """The files of one series ingestion accepted, copied into a folder of their own; and its exam's report."""
    engine = open_store(site.database_url)
    with Session(engine) as s:
        series = s.scalars(select(Series).where(Series.status == "accepted").order_by(Series.series_uid)).first()
        files = [f.path for f in s.scalars(select(SourceFile).where(SourceFile.series_uid == series.series_uid))]
        report = s.get(Exam, series.exam_id).report
    engine.dispose()
    folder = tmp_path / "series"
    for i, rel in enumerate(sorted(files)):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site.site_dir / rel, folder / rel)
    (tmp_path / "report.txt").write_text(report or "")
    return folder, series, sorted(files)


def run_predict(*args, timeout=300):
    return subprocess.run([flower_bin("m3fm-client"), "predict", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_predict_answers_every_task_for_one_series_and_refuses_a_broken_one_with_ingestions_reason(ingested, tmp_path):
    _, sites, _ = ingested
    site = sites[0]
    folder, series, files = accepted_series(site, tmp_path)
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "tiny.pt", M3FM(get_config("tiny")).state_dict(), get_config("tiny"))
    done = run_predict(folder, "--model", tmp_path / "tiny.pt", "--text", "The patient is 64.0 years old.",
                       "--report", tmp_path / "report.txt", "--min-slices", site.min_slices, "--out",
                       tmp_path / "answers.json")
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads((tmp_path / "answers.json").read_text())
    assert got["series"] == series.series_uid and set(got["answers"]) == {t.name for t in TASKS}
    for task in TASKS:
        answer = got["answers"][task.name]
        per_lung = task.region in ("lung_slab", "each_lung")
        if task.loss == "hazard":
            risk = (answer["exam"] if per_lung else answer)["risk"]
            assert len(risk) == 6 and all(0 <= r <= 1 for r in risk)
        else:
            for a in (answer["left"], answer["right"]) if per_lung else (answer,):
                assert list(a["answers"]) == list(task.answers) and abs(sum(a["answers"].values()) - 1) < 1e-3
    lung = got["answers"]["lung_cancer_risk"]
    assert lung["exam"]["risk"] == [max(a, b) for a, b in zip(lung["left"]["risk"], lung["right"]["risk"])]
    assert "cvd_diagnosis" in done.stdout

    headers = sorted((read_header(folder / rel, rel) for rel in files), key=lambda h: h.positions[0][2])
    middle = headers[len(headers) // 2]
    for h in headers:  # a slice lost in the middle (with any copy of it stored twice)
        if h.sop_uid == middle.sop_uid:
            (folder / h.path).unlink()
    broken = run_predict(folder, "--model", tmp_path / "tiny.pt", "--min-slices", site.min_slices)
    assert broken.returncode == 2
    said = " ".join(broken.stdout.split())
    assert f"series {series.series_uid}" in said and "rejected (missing_slice): missing slice" in said
