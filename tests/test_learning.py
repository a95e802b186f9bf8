"""Training learns: a few federated rounds (the real ServerApp round loop and ClientApp, in process) lift a clearly
learnable imaging task above what the untrained model reaches, on exams no site trained on (issue 14).

Emphysema is drawn as low-attenuation holes (sim/cohort/phantom.py): the classical LAA-950 index alone separates it
(tests/test_cohort.py), so a model that trains at all must get it."""

import dataclasses

import numpy as np
import pytest
from sqlalchemy.orm import Session

from client.app import app as client_app
from client.ingest import ingest_site
from client.site import load_site
from m3fm.checkpoint import load_checkpoint
from m3fm.data.datasets import SiteData
from m3fm.evaluation import collect_predictions
from m3fm.metrics import auc_ci
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from server.config import load_server_config
from server.rounds import initial_weights, run_federation
from server.store import last_checkpoint, open_server_store
from sim.cohort.generate import generate_cohort
from sim.cohort.presets import ALL, build_sites
from sim.inprocess_grid import InProcessGrid

TOML = """
[run]
name = "learns"
model = "tiny"
min_sites = 2
round_timeout = 300
out_dir = "runs"
evaluate_every = 0
site_reports = false
[multitask]
rounds = 6
local_steps = 50
batch_size = 8
lr = 1e-3
warmup_steps = 20
tasks = ["emphysema"]
"""


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """Two tiny-preset hospitals of 60 exams that both label emphysema (a different scanner each). Before the
    low-attenuation window was encoded "below" (m3fm/tasks.py) each site fitted its own patients and FedAvg over
    them did too: sites of 110 exams needed 8 x 75 steps, and with 60 exams a site 8 x 75 reached 0.63-0.71."""
    out = tmp_path_factory.mktemp("learning-cohort")
    profiles = [dataclasses.replace(p, tasks=ALL) for p in build_sites("tiny", sites=2, exams_per_site=60)]
    generate_cohort(out, profiles, seed=3, workers=2)
    sites = [load_site(p) for p in sorted(out.glob("site-*"))]
    for site in sites:
        ingest_site(site, workers=2)
    return sites


def held_out_auc(model: M3FM, sites) -> tuple[float, int]:
    """Emphysema AUC over every site's validation and test exams pooled -> ((AUC, 95% CI low, high), exams)."""
    tokenizer, y, score = load_tokenizer(model.cfg), [], []
    for site in sites:
        data = SiteData(site.database_url, site.work_dir, model.cfg)
        for split in ("val", "test"):
            p = collect_predictions(model, data, tokenizer, split, tasks=["emphysema"]).get("emphysema")
            if p is not None:
                y += [a == 0 for a in p.answers]
                score += list(p.probs[:, 0])
    assert 0 < sum(y) < len(y), "the held-out exams need both classes"
    return auc_ci(np.array(y), np.array(score)), len(y)


def test_a_few_federated_rounds_learn_emphysema_beyond_the_untrained_model(two_sites, tmp_path):
    (tmp_path / "server.toml").write_text(TOML)
    cfg = load_server_config(tmp_path / "server.toml")
    untrained = M3FM(get_config("tiny"))
    untrained.load_state_dict(initial_weights(cfg))
    (before, _, _), n = held_out_auc(untrained, two_sites)
    nodes = {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(two_sites)}
    run_id = run_federation(InProcessGrid(client_app, nodes), cfg, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        path = last_checkpoint(s, run_id).path
    engine.dispose()
    trained = M3FM(get_config("tiny"))
    load_checkpoint(path, trained)
    (after, low, high), _ = held_out_auc(trained, two_sites)
    # the bound: far above the untrained model (0.32-0.36 here) and what the model reached while its task token was
    # blind to the image (0.79 [0.68, 0.91] here; 0.79-0.88 over float details): it answered from the clinical text
    # shortcut. With the image's CLS in the token it reaches 0.998 [0.99, 1.00] (issue 14, benchmarks/task_token.py).
    assert before < 0.6, f"the untrained model already reaches {before:.3f}: the task is not a test of learning"
    assert after >= 0.9 and low > 0.8, f"emphysema AUC {before:.3f} -> {after:.3f} [{low:.2f}, {high:.2f}] on {n} " \
                                       "held-out exams"
