"""A hospital's `site.toml`: who it is, what it has labels for, where its cache lives.

Errors name the file and the field. The work folder (cache and database) must
lie outside the site folder: ingestion never writes into the source tree.
Every field, with its default and what it does: examples/site.toml (loaded by tests/test_examples.py).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from m3fm.model.configs import CONFIGS
from m3fm.tokenizer_folder import tokenizer_folder
from m3fm.tasks import TASK_BY_NAME
from privacy.budget import PrivacyConfigError, SiteBudget


class SiteConfigError(ValueError):
    pass


DEVICE_TYPES = ("auto", "cuda", "cpu")
# table -> the fields it may hold; an unknown one is refused (a misspelt privacy ceiling must not pass silently).
# [scanner] and [cohort] describe a synthetic site (m3fm-sim cohort) and are not read.
FIELDS = {
    "": {"site_id", "name", "tasks", "min_cell_size", "storage", "ingest", "source", "privacy", "device", "model",
         "scanner", "cohort"},
    "storage": {"work_dir"},
    "ingest": {"model_config", "min_slices", "dicom_dir", "splits"},
    "source": {"dicomweb", "credentials_file", "modality", "retries", "timeout_s"},
    "privacy": {"max_epsilon", "delta", "require_dp"},
    "device": {"type", "devices"},
    "model": {"tokenizer"},
}


@dataclass(frozen=True)
class DicomWebSource:
    """[source]: a PACS the site's CT is pulled from over DICOMweb (client/pacs.py) instead of the dicom/ folder."""
    url: str  # the DICOMweb root, e.g. http://pacs.local:8042/dicom-web
    modality: str = "CT"  # the series asked for (QIDO-RS Modality filter)
    retries: int = 3  # attempts per request before a series is recorded as a rejection
    timeout_s: float = 60.0  # per HTTP request
    credentials_file: Path | None = None  # one line user:password; else the M3FM_DICOMWEB_* environment


@dataclass
class SiteConfig:
    site_dir: Path
    site_id: str
    name: str
    tasks: tuple[str, ...]
    min_cell_size: int
    work_dir: Path
    min_slices: int = 64
    model_config: str = "base"
    dicom_dir: str = "dicom"
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    privacy: dict = field(default_factory=dict)
    device_type: str = "auto"  # [device] type: auto (CUDA when present), cuda or cpu
    devices: int = 1  # [device] devices: local ranks that train (client/ranks.py), one per GPU
    tokenizer: Path | None = None  # [model] tokenizer: a RoBERTa folder (vocab.json, merges.txt); None: the shipped
    dicomweb: DicomWebSource | None = None  # [source]: None reads the dicom/ folder

    @property
    def dicom_base(self) -> Path:
        """The folder the DICOM paths in the site database are relative to: the site folder, or for a PACS site
        the work folder (its downloads live in WORK_DIR/pacs, outside the site folder like every cache)."""
        return self.work_dir if self.dicomweb else self.site_dir

    @property
    def dicom_root(self) -> Path:
        return self.work_dir / "pacs" if self.dicomweb else self.site_dir / self.dicom_dir

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.work_dir / 'site.db'}"

    @property
    def crop_dir(self) -> Path:
        return self.work_dir / "crops"


def _need(d: dict, key: str, kind, where: str):
    if key not in d:
        raise SiteConfigError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], kind):
        raise SiteConfigError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {d[key]!r}")
    return d[key]


