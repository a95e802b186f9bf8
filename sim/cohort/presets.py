"""Site profiles and cohort presets: what makes each synthetic hospital different (non-IID).

Each site has its own scanner (vendor, model, kVp, reconstruction kernel, noise,
sharpness, pixel spacing, slice thickness, how it stores HU), its own patient
mix (age, smoking, disease prevalence) and its own subset of labelled tasks.
Presets size the cohort: `tiny` for tests and CI (coarse small volumes),
`demo` for the README's main job, `bench` for full-size volumes at clinical
spacing (0.5-0.9 mm in-plane, 0.625-2.5 mm slices).
"""

from __future__ import annotations

from dataclasses import dataclass

from m3fm.tasks import TASKS

ALL = tuple(t.name for t in TASKS)
NODULE_AND_CANCER = tuple(t.name for t in TASKS if t.group in ("nodule", "cancer_risk")) + ("lung_rads",)
CVD_ONLY = ("cvd_diagnosis", "cvd_mortality")
CHEST_AND_COVID = tuple(t.name for t in TASKS if t.group in ("chest_abnormality", "covid")) + CVD_ONLY


@dataclass(frozen=True)
class Scanner:
    manufacturer: str
    model: str
    kvp: float
    kernel: str
    noise_hu: float  # standard deviation of quantum noise
    blur_mm: float  # point-spread sigma of the reconstruction kernel
    rescale_intercept: float  # how the site stores HU: stored = (HU - intercept) / slope
    rescale_slope: float
    signed: bool  # PixelRepresentation 1 (signed) or 0


SCANNERS = (
    Scanner("GE MEDICAL SYSTEMS", "LightSpeed VCT", 120, "LUNG", 38.0, 0.35, -1024, 1.0, False),
    Scanner("SIEMENS", "SOMATOM Definition AS+", 110, "B50f", 30.0, 0.45, -1024, 1.0, False),
    Scanner("Philips", "iCT 256", 120, "YC", 24.0, 0.6, -1000, 1.0, False),
    Scanner("TOSHIBA", "Aquilion ONE", 100, "FC52", 34.0, 0.5, 0, 1.0, True),
    Scanner("GE MEDICAL SYSTEMS", "Revolution CT", 120, "STANDARD", 18.0, 0.9, -1024, 1.0, False),
    Scanner("SIEMENS", "SOMATOM Force", 100, "Br40d", 22.0, 0.7, -1024, 0.5, False),
)

SITE_NAMES = ("Northbrook General", "St. Aldric Medical Center", "Lakeshore University Hospital",
              "Mercy Valley Clinic", "Harborview Regional", "Pinecrest Cancer Institute", "Eastfield Community",
              "Summit Health", "Riverbend Veterans", "Westgate Children's and Adults")


@dataclass(frozen=True)
class SiteProfile:
    site_id: str
    name: str
    tasks: tuple[str, ...]
    exams: int
    scanner: Scanner
    matrix: int  # rows = columns
    pixel_spacing: tuple[float, float]  # range (mm) a site's exams draw from
    slice_thickness: tuple[float, ...]  # thicknesses the site reconstructs
    age_mean: float = 63.0
    smoker_fraction: float = 0.55  # current smokers among ever-smokers
    prevalence: float = 1.0  # multiplies finding and disease rates
    covid_rate: float = 0.0
    # small presets are case-enriched like curated datasets, so rare findings still have positives
    enrichment: float = 1.0
    second_series_fraction: float = 0.25  # exams that also carry a thick-slice reconstruction
    min_cell_size: int = 5
    min_slices: int = 64  # ingestion rejects shorter series (the paper excluded series under 64 slices)
    model_config: str = "base"  # whose image scales ingestion caches crops for
    splits: tuple[float, float, float] | None = None  # train, val, test shares of patients; None: the site default
    devices: int = 1  # local ranks the site trains on (site.toml [device] devices)


@dataclass(frozen=True)
class Preset:
    name: str
    sites: int
    exams_per_site: int
    matrix: int
    pixel_spacing: tuple[float, float] | None  # None: field of view / matrix (coarse presets)
    slice_thickness: tuple[float, ...]
    enrichment: float = 1.0
    min_slices: int = 64
    model_config: str = "base"
    splits: tuple[float, float, float] | None = None


PRESETS = {
    # coarse voxels: about 2.1-2.5 mm in-plane (the field of view fits the body) and 5 mm slices
    # coarse presets keep shorter series: a 10 mm reconstruction of a tiny chest has about 30 slices
    "tiny": Preset("tiny", 3, 16, 128, None, (5.0,), enrichment=3.0, min_slices=16, model_config="tiny"),
    # demo: sized so `m3fm-sim run` (generate, ingest, federated pretraining and multitask training) stays within
    # 10 minutes on 2 cores and still shows learning: the eval preset's voxels and model, 288 exams, and a third of
    # each site's patients held out, so its test split can bound an AUC away from chance
    "demo": Preset("demo", 4, 64, 128, None, (5.0,), enrichment=3.0, min_slices=16, model_config="tiny",
                   splits=(0.55, 0.1, 0.35)),
    # eval: sized for the learning benchmark (benchmarks/learning.py): each labelling site's test split holds >= 5
    # positives and negatives for the headline tasks; the sizes vary (240, 300, 180, 360 exams), so site-03
    # holds 17% of the exams
    "eval": Preset("eval", 4, 240, 128, None, (5.0,), enrichment=3.0, min_slices=16, model_config="tiny"),
    # clinical voxel sizes, full 512 x 512 slices
    "bench": Preset("bench", 10, 300, 512, (0.5, 0.9), (0.625, 1.0, 1.25, 2.0, 2.5)),
}

# task subsets by site position: the first site labels everything so every task has labels somewhere
TASK_SUBSETS = (ALL, NODULE_AND_CANCER, CVD_ONLY, CHEST_AND_COVID)


def build_sites(preset: str, sites: int | None = None, exams_per_site: int | None = None) -> list[SiteProfile]:
    try:
        p = PRESETS[preset]
    except KeyError:
        raise KeyError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
    n_sites = sites or p.sites
    profiles = []
    for i in range(n_sites):
        # hospitals are not the same size: sites vary around the preset's mean unless told a size
        size = exams_per_site or max(4, round(p.exams_per_site * (1.0, 1.25, 0.75, 1.5, 0.5)[i % 5]))
        profiles.append(SiteProfile(
            site_id=f"site-{i + 1:02d}",
            name=SITE_NAMES[i % len(SITE_NAMES)] + (f" {i // len(SITE_NAMES) + 1}" if i >= len(SITE_NAMES) else ""),
            tasks=TASK_SUBSETS[i % len(TASK_SUBSETS)],
            exams=size,
            scanner=SCANNERS[i % len(SCANNERS)],
            matrix=p.matrix,
            pixel_spacing=p.pixel_spacing or (0.0, 0.0),
            slice_thickness=p.slice_thickness,
            age_mean=(58.0, 66.0, 62.0, 70.0, 60.0)[i % 5],
            smoker_fraction=(0.55, 0.7, 0.4, 0.5, 0.6)[i % 5],
            prevalence=(1.0, 1.3, 0.8, 1.1, 0.9)[i % 5],
            covid_rate=(0.15, 0.0, 0.0, 0.3, 0.1)[i % 5],
            enrichment=p.enrichment,
            min_slices=p.min_slices,
            model_config=p.model_config,
            splits=p.splits,
        ))
    return profiles

