"""Write a synthetic multi-hospital cohort: one folder per site in the layout docs/ingestion.md gives.

  SITE/site.toml     site id, name, labelled tasks, privacy ceiling, scanner, storage
  SITE/dicom/        CT series as scanner exports (nested folders, series interleaved)
  SITE/clinical.csv  one row per exam: the paper's clinical elements, with missing values
  SITE/reports/      one free-text report per exam
  SITE/labels.csv    exam_id, task, answer, years_to_event, censored, side

Ground truth that a hospital would not have (where each finding was drawn) goes
to OUT/truth/SITE.json, outside the site folders. Every exam draws from its own
random stream (seed, site, exam), so the same seed writes the same bytes and
exams can be rendered in parallel.
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import tomli_w

from m3fm.data.clinical import CLINICAL_SCHEMA, LABEL_COLUMNS
from m3fm.tasks import get_task
from sim.cohort.dicom_writer import SeriesInfo, uid, write_series
from sim.cohort.patients import CANCERS, DISEASES, RELATIVES, ExamFindings, Patient, exam_findings, sample_patient
from sim.cohort.phantom import Chest, body_for, make_grid
from sim.cohort.presets import SiteProfile
from sim.cohort.reports import lung_rads, report_text

CLINICAL_COLUMNS = list(CLINICAL_SCHEMA)  # the columns ingestion checks, in its order
SIZE_EDGES = (4, 6, 8, 15, 30)
ATTENUATION = {"solid": 0, "ground_glass": 1, "part_solid": 2}
MARGIN = {"spiculated": 0, "smooth": 1, "poorly_defined": 2, "unable": 3}
YES_NO_FINDING = {
    "atelectasis": "atelectasis", "pleural_thickening_effusion": "pleural", "hilar_mediastinal_mass": "hilar_mass",
    "chest_wall_abnormality": "chest_wall", "consolidation": "consolidation", "covid19": "covid",
}


@dataclass
class ExamPlan:
    site_index: int
    exam_index: int
    patient: Patient
    k: int  # the patient's k-th yearly exam
    exam_id: str
    study_date: date


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def plan_site(site: SiteProfile, site_index: int, seed: int) -> list[ExamPlan]:
    """Patients with one to three yearly screens, until the site's exam count is reached."""
    rng = np.random.default_rng([seed, site_index, 0])
    plans: list[ExamPlan] = []
    i = 0
    while len(plans) < site.exams:
        wanted = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        p = sample_patient(rng, site, i)
        first = date(2016, 1, 4) + timedelta(days=int(rng.integers(0, 3 * 365)))
        # screening stops once cancer is found, the patient dies, or follow-up ends
        stop = min(p.cancer_years, p.cvd_death_years, p.follow_up_years)
        for k in range(wanted):
            if k >= stop or len(plans) >= site.exams:
                break
            plans.append(ExamPlan(site_index, len(plans), p, k, f"{p.patient_id}E{k + 1}", first + timedelta(days=365 * k)))
        i += 1
    return plans


def clinical_row(plan: ExamPlan) -> dict:
    p, k = plan.patient, plan.k
    age = p.age + k
    row = {"patient_id": p.patient_id, "exam_id": plan.exam_id, "study_date": plan.study_date.isoformat(),
           "age": round(age, 1), "gender": p.sex, "race": p.race, "ethnicity": p.ethnicity,
           "height_in": p.height_in, "weight_lb": p.weight_lb, "education": p.education,
           "smoking_status": p.smoking, "pack_years": p.pack_years, "cigarettes_per_day": p.cigs_per_day,
           "years_since_quit": None if p.years_since_quit is None else p.years_since_quit + k}
    row.update({f"dx_{d}_age": p.diseases.get(d) for d in DISEASES})
    row.update({f"cancer_{c}_age": p.cancers.get(c) for c in CANCERS})
    row.update({f"family_lc_{r}": int(r in p.family) for r in RELATIVES})
    return {k_: _fmt(v) for k_, v in row.items()}


