"""A site's CT from its PACS over DICOMweb: `[source] dicomweb = URL` in site.toml.

`m3fm-client ingest` asks the PACS for its CT series (QIDO-RS), downloads the instances it has not cached yet
(WADO-RS) into WORK_DIR/pacs/STUDY/SERIES/SOP.dcm, and then ingests that folder with exactly the checks a folder
site gets. Incremental by SOP Instance UID: a cached instance is never fetched again. A series is staged in
WORK_DIR/pacs-partial and moved into place only when every missing instance arrived, so a failed or interrupted
download never leaves half a series for ingestion to accept; it is retried, then recorded as a rejection
(category `download_failed`) with the reason. Only GET requests are sent: nothing in the PACS is changed.

Credentials never come from the command line: `credentials_file` (one line `user:password`, relative to the site
folder) or the environment (M3FM_DICOMWEB_USER and M3FM_DICOMWEB_PASSWORD, or M3FM_DICOMWEB_TOKEN for a bearer
token). A URL with a password in it is refused by client/site.py. A series deleted from the PACS stays in the
cache (and the site's data) until its folder under WORK_DIR/pacs is removed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

import requests
from dicomweb_client import DICOMwebClient
from sqlalchemy.orm import Session

from client.site import DicomWebSource, SiteConfig
from m3fm.data.store import clear_scope, reject

# the stored transfer syntax, not a transcoded one: the pixels ingestion decodes are the PACS's own bytes
AS_STORED = (("application/dicom", "*"),)
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"
INSTANCES = "00201209"  # Number of Series Related Instances, in a QIDO-RS series answer


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def credentials(source: DicomWebSource) -> tuple[tuple[str, str] | None, str | None]:
    """(user, password) or a bearer token, from the credentials file or the environment; (None, None): none."""
    if source.credentials_file is not None:
        try:
            line = source.credentials_file.read_text(encoding="utf-8").strip().splitlines()[0]
        except (OSError, IndexError) as e:
            raise ValueError(f"{source.credentials_file}: cannot read DICOMweb credentials ({e})") from None
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise ValueError(f"{source.credentials_file}: the first line must be user:password")
        return (user, password), None
    if os.environ.get("M3FM_DICOMWEB_TOKEN"):
        return None, os.environ["M3FM_DICOMWEB_TOKEN"]
    if os.environ.get("M3FM_DICOMWEB_USER"):
        return (os.environ["M3FM_DICOMWEB_USER"], os.environ.get("M3FM_DICOMWEB_PASSWORD", "")), None
    return None, None


def connect(source: DicomWebSource) -> DICOMwebClient:
    session = requests.Session()
    auth, token = credentials(source)
    session.auth = auth
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(source.url, session=session, headers=headers, timeout=source.timeout_s)


def _retrying(fn, attempts: int, what: str):
    """fn() with up to `attempts` tries (1 s, 2 s, 4 s ... apart); the last error is raised naming `what`."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - HTTP, connection and decoding errors alike are retried
            if attempt == attempts:
                raise RuntimeError(f"{what}: {type(e).__name__}: {e} (after {attempts} attempts)") from None
            time.sleep(min(2 ** (attempt - 1), 10))


def fetch_series(client: DICOMwebClient, study: str, series: str, missing: set[str], whole_series: bool,
                 partial: Path, final: Path, attempts: int) -> int:
    """Download the series' missing instances into `partial`, then move them into `final`; returns how many.
    whole_series: nothing of it is cached, so one request serves it all."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    def whole():  # one streamed multipart request for the series
        got = 0
        for ds in client.iter_series(study, series, media_types=AS_STORED):
            sop = str(ds.SOPInstanceUID)
            if sop in missing:
                ds.save_as(partial / f"{sop}.dcm", enforce_file_format=True)
                got += 1
        if got < len(missing):
            raise RuntimeError(f"the PACS listed {len(missing)} instances and served {got}")

    def one(sop: str):
        client.retrieve_instance(study, series, sop, media_types=AS_STORED).save_as(
            partial / f"{sop}.dcm", enforce_file_format=True)

    try:
        if whole_series:
            _retrying(whole, attempts, f"series {series}")
        else:  # a series that grew: fetch only its new instances
            for sop in sorted(missing):
                _retrying(lambda: one(sop), attempts, f"series {series}, instance {sop}")
        final.mkdir(parents=True, exist_ok=True)
        for f in partial.iterdir():
            os.replace(f, final / f.name)
        return len(missing)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def sync_pacs(s: Session, site: SiteConfig, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Mirror the PACS's series of the source's modality into site.dicom_root (WORK_DIR/pacs); returns counts for
    the ingest summary."""
    source = site.dicomweb
    client = connect(source)
    root, partial_root = site.dicom_root, site.work_dir / "pacs-partial"
    counts = {"series_listed": 0, "series_downloaded": 0, "instances_downloaded": 0, "series_failed": 0}
    clear_scope(s, "pacs")
    try:
        found = _retrying(lambda: client.search_for_series(search_filters={MODALITY: source.modality},
                                                           get_remaining=True), source.retries, f"QIDO-RS {source.url}")
    except RuntimeError as e:  # the PACS is down: the site goes on with what it has cached, and says so
        reject(s, "pacs", "source", "pacs_unreachable", f"the PACS could not be searched: {e}")
        s.commit()
        return counts
    counts["series_listed"] = len(found)
    for i, item in enumerate(found):
        study, series = _value(item, STUDY_UID), _value(item, SERIES_UID)
        scope = f"pacs:{series}"
        final = root / study / series
        cached = {p.stem for p in final.glob("*.dcm")} if final.is_dir() else set()
        clear_scope(s, scope)
        try:
            # a series whose instance count the PACS states and the cache matches is not listed again: an unchanged
            # re-run costs one search, not one per series
            if not cached or str(_value(item, INSTANCES)) != str(len(cached)):  # IS: a number or its digits
                listed = _retrying(lambda: client.search_for_instances(study, series, fields=[SOP_UID],
                                                                       get_remaining=True),
                                   source.retries, f"series {series}: QIDO-RS instances")
                missing = {_value(x, SOP_UID) for x in listed} - cached
                if missing:
                    counts["instances_downloaded"] += fetch_series(client, study, series, missing, not cached,
                                                                   partial_root / series, final, source.retries)
                    counts["series_downloaded"] += 1
        except RuntimeError as e:
            reject(s, scope, "series", "download_failed", f"not retrieved from the PACS: {e}", series_uid=series)
            counts["series_failed"] += 1
        s.commit()
        if progress:
            progress("pacs", i + 1, len(found))
    return counts
