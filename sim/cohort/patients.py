"""Synthetic patients: clinical elements, CT findings and outcomes, correlated as the paper reports.

Hypertension, diabetes, heart disease, stroke, age, sex and smoking raise a
latent cardiovascular score that drives CVD, coronary calcification and CVD
death. Smoking raises nodules, emphysema and COPD; nodule size, spiculation,
part-solid attenuation, upper-lobe location, smoking and family history raise
the chance that a nodule is malignant and how soon cancer is diagnosed.
Follow-up is censored at a random time, as in a screening trial. Chronic
findings (nodule, emphysema, fibrosis, calcification) persist over a
patient's yearly exams; a malignant nodule grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from m3fm.data import clinical
from sim.cohort.presets import SiteProfile

# the clinical vocabulary is the one ingestion checks against (m3fm/data/clinical.py), in the same order
DISEASES = tuple(clinical.DISEASES)
CANCERS = tuple(clinical.CANCERS)
RELATIVES = tuple(clinical.RELATIVES)
RACES = clinical.RACES
EDUCATION = clinical.EDUCATION
LOBES = ("Right upper lobe", "Right middle lobe", "Right lower lobe", "Left upper lobe", "Left lower lobe")
SIZE_BINS = ((0, 4), (4, 6), (6, 8), (8, 15), (15, 30), (30, 45))
DISEASE_BASE_RATE = {"asthma_adult": 0.06, "asbestosis": 0.01, "bronchiectasis": 0.02, "asthma_child": 0.04,
                     "chronic_bronchitis": 0.08, "copd": 0.0, "diabetes": 0.12, "emphysema": 0.0,
                     "lung_fibrosis": 0.02, "heart_disease": 0.10, "hypertension": 0.35, "pneumonia": 0.2,
                     "sarcoidosis": 0.01, "silicosis": 0.01, "stroke": 0.04, "tuberculosis": 0.02}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass
class Nodule:
    lobe: str
    diameter_mm: float
    attenuation: str  # solid | ground_glass | part_solid
    margin: str  # smooth | spiculated | poorly_defined | unable
    malignant: bool
    solid_mm: float = 0.0  # solid component of a part-solid nodule

    @property
    def side(self) -> str:
        return "right" if self.lobe.startswith("Right") else "left"


@dataclass
class Patient:
    patient_id: str
    sex: str
    age: float  # at the first exam
    race: str | None
    ethnicity: str
    height_in: float | None  # as recorded (may be missing)
    weight_lb: float | None
    height_true: float  # what the body is, for the phantom
    weight_true: float
    education: str | None
    smoking: str  # current | former | never
    pack_years: float | None
    cigs_per_day: float | None
    years_since_quit: float | None
    diseases: dict[str, float]  # name -> age at diagnosis
    cancers: dict[str, float]
    family: tuple[str, ...]
    cvd_score: float
    cvd: bool
    cvd_death_years: float
    cancer_years: float  # from the first exam; inf when no cancer
    follow_up_years: float  # censoring time from the first exam
    nodule: Nodule | None
    emphysema: float  # fraction of lung
    fibrosis: bool
    cac_spots: int
    cardiomegaly: bool


@dataclass
class ExamFindings:
    nodule: Nodule | None
    emphysema: float
    fibrosis: bool
    cac_spots: int
    cardiomegaly: bool
    atelectasis: bool = False
    pleural: bool = False
    hilar_mass: bool = False
    chest_wall: bool = False
    consolidation: bool = False
    covid: bool = False


def _maybe(rng: np.random.Generator, value, missing: float):
    return None if rng.random() < missing else value


def sample_patient(rng: np.random.Generator, site: SiteProfile, index: int) -> Patient:
    sex = "Male" if rng.random() < 0.58 else "Female"
    age = float(np.clip(rng.normal(site.age_mean, 6.0), 50, 80))
    height = float(np.round(rng.normal(69.5 if sex == "Male" else 64.0, 2.8)))
    bmi = float(np.clip(rng.normal(27.5, 4.5), 17, 45))
    weight = float(np.round(bmi * height ** 2 / 703.0))
    smoking = "never" if rng.random() < 0.08 else ("current" if rng.random() < site.smoker_fraction else "former")
    pack_years = cigs = quit = None
    if smoking != "never":
        pack_years = float(np.round(np.clip(rng.lognormal(math.log(45), 0.4), 10, 150)))
        cigs = float(rng.choice([10, 15, 20, 20, 25, 30, 40]))
        quit = float(np.round(rng.uniform(1, 15))) if smoking == "former" else None
    py = pack_years or 0.0
    diseases = {}
    for d, rate in DISEASE_BASE_RATE.items():
        p = rate * (1 + 0.02 * (age - 63))
        if d == "copd":
            p = sigmoid(-3.2 + 0.025 * py)
        if d == "hypertension":
            p = sigmoid(-1.0 + 0.04 * (age - 63) + 0.03 * (bmi - 27))
        if d == "diabetes":
            p = sigmoid(-2.3 + 0.08 * (bmi - 27))
        if rng.random() < min(0.95, p * site.prevalence if d not in ("hypertension", "diabetes") else p):
            low = 5.0 if d == "asthma_child" else 30.0
            high = 15.0 if d == "asthma_child" else age
            diseases[d] = float(np.round(rng.uniform(low, high)))
    cancers = {c: float(np.round(rng.uniform(40, age))) for c in CANCERS if c != "lung" and rng.random() < 0.008}
    family = tuple(r for r in RELATIVES if rng.random() < (0.05 if r != "child" else 0.02))

    # cardiovascular: latent score from the clinical risk factors the paper names
    cvd_score = (-1.6 + 0.05 * (age - 63) + 1.0 * ("hypertension" in diseases) + 0.8 * ("diabetes" in diseases)
                 + 1.3 * ("heart_disease" in diseases) + 0.9 * ("stroke" in diseases) + 0.4 * (sex == "Male")
                 + 0.008 * py + rng.normal(0, 0.6) + math.log(site.prevalence))
    cvd = bool(rng.random() < sigmoid(cvd_score))
    cac = int(rng.poisson(5.0 + 2.0 * max(cvd_score, 0)) + 2) if cvd else int(rng.poisson(0.6))
    cardiomegaly = bool(cvd and rng.random() < 0.35)
    cvd_death = float(rng.exponential(1.0 / (0.02 * math.exp(0.8 * cvd_score + 1.0 * cvd))))
    follow_up = float(rng.uniform(3.0, 7.5))

    # nodules, emphysema, cancer: smoking-driven
    nodule = None
    if rng.random() < min(0.9, sigmoid(-0.9 + 0.012 * (py - 40)) * site.prevalence):
        lo, hi = SIZE_BINS[rng.choice(6, p=[0.08, 0.32, 0.2, 0.24, 0.11, 0.05])]
        d = float(np.round(rng.uniform(max(lo, 2.5), hi), 1))
        att = str(rng.choice(["solid", "ground_glass", "part_solid"], p=[0.65, 0.2, 0.15]))
        margin = "unable" if d <= 4 else str(rng.choice(["smooth", "spiculated", "poorly_defined", "unable"],
                                                        p=[0.55, 0.17, 0.22, 0.06]))
        lobe = str(rng.choice(LOBES, p=[0.3, 0.08, 0.2, 0.27, 0.15]))
        risk = (-5.2 + 0.13 * min(d, 40) + 1.6 * (margin == "spiculated") + 0.8 * (att == "part_solid")
                + 0.5 * ("upper" in lobe) + 0.015 * py + 0.6 * bool(family) + 0.4 * (smoking == "current")
                + 0.03 * (age - 63))
        malignant = bool(rng.random() < sigmoid(risk))
        solid = float(np.round(d * rng.uniform(0.3, 0.6), 1)) if att == "part_solid" else 0.0
        nodule = Nodule(lobe, d, att, margin, malignant, solid)
    if nodule is not None and nodule.malignant:
        cancer_years = float(rng.uniform(0.2, 2.5) if nodule.diameter_mm >= 15 else rng.uniform(0.5, 6.0))
    elif rng.random() < 0.01:  # cancers that no screen-detected nodule announced
        cancer_years = float(rng.uniform(1.0, 7.0))
    else:
        cancer_years = math.inf
    emph = 0.0
    if rng.random() < sigmoid(-2.0 + 0.03 * py + 1.4 * ("copd" in diseases) + 0.4 * (smoking == "current")):
        emph = float(rng.uniform(0.06, 0.3))
        if rng.random() < 0.4:
            diseases.setdefault("emphysema", float(np.round(rng.uniform(45, age))))
    fibrosis = bool(rng.random() < 0.05 * site.prevalence * site.enrichment + 0.6 * ("lung_fibrosis" in diseases))

    return Patient(
        patient_id=f"{site.site_id.upper().replace('-', '')}P{index:05d}", sex=sex, age=age,
        race=_maybe(rng, str(rng.choice(RACES, p=[0.82, 0.09, 0.04, 0.01, 0.01, 0.03])), 0.02),
        ethnicity="Hispanic or Latino" if rng.random() < 0.05 else "neither Hispanic nor Latino",
        height_in=_maybe(rng, height, 0.03), weight_lb=_maybe(rng, weight, 0.03),
        height_true=height, weight_true=weight,
        education=_maybe(rng, str(rng.choice(EDUCATION, p=[0.04, 0.08, 0.24, 0.14, 0.22, 0.16, 0.12])), 0.06),
        smoking=smoking, pack_years=_maybe(rng, pack_years, 0.05) if pack_years else None,
        cigs_per_day=_maybe(rng, cigs, 0.08) if cigs else None,
        years_since_quit=_maybe(rng, quit, 0.1) if quit else None,
        diseases=diseases, cancers=cancers, family=family, cvd_score=cvd_score, cvd=cvd,
        cvd_death_years=cvd_death, cancer_years=cancer_years, follow_up_years=follow_up, nodule=nodule,
        emphysema=emph, fibrosis=fibrosis, cac_spots=cac, cardiomegaly=cardiomegaly,
    )


ACUTE_FINDINGS = ("atelectasis", "pleural", "hilar_mass", "chest_wall", "consolidation", "covid")


def exam_findings(rng: np.random.Generator, p: Patient, k: int, site: SiteProfile, exam_index: int = -1) -> ExamFindings:
    """Findings on the patient's k-th yearly exam (k = 0 first).

    In case-enriched (small) cohorts the site's first exams each carry one acute finding for sure,
    so every finding has positives however few exams a site has.
    """
    nodule = p.nodule
    if nodule is not None and nodule.malignant and k:
        grown = round(min(nodule.diameter_mm * 1.35 ** k, 45.0), 1)
        nodule = Nodule(nodule.lobe, grown, nodule.attenuation, nodule.margin, True,
                        round(nodule.solid_mm * 1.35 ** k, 1))
    big_cancer = nodule is not None and nodule.malignant and nodule.diameter_mm >= 15
    pv = site.prevalence * site.enrichment
    f = ExamFindings(
        nodule=nodule, emphysema=p.emphysema, fibrosis=p.fibrosis, cac_spots=p.cac_spots,
        cardiomegaly=p.cardiomegaly,
        atelectasis=bool(rng.random() < 0.1 * pv),
        pleural=bool(rng.random() < 0.08 * pv + 0.2 * big_cancer),
        hilar_mass=bool(rng.random() < 0.04 * pv + 0.35 * big_cancer),
        chest_wall=bool(rng.random() < 0.05 * pv),
        consolidation=bool(rng.random() < 0.08 * pv + 0.1 * ("pneumonia" in p.diseases)),
        covid=bool(rng.random() < min(0.5, site.covid_rate * site.enrichment)),
    )
    if site.enrichment > 1 and 0 <= exam_index < len(ACUTE_FINDINGS):
        setattr(f, ACUTE_FINDINGS[exam_index], True)
    return f
