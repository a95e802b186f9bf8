"""A site's tables: clinical.csv, labels.csv and reports/, checked against the schema and the task registry.

Every problem names the file, the row (1 = header), the column and what is
wrong. A bad cell is dropped and its row kept; a bad label row is dropped;
nothing stops the rest. Clinical records become the paper's free-text
sentences (Supplementary Table 6 formats), one sentence per element.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from m3fm.tasks import get_task

DISEASES = {  # column stem -> the paper's wording
    "asthma_adult": "asthma (adult)", "asbestosis": "asbestosis", "bronchiectasis": "bronchiectasis",
    "asthma_child": "asthma (childhood)", "chronic_bronchitis": "chronic bronchitis", "copd": "COPD",
    "diabetes": "diabetes", "emphysema": "emphysema", "lung_fibrosis": "lung fibrosis",
    "heart_disease": "heart disease/heart attack", "hypertension": "hypertension", "pneumonia": "pneumonia",
    "sarcoidosis": "sarcoidosis", "silicosis": "silicosis", "stroke": "stroke", "tuberculosis": "tuberculosis",
}
CANCERS = {c: c.replace("_", " ") for c in (
    "bladder", "breast", "cervical", "colorectal", "esophageal", "kidney", "larynx", "lung", "nasal", "oral",
    "pancreatic", "pharynx", "stomach", "thyroid", "transitional_cell")}
RELATIVES = {"brother": "brother(s) (including half-brothers)", "sister": "sister(s) (including half-sisters)",
             "child": "child(ren)", "father": "father", "mother": "mother"}
GENDERS = ("Male", "Female")
RACES = ("white", "black or African-American", "Asian", "American Indian or Alaskan Native",
         "Native Hawaiian or other Pacific Islander", "more than one race")
ETHNICITIES = ("Hispanic or Latino", "neither Hispanic nor Latino")
EDUCATION = ("8th grade or less", "9th-11th grade", "high school graduate/GED", "post high school training",
             "associate degree/some college", "bachelors degree", "graduate school")
SMOKING = ("current", "former", "never")

# column -> (kind, allowed values or (low, high))
CLINICAL_SCHEMA: dict[str, tuple[str, object]] = {
    "patient_id": ("id", None), "exam_id": ("id", None), "study_date": ("date", None),
    "age": ("float", (18, 110)), "gender": ("choice", GENDERS), "race": ("choice", RACES),
    "ethnicity": ("choice", ETHNICITIES), "height_in": ("float", (36, 96)), "weight_lb": ("float", (50, 700)),
    "education": ("choice", EDUCATION), "smoking_status": ("choice", SMOKING), "pack_years": ("float", (0, 300)),
    "cigarettes_per_day": ("float", (0, 200)), "years_since_quit": ("float", (0, 90)),
    **{f"dx_{d}_age": ("float", (0, 110)) for d in DISEASES},
    **{f"cancer_{c}_age": ("float", (0, 110)) for c in CANCERS},
    **{f"family_lc_{r}": ("flag", None) for r in RELATIVES},
}
REQUIRED_CLINICAL = ("patient_id", "exam_id")
# slice_location: the table position (mm, as DICOM SliceLocation) of an annotated nodule, as NLST records its
# slice; the QA dataset cuts the nodule tasks' 16-slice slab around it (paper, Methods)
LABEL_COLUMNS = ("exam_id", "task", "answer", "years_to_event", "censored", "side", "slice_location")
# clinical_number questions (m3fm/tasks.py order) -> the field each asks for
NUMBER_FIELDS = ("age", "age", "pack_years", "cigarettes_per_day", "weight_lb", "height_in")


@dataclass
class Problem:
    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f", row {self.row}" if self.row else "") + (f", column {self.column!r}" if self.column else "")
        return f"{where}: {self.message}"


def _parse(kind: str, rule, text: str):
    if kind == "id":
        return text
    if kind == "date":
        return date.fromisoformat(text).isoformat()
    if kind == "choice":
        if text not in rule:
            raise ValueError(f"{text!r} is not one of {', '.join(rule)}")
        return text
    if kind == "flag":
        if text not in ("0", "1"):
            raise ValueError(f"{text!r} is not 0 or 1")
        return int(text)
    v = float(text)  # raises "could not convert string to float: 'sixty'"
    lo, hi = rule
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{v:g} is outside {lo}..{hi}")
    return v


def read_csv(path: Path, rel: str, problems: list[Problem]) -> tuple[list[str], list[tuple[int, dict]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = [(i + 2, row) for i, row in enumerate(reader)]
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, csv.Error) as e:
        problems.append(Problem(rel, None, None, f"unreadable CSV: {e}"))
        return [], []


def read_clinical(path: Path, rel: str = "clinical.csv") -> tuple[dict[str, dict], list[Problem]]:
    """exam_id -> typed record (None where missing or invalid), and the problems found."""
    problems: list[Problem] = []
    if not path.exists():
        return {}, [Problem(rel, None, None, "file not found: exams have no clinical data")]
    header, rows = read_csv(path, rel, problems)
    missing = [c for c in REQUIRED_CLINICAL if c not in header]
    if missing:
        problems.append(Problem(rel, 1, ", ".join(missing), "required column missing: file skipped"))
        return {}, problems
    for c in header:
        if c not in CLINICAL_SCHEMA:
            problems.append(Problem(rel, 1, c, "unknown column, ignored"))
    records: dict[str, dict] = {}
    for line, row in rows:
        record = {}
        for column, (kind, rule) in CLINICAL_SCHEMA.items():
            text = (row.get(column) or "").strip()
            if not text:
                record[column] = None
                continue
            try:
                record[column] = _parse(kind, rule, text)
            except ValueError as e:
                problems.append(Problem(rel, line, column, f"{e}; value ignored"))
                record[column] = None
        if not record["patient_id"] or not record["exam_id"]:
            problems.append(Problem(rel, line, "exam_id" if record["patient_id"] else "patient_id", "empty: row skipped"))
        elif record["exam_id"] in records:
            problems.append(Problem(rel, line, "exam_id", f"duplicate exam id {record['exam_id']!r}: row skipped"))
        else:
            records[record["exam_id"]] = record
    return records, problems


def clinical_sentences(r: dict) -> list[str]:
    """The paper's sentence per available clinical element."""
    out = []
    if r.get("age") is not None:
        out.append(f"The patient is {r['age']:.1f} years old.")
    for column, fmt in (("gender", "Gender is {}."), ("race", "Race is {}."), ("ethnicity", "Ethnicity is {}."),
                        ("height_in", "Height is {:.1f} inches."), ("weight_lb", "Weight is {:.1f} pounds."),
                        ("education", "Education is {}.")):
        if r.get(column) is not None:
            out.append(fmt.format(r[column]))
    if r.get("smoking_status"):
        out.append(f"{r['smoking_status'].capitalize()} smoker.")
    for column, fmt in (("pack_years", "Smoking duration is {:.1f} pack years."),
                        ("cigarettes_per_day", "Smoking intensity is {:.1f} cigarettes per day."),
                        ("years_since_quit", "{:.1f} years since quit smoking.")):
        if r.get(column) is not None:
            out.append(fmt.format(r[column]))
    for d, name in DISEASES.items():
        if r.get(f"dx_{d}_age") is not None:
            out.append(f"The patient had {name} diagnosed at {r[f'dx_{d}_age']:.1f} years old.")
    for c, name in CANCERS.items():
        if r.get(f"cancer_{c}_age") is not None:
            out.append(f"The patient had {name} cancer diagnosed at {r[f'cancer_{c}_age']:.1f} years old.")
    family = [rel for rel in RELATIVES if r.get(f"family_lc_{rel}") == 1]
    out.extend(f"Patient's {RELATIVES[rel]} have lung cancer." for rel in family)
    if not family and any(r.get(f"family_lc_{rel}") == 0 for rel in RELATIVES):
        out.append("No family history of lung cancer.")
    return out


