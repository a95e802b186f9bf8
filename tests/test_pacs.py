"""`m3fm-client ingest` from a PACS over DICOMweb (client/pacs.py), against a real Orthanc with its DICOMweb plugin
(Debian `orthanc` + `orthanc-dicomweb`, installed by .ci/run). Orthanc has no bind-address option, so it runs in a
loopback-only network namespace of its own; the loader and `m3fm-client ingest` join that namespace with nsenter."""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.federated import last_ingest
from client.ingest import ingest_site
from client.site import SiteConfigError, load_site
from m3fm.data.store import Crop, Rejection, Series, SourceFile, open_store
from server.coordinator import free_port
from transport.flower import flower_bin, flower_env

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "m3fm-site", "not-on-the-command-line"

# run inside Orthanc's namespace: load every readable file of a folder through Orthanc's REST API, as a hospital's
# modality would have stored it; print {relative path: Orthanc's answer} and the PACS's counters
LOADER = """import json, sys, pathlib, requests
root, auth = pathlib.Path(sys.argv[1]), (sys.argv[2], sys.argv[3])
stored = {}
for p in sorted(q for q in root.rglob("*") if q.is_file()):
    r = requests.post("http://127.0.0.1:8042/instances", data=p.read_bytes(), auth=auth, timeout=30)
    if r.ok:
        stored[p.relative_to(root).as_posix()] = r.json()["ParentSeries"]
print(json.dumps(stored))
"""
# what the PACS holds, and its change log position: unchanged by ingestion (only GET requests are sent)
STATE = """import json, sys, requests
auth = (sys.argv[1], sys.argv[2])
stats = requests.get("http://127.0.0.1:8042/statistics", auth=auth, timeout=30).json()
last = requests.get("http://127.0.0.1:8042/changes?last", auth=auth, timeout=30).json()["Last"]
print(json.dumps({"instances": stats["CountInstances"], "series": stats["CountSeries"], "last_change": last}))
"""


@pytest.fixture
def orthanc(tmp_path):
    if not Path(ORTHANC).is_file() or not Path(PLUGIN).is_file():
        pytest.fail("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                    ".ci/run does this)")
    root = tmp_path / "orthanc"
    root.mkdir()
    config = {"Name": "m3fm-test-pacs", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
              "HttpPort": 8042, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StorageCompression": False,
              "MaximumStorageCacheSize": 0}  # no in-memory copy of a file the test removes
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up; exec {ORTHANC} {root / 'orthanc.json'}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):  # bounded: 20 s
            up = subprocess.run(["nsenter", "-t", str(proc.pid), "-n", sys.executable, "-c", STATE, USER, PASSWORD],
                                capture_output=True, text=True, timeout=30)
            if up.returncode == 0 or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None and up.returncode == 0, (root / "orthanc.log").read_text()[-2000:]
        yield proc.pid, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def in_namespace(pid: int, *argv: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True, text=True, timeout=900,
                          env=env)


def accepted(site) -> dict[str, dict[str, str]]:
    """series UID -> {crop file: sha256 of its bytes} for every accepted series."""
    engine = open_store(site.database_url)
    with Session(engine) as s:
        uids = set(s.scalars(select(Series.series_uid).where(Series.status == "accepted")))
        crops = {uid: {} for uid in uids}
        for c in s.scalars(select(Crop)):
            if c.series_uid in crops:
                crops[c.series_uid][c.path] = hashlib.sha256((site.work_dir / c.path).read_bytes()).hexdigest()
    engine.dispose()
    return crops


def pacs_site(folder_site, tmp_path: Path) -> Path:
    """A copy of the site with no dicom/ folder and [source] pointing at the PACS."""
    site_dir = tmp_path / "pacs-site"
    site_dir.mkdir()
    for name in ("clinical.csv", "labels.csv"):
        shutil.copy(folder_site.site_dir / name, site_dir / name)
    shutil.copytree(folder_site.site_dir / "reports", site_dir / "reports")
    (site_dir / "pacs.credentials").write_text(f"{USER}:{PASSWORD}\n")
    toml = (folder_site.site_dir / "site.toml").read_text()
    toml = toml.replace('work_dir = "../work/', 'work_dir = "../pacs-work/')
    toml += '\n[source]\ndicomweb = "http://127.0.0.1:8042/dicom-web"\ncredentials_file = "pacs.credentials"\n' \
            'retries = 2\n'
    (site_dir / "site.toml").write_text(toml)
    return site_dir