def load_site(site_dir: Path) -> SiteConfig:
    site_dir = Path(site_dir).resolve()
    path = site_dir / "site.toml"
    if not path.is_file():
        raise SiteConfigError(f"{path}: not found (a site folder holds site.toml, dicom/, clinical.csv, labels.csv)")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SiteConfigError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    for table, allowed in FIELDS.items():
        t = d.get(table, {}) if table else d
        if not isinstance(t, dict):
            raise SiteConfigError(f"{where}: [{table}] must be a table, got {t!r}")
        if unknown := sorted(set(t) - allowed):
            raise SiteConfigError(f"{where}: unknown field(s) {unknown} in {f'[{table}]' if table else 'the top level'}"
                                  f"; known: {sorted(allowed)}")
    tasks = tuple(_need(d, "tasks", list, where))
    unknown = [t for t in tasks if t not in TASK_BY_NAME]
    if unknown:
        raise SiteConfigError(f"{where}: field 'tasks' names unknown task(s) {unknown}; known: {', '.join(TASK_BY_NAME)}")
    storage = d.get("storage", {})
    work = Path(storage.get("work_dir", f"../work/{d.get('site_id', site_dir.name)}"))
    work_dir = (work if work.is_absolute() else site_dir / work).resolve()
    if work_dir == site_dir or site_dir in work_dir.parents:
        raise SiteConfigError(f"{where}: storage.work_dir {work_dir} is inside the site folder; put it outside "
                              "(ingestion never writes into the source tree)")
    ingest = d.get("ingest", {})
    model_config = ingest.get("model_config", "base")
    if model_config not in CONFIGS:
        raise SiteConfigError(f"{where}: ingest.model_config {model_config!r} is not one of {', '.join(CONFIGS)}")
    splits = ingest.get("splits", {"train": 0.7, "val": 0.15, "test": 0.15})
    if set(splits) != {"train", "val", "test"} or abs(sum(splits.values()) - 1) > 1e-6:
        raise SiteConfigError(f"{where}: ingest.splits must give train, val and test fractions summing to 1, got {splits}")
    min_slices = ingest.get("min_slices", 64)
    if not isinstance(min_slices, int) or min_slices < 1:
        raise SiteConfigError(f"{where}: ingest.min_slices must be a positive integer, got {min_slices!r}")
    privacy = d.get("privacy", {})
    try:
        SiteBudget.from_site(privacy, where)  # checked at load, so `m3fm-client start` refuses a bad ceiling
    except PrivacyConfigError as e:
        raise SiteConfigError(str(e)) from None
    min_cell = d.get("min_cell_size", 5)
    if not isinstance(min_cell, int) or min_cell < 1:
        raise SiteConfigError(f"{where}: min_cell_size must be a positive integer, got {min_cell!r}")
    device = d.get("device", {})
    device_type = device.get("type", "auto")
    if device_type not in DEVICE_TYPES:
        raise SiteConfigError(f"{where}: device.type must be one of {', '.join(DEVICE_TYPES)}, got {device_type!r}")
    devices = device.get("devices", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise SiteConfigError(f"{where}: device.devices must be a positive integer (local ranks), got {devices!r}")
    try:
        tokenizer = tokenizer_folder(d.get("model", {}).get("tokenizer"), site_dir, f"{where}: model.tokenizer")
    except ValueError as e:
        raise SiteConfigError(str(e)) from None
    dicomweb = _dicomweb_source(d.get("source", {}), site_dir, where)
    return SiteConfig(site_dir=site_dir, site_id=_need(d, "site_id", str, where), name=d.get("name", d["site_id"]),
                      tasks=tasks, min_cell_size=min_cell, work_dir=work_dir, min_slices=min_slices,
                      model_config=model_config, dicom_dir=ingest.get("dicom_dir", "dicom"), splits=splits,
                      privacy=privacy, device_type=device_type, devices=devices, tokenizer=tokenizer,
                      dicomweb=dicomweb)


def _dicomweb_source(source: dict, site_dir: Path, where: str) -> DicomWebSource | None:
    if "dicomweb" not in source:
        if source:
            raise SiteConfigError(f"{where}: [source] needs field 'dicomweb' (the PACS's DICOMweb URL)")
        return None
    url = source["dicomweb"]
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise SiteConfigError(f"{where}: source.dicomweb must be an http(s) URL, got {url!r}")
    if parts.password is not None:
        raise SiteConfigError(f"{where}: source.dicomweb carries a password; put user:password in a file named by "
                              "source.credentials_file, or in M3FM_DICOMWEB_USER / M3FM_DICOMWEB_PASSWORD")
    retries, timeout = source.get("retries", 3), source.get("timeout_s", 60.0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 1:
        raise SiteConfigError(f"{where}: source.retries must be a positive integer, got {retries!r}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise SiteConfigError(f"{where}: source.timeout_s must be a positive number of seconds, got {timeout!r}")
    creds = source.get("credentials_file")
    if creds is not None:
        creds = (site_dir / creds).resolve()
        if not creds.is_file():
            raise SiteConfigError(f"{where}: source.credentials_file {creds} is not a file")
    return DicomWebSource(url=url.rstrip("/"), modality=str(source.get("modality", "CT")), retries=retries,
                          timeout_s=float(timeout), credentials_file=creds)


def report_name(run_name: str, run_id: int, server_round: int) -> str:
    """The folder (under WORK_DIR/reports) and model file stem of a run's end-of-run report (client/report.py)."""
    return f"{run_name}-{run_id:04d}-round-{server_round:04d}"