def read_labels(path: Path, exams: set[str], site_tasks: set[str], rel: str = "labels.csv"):
    """Label rows checked against the task registry; returns (rows, problems)."""
    problems: list[Problem] = []
    if not path.exists():
        return [], [Problem(rel, None, None, "file not found: the site has no labels (pretraining only)")]
    header, rows = read_csv(path, rel, problems)
    missing = [c for c in ("exam_id", "task") if c not in header]
    if missing:
        return [], problems + [Problem(rel, 1, ", ".join(missing), "required column missing: file skipped")]
    out = []
    for line, row in rows:
        row = {c: (row.get(c) or "").strip() for c in LABEL_COLUMNS}
        try:
            out.append(check_label(row, exams, site_tasks))
        except LabelError as e:
            problems.append(Problem(rel, line, e.column, f"{e}; row skipped"))
    return out, problems


class LabelError(ValueError):
    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


def check_label(row: dict, exams: set[str], site_tasks: set[str]) -> dict:
    if row["exam_id"] not in exams:
        raise LabelError("exam_id", f"unknown exam id {row['exam_id']!r} (not in clinical.csv)")
    try:
        task = get_task(row["task"])
    except KeyError:
        raise LabelError("task", f"unknown task {row['task']!r}") from None
    if task.name not in site_tasks:
        raise LabelError("task", f"task {task.name!r} is not listed in site.toml tasks")
    out = {"exam_id": row["exam_id"], "task": task.name, "answer": None, "years_to_event": None, "censored": None,
           "side": row["side"] or None, "slice_location": None}
    if row["side"] not in ("", "left", "right"):
        raise LabelError("side", f"{row['side']!r} is not left, right or empty")
    if task.loss == "hazard":
        try:
            out["years_to_event"] = float(row["years_to_event"])
        except ValueError:
            raise LabelError("years_to_event", f"{row['years_to_event']!r} is not a number of years") from None
        if not out["years_to_event"] >= 0:
            raise LabelError("years_to_event", "must be >= 0")
        if row["censored"] not in ("0", "1"):
            raise LabelError("censored", f"{row['censored']!r} is not 0 or 1")
        out["censored"] = int(row["censored"])
    elif task.loss == "ce":
        if row["answer"] not in task.answers:
            raise LabelError("answer", f"{row['answer']!r} is not one of {', '.join(task.answers)}")
        out["answer"] = row["answer"]
    else:
        raise LabelError("task", f"task {task.name!r} is derived from clinical.csv, not labelled")
    if row["slice_location"]:
        try:
            out["slice_location"] = float(row["slice_location"])
        except ValueError:
            raise LabelError("slice_location", f"{row['slice_location']!r} is not a position in mm") from None
    return out


def read_reports(folder: Path, exams: set[str], rel: str = "reports"):
    """exam_id -> report text from reports/<exam_id>.txt."""
    problems: list[Problem] = []
    reports = {}
    if not folder.is_dir():
        return reports, problems
    for path in sorted(folder.iterdir()):
        name = f"{rel}/{path.name}"
        if not path.is_file() or path.suffix != ".txt":
            problems.append(Problem(name, None, None, "not a .txt report file, ignored"))
            continue
        if path.stem not in exams:
            problems.append(Problem(name, None, None, f"unknown exam id {path.stem!r} (not in clinical.csv)"))
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            problems.append(Problem(name, None, None, f"not UTF-8 text: {e}"))
            continue
        if not text:
            problems.append(Problem(name, None, None, "empty report"))
            continue
        reports[path.stem] = text
    return reports, problems