def label_rows(plan: ExamPlan, f: ExamFindings, site: SiteProfile, rads: str, rng: np.random.Generator,
               nodule_z: float | None = None) -> list[dict]:
    p, k = plan.patient, plan.k
    rows = []

    def add(task: str, answer: str = "", years: float | None = None, censored: int | None = None, side: str = "",
            z: float | None = None):
        if task in site.tasks:
            if answer:
                assert answer in get_task(task).answers, (task, answer)
            rows.append({"exam_id": plan.exam_id, "task": task, "answer": answer,
                         "years_to_event": "" if years is None else f"{years:.2f}",
                         "censored": "" if censored is None else str(censored), "side": side,
                         "slice_location": "" if z is None else f"{z:.1f}"})

    yes_no = lambda b: "Yes" if b else "No"  # noqa: E731
    n = f.nodule
    side = "" if n is None else n.side
    add("nodule_presence", yes_no(n is not None), side=side, z=nodule_z)
    if n is not None:
        add("nodule_location", n.lobe, side=side, z=nodule_z)
        add("nodule_attenuation", get_task("nodule_attenuation").answers[ATTENUATION[n.attenuation]], side=side, z=nodule_z)
        add("nodule_margin", get_task("nodule_margin").answers[MARGIN[n.margin]], side=side, z=nodule_z)
        add("nodule_size", get_task("nodule_size").answers[sum(n.diameter_mm > e for e in SIZE_EDGES)], side=side,
            z=nodule_z)
    add("cvd_diagnosis", yes_no(p.cvd))
    follow = p.follow_up_years - k
    death = p.cvd_death_years - k
    add("cvd_mortality", years=min(death, follow), censored=int(death > follow))
    cancer = p.cancer_years - k
    side = n.side if n is not None and n.malignant else str(rng.choice(["left", "right"]))
    add("lung_cancer_risk", years=min(cancer, follow), censored=int(cancer > follow),
        side=side if cancer <= follow else "")
    for task, attr in YES_NO_FINDING.items():
        add(task, yes_no(getattr(f, attr)))
    add("emphysema", yes_no(f.emphysema > 0))
    add("reticular_fibrosis_scar", yes_no(f.fibrosis))
    add("lung_rads", rads)
    return rows