def test_a_site_ingested_from_its_pacs_equals_the_site_ingested_from_its_folder(ingested, orthanc, tmp_path):
    _, sites, _ = ingested
    folder = sites[0]
    pid, root = orthanc
    loaded = in_namespace(pid, sys.executable, "-c", LOADER, str(folder.site_dir / folder.dicom_dir), USER, PASSWORD)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    stored = json.loads(loaded.stdout)
    reference = accepted(folder)
    # one accepted series the PACS cannot serve: its stored files are gone from Orthanc's storage area
    broken = sorted(reference)[0]
    engine = open_store(folder.database_url)
    with Session(engine) as s:
        broken_files = [r.path for r in s.scalars(select(SourceFile).where(SourceFile.series_uid == broken))]
    engine.dispose()
    assert all(Path(p).relative_to("dicom").as_posix() in stored for p in broken_files)
    # every file but the first stored: Orthanc's QIDO-RS reads that one for the series' attributes, so the series
    # is still listed while WADO-RS cannot serve it
    digests = {hashlib.sha256((folder.site_dir / p).read_bytes()).hexdigest() for p in sorted(broken_files)[1:]}
    removed = [p for p in (root / "storage").rglob("*")
               if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() in digests]
    assert len(removed) == len(broken_files) - 1 > 0
    for p in removed:
        p.unlink()
    before = json.loads(in_namespace(pid, sys.executable, "-c", STATE, USER, PASSWORD).stdout)

    site_dir = pacs_site(folder, tmp_path)
    env = {k: v for k, v in flower_env().items() if not k.startswith("M3FM_DICOMWEB")}
    first = in_namespace(pid, flower_bin("m3fm-client"), "ingest", str(site_dir), "--workers", "2", env=env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    site = load_site(site_dir)
    got = accepted(site)
    assert broken not in got and got, first.stdout[-4000:]
    assert got == {uid: crops for uid, crops in reference.items() if uid != broken}  # same series, same crop bytes
    engine = open_store(site.database_url)
    with Session(engine) as s:
        failed = [r for r in s.scalars(select(Rejection)) if r.category == "download_failed"]
    engine.dispose()
    assert [r.series_uid for r in failed] == [broken] and broken in failed[0].reason
    assert "PACS: series that failed to download" in first.stdout

    second = in_namespace(pid, flower_bin("m3fm-client"), "ingest", str(site_dir), env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    summary = last_ingest(site)[1]
    assert summary["pacs"]["instances_downloaded"] == 0 and summary["pacs"]["series_downloaded"] == 0
    assert summary["pacs"]["series_failed"] == 1 and summary["series_processed"] == 0
    assert accepted(site) == got

    # an instance missing from the cache is fetched alone (incremental by SOP Instance UID), and its series' crops
    # come out the same
    sorted((site.work_dir / "pacs").rglob("*.dcm"))[0].unlink()
    third = in_namespace(pid, flower_bin("m3fm-client"), "ingest", str(site_dir), env=env)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    summary = last_ingest(site)[1]
    assert summary["pacs"]["instances_downloaded"] == 1 and summary["pacs"]["series_downloaded"] == 1
    assert summary["series_processed"] == 1 and accepted(site) == got
    after = json.loads(in_namespace(pid, sys.executable, "-c", STATE, USER, PASSWORD).stdout)
    assert after == before  # nothing in the PACS changed


def test_pacs_source_fields_are_checked(ingested, tmp_path):
    _, sites, _ = ingested
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    base = (sites[0].site_dir / "site.toml").read_text().replace('work_dir = "../work/', f'work_dir = "{tmp_path}/w/')
    for source, problem in (('dicomweb = "http://u:secret@127.0.0.1:8042/dicom-web"', "carries a password"),
                            ('dicomweb = "ftp://127.0.0.1/dicom-web"', r"must be an http\(s\) URL"),
                            ('dicomweb = "http://127.0.0.1/dicom-web"\nretries = 0', "source.retries"),
                            ('dicomweb = "http://127.0.0.1/dicom-web"\ncredentials_file = "nope"', "is not a file"),
                            ('modality = "CT"', "needs field 'dicomweb'")):
        (site_dir / "site.toml").write_text(base + f"\n[source]\n{source}\n")
        with pytest.raises(SiteConfigError, match=problem):
            load_site(site_dir)


def test_a_pacs_that_cannot_be_reached_is_a_named_problem_and_the_site_goes_on_with_its_cache(ingested, tmp_path):
    _, sites, _ = ingested
    site_dir = pacs_site(sites[0], tmp_path)
    port = free_port()  # nothing listens there
    toml = (site_dir / "site.toml").read_text().replace("127.0.0.1:8042", f"127.0.0.1:{port}")
    (site_dir / "site.toml").write_text(toml.replace("retries = 2", "retries = 1"))
    site = load_site(site_dir)
    summary = ingest_site(site)
    assert summary["pacs"] == {"series_listed": 0, "series_downloaded": 0, "instances_downloaded": 0,
                               "series_failed": 0}
    assert summary["rejected"] == {"pacs_unreachable": 1} and summary["exams"] > 0  # the tables were still read
    engine = open_store(site.database_url)
    with Session(engine) as s:
        (problem,) = s.scalars(select(Rejection).where(Rejection.category == "pacs_unreachable")).all()
    engine.dispose()
    assert f"127.0.0.1:{port}" in problem.reason and "after 1 attempts" in problem.reason
