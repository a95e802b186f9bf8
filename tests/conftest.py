import pytest

from client.ingest import ingest_site
from client.site import load_site
import torch

from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from sim.cohort.generate import generate_cohort
from sim.cohort.presets import build_sites


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    return load_tokenizer(tiny_cfg)


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return M3FM(tiny_cfg)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """The tiny synthetic cohort (3 sites), written once per test session; tests must not change it."""
    out = tmp_path_factory.mktemp("cohort")
    summaries = generate_cohort(out, build_sites("tiny"), seed=0, workers=2)
    return out, summaries


@pytest.fixture(scope="session")
def ingested(cohort):
    """The tiny cohort's three sites, ingested once per session (work folders beside the site folders)."""
    out, _ = cohort
    sites = [load_site(p) for p in sorted(out.glob("site-*"))]
    summaries = [ingest_site(site, workers=2) for site in sites]
    return out, sites, summaries


@pytest.fixture
def cluster(tmp_path):
    """Processes a test starts (servers, sites), stopped by their PID afterwards."""
    from transport.flower import stop

    procs = []
    yield procs, tmp_path
    for p in procs:
        stop(p, timeout=20)