def render_exam(plan: ExamPlan, site: SiteProfile, seed: int, site_dir: Path) -> dict:
    """Draw, scan and write one exam's series; return its CSV rows, report and ground truth."""
    rng = np.random.default_rng([seed, plan.site_index, plan.exam_index + 1])
    p = plan.patient
    f = exam_findings(rng, p, plan.k, site, plan.exam_index)
    body = body_for(p)
    if site.pixel_spacing[1] > 0:
        pixel = round(float(rng.uniform(*site.pixel_spacing)), 3)
    else:  # coarse presets: the field of view just covers the body
        pixel = round(2 * (body.half_width + 12) / site.matrix, 3)
    thickness = float(rng.choice(site.slice_thickness))
    grid = make_grid(body, site.matrix, pixel, thickness)
    chest = Chest(p, grid, rng)
    chest.draw_anatomy()
    where = chest.draw_findings(f)
    hu = chest.scan(site.scanner.blur_mm, site.scanner.noise_hu)

    study_uid = uid(seed, site.site_id, plan.exam_id, "study")
    date_s = plan.study_date.strftime("%Y%m%d")
    folders = [Path(p.patient_id) / date_s / f"DIR{i:03d}" for i in range(1, int(rng.integers(2, 4)) + 1)]
    series = [("AXIAL LUNG", hu, grid.z, thickness)]
    if rng.random() < site.second_series_fraction and hu.shape[0] >= 4:
        thick = hu[: hu.shape[0] // 2 * 2].reshape(-1, 2, *hu.shape[1:]).mean(axis=1)  # a thicker reconstruction
        series.append(("AXIAL THICK", thick, grid.z[: hu.shape[0] // 2 * 2].reshape(-1, 2).mean(axis=1), 2 * thickness))
    written = []
    for number, (description, volume, z, thick_mm) in enumerate(series, start=1):
        info = SeriesInfo(p.patient_id, p.sex, p.age + plan.k, study_uid, uid(seed, site.site_id, plan.exam_id, number),
                          uid(seed, site.site_id, plan.exam_id, "frame"), date_s,
                          plan.exam_id,  # the accession number links a series to its clinical.csv row
                          number, description, site.name)
        write_series(volume, z, float(grid.y[0]), float(grid.x[0]), (thick_mm, pixel, pixel), thick_mm, site.scanner,
                     info, site_dir / "dicom", folders, (seed, site.site_id, plan.exam_id, number))
        written.append({"series_uid": info.series_uid, "slices": int(volume.shape[0]), "thickness": thick_mm})
    rads = lung_rads(f.nodule)
    return {
        "clinical": clinical_row(plan),
        "labels": label_rows(plan, f, site, rads, rng, where["nodule"][0] if "nodule" in where else None),
        "report": report_text(f, rng),
        "truth": {"exam_id": plan.exam_id, "pixel_spacing": pixel, "slice_thickness": thickness,
                  "series": written, "findings": {k: [round(c, 1) for c in v] for k, v in where.items()},
                  "nodule": None if f.nodule is None else vars(f.nodule), "emphysema": f.emphysema,
                  "lung_rads": rads, "heart_center": [round(c, 1) for c in chest.heart_center]},
    }


def _render(args):
    return render_exam(*args)


def site_toml(site: SiteProfile, seed: int) -> dict:
    sc = site.scanner
    ingest = {"min_slices": site.min_slices, "model_config": site.model_config}
    if site.splits:  # otherwise the site default (client/site.py)
        ingest["splits"] = dict(zip(("train", "val", "test"), site.splits))
    return {
        "site_id": site.site_id,
        "name": site.name + " (synthetic)",
        "tasks": list(site.tasks),
        "min_cell_size": site.min_cell_size,
        "privacy": {"max_epsilon": 8.0, "delta": 1e-5},
        "device": {"type": "auto", "devices": site.devices},
        # ingestion writes its cache and database here, never into this folder
        "storage": {"work_dir": f"../work/{site.site_id}"},
        "ingest": ingest,
        "scanner": {"manufacturer": sc.manufacturer, "model": sc.model, "kvp": sc.kvp, "kernel": sc.kernel,
                    "noise_hu": sc.noise_hu, "matrix": site.matrix, "slice_thickness_mm": list(site.slice_thickness),
                    "rescale_intercept": sc.rescale_intercept, "rescale_slope": sc.rescale_slope},
        "cohort": {"synthetic": True, "seed": seed, "exams": site.exams, "age_mean": site.age_mean,
                   "prevalence": site.prevalence, "covid_rate": site.covid_rate},
    }


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate_site(out: Path, site: SiteProfile, site_index: int, seed: int, workers: int = 1,
                  exam_progress=None) -> dict:
    """One site's folder; exam_progress(site_id, exams written, exams) as they are rendered."""
    t0 = time.perf_counter()
    site_dir = out / site.site_id
    (site_dir / "reports").mkdir(parents=True)
    plans = plan_site(site, site_index, seed)
    jobs = [(plan, site, seed, site_dir) for plan in plans]
    results = []
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for res in (pool.map(_render, jobs) if pool else map(_render, jobs)):
            results.append(res)
            if exam_progress:
                exam_progress(site.site_id, len(results), len(jobs))
    for plan, res in zip(plans, results):
        (site_dir / "reports" / f"{plan.exam_id}.txt").write_text(res["report"], encoding="utf-8")
    write_csv(site_dir / "clinical.csv", CLINICAL_COLUMNS, [r["clinical"] for r in results])
    labels = [row for r in results for row in r["labels"]]
    write_csv(site_dir / "labels.csv", LABEL_COLUMNS, labels)
    (site_dir / "site.toml").write_text(tomli_w.dumps(site_toml(site, seed)), encoding="utf-8")
    truth = out / "truth" / f"{site.site_id}.json"
    truth.parent.mkdir(exist_ok=True)
    truth.write_text(json.dumps([r["truth"] for r in results], indent=1), encoding="utf-8")
    return summarize(site, plans, results, labels, time.perf_counter() - t0)


def summarize(site: SiteProfile, plans, results, labels, seconds: float) -> dict:
    prevalence = {}
    for task in site.tasks:
        rows = [r for r in labels if r["task"] == task]
        if get_task(task).loss == "hazard":
            positive = sum(r["censored"] == "0" and float(r["years_to_event"]) <= 6 for r in rows)
        elif get_task(task).answers[0] == "Yes":
            positive = sum(r["answer"] == "Yes" for r in rows)
        else:
            positive = None  # multi-class: no single positive answer
        prevalence[task] = {"labelled": len(rows), "positive": positive}
    return {"site_id": site.site_id, "name": site.name, "patients": len({p.patient.patient_id for p in plans}),
            "exams": len(plans), "series": sum(len(r["truth"]["series"]) for r in results),
            "slices": sum(s["slices"] for r in results for s in r["truth"]["series"]), "tasks": list(site.tasks),
            "scanner": f"{site.scanner.manufacturer} {site.scanner.model}", "prevalence": prevalence,
            "seconds": seconds}


def generate_cohort(out: Path, sites: list[SiteProfile], seed: int, workers: int = 1, progress=None,
                    exam_progress=None) -> list[dict]:
    """progress(site summary) after each site; exam_progress(site_id, done, total) after each exam."""
    out = Path(out)
    taken = [s.site_id for s in sites if (out / s.site_id).exists()]
    if taken:
        raise FileExistsError(f"{out} already holds {', '.join(taken)}; choose an empty output folder "
                              "(nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for i, site in enumerate(sites):
        summaries.append(generate_site(out, site, i, seed, workers, exam_progress))
        if progress:
            progress(summaries[-1])
    recorded = [{k: v for k, v in s.items() if k != "seconds"} for s in summaries]  # timings vary; bytes may not
    (out / "cohort.json").write_text(json.dumps({"seed": seed, "sites": recorded}, indent=1, default=str),
                                     encoding="utf-8")
    return summaries
