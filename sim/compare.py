"""`m3fm-sim compare`: federated vs centralized vs local-only, and pretrained vs from scratch, on one cohort.

One compute budget for every arm, counted in optimizer steps of one batch size:
  federated            R rounds x k local steps at each of S sites per phase (the real ServerApp round loop and
                       ClientApp, in process), MIM/MLM pretraining then multitask training
  federated-scratch    the same multitask rounds, no pretraining
  centralized          all sites' training data pooled in one place: S x R x k steps per phase, one optimizer
  local-only           each site alone: R x k steps per phase, one optimizer (every site its own model)
Every arm starts from the same initial weights and is evaluated on each site's test split (a local-only
model on its own site's). The table is the mean AUC per task group over sites and tasks (m3fm/metrics.py
headline AUC); groups a site suppresses (under its minimum cell size) do not enter the mean.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from client.app import app as client_app
from client.site import SiteConfig, load_site
from m3fm.checkpoint import load_checkpoint
from m3fm.data.datasets import PretrainDataset, QADataset, SiteData
from m3fm.evaluation import evaluate_tasks
from m3fm.local import PhaseConfig, multitask_steps, pretrain_steps
from m3fm.metrics import SUPPRESSED
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.tasks import TASKS
from server.config import ServerConfig, load_server_config
from server.rounds import initial_weights, run_federation
from server.store import last_checkpoint, open_server_store
from sim.federation import write_server_toml
from sim.inprocess_grid import InProcessGrid

GROUPS = tuple(dict.fromkeys(t.group for t in TASKS))  # nodule, cvd, cancer_risk, chest_abnormality, covid, lung_rads
ARMS = ("federated", "federated-scratch", "centralized", "local-only")


class Pooled:
    """Several sites' datasets as one (the centralized baseline): keys and items concatenated."""

    def __init__(self, datasets: list):
        self.parts = [(ds, i) for ds in datasets for i in range(len(ds))]
        self.keys = [k for ds in datasets for k in ds.keys]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int):
        ds, j = self.parts[i]
        return ds[j]


def phases(plan: dict) -> list[PhaseConfig]:
    return [PhaseConfig(name, **plan[name]) for name in ("pretrain", "multitask")]


def train_alone(model: M3FM, datas: list[SiteData], plan: dict, steps_per_round_scale: int, seed: int = 0) -> M3FM:
    """Centralized (several sites pooled) or local-only (one site): each phase as one long run, one optimizer."""
    tokenizer = load_tokenizer(model.cfg)
    for pc in phases(plan):
        if pc.rounds == 0:
            continue
        long = replace(pc, rounds=1, local_steps=pc.rounds * pc.local_steps * steps_per_round_scale)
        if pc.name == "pretrain":
            ds = Pooled([PretrainDataset(d, "train", seed=seed) for d in datas])
            pretrain_steps(model, ds, sorted(set(ds.keys)), tokenizer, long, 1, seed)
        else:
            ds = Pooled([QADataset(d, "train", train=True, seed=seed) for d in datas])
            multitask_steps(model, ds, sorted(set(ds.keys)), tokenizer, long, 1, seed)
    return model


def train_federated(sites: list[SiteConfig], plan: dict, model_name: str, out: Path, name: str) -> M3FM:
    toml = write_server_toml(out / f"{name}.toml", name, model_name, len(sites), {"evaluate_every": 0, **plan},
                             out_dir=f"runs-{name}", site_reports=False)
    cfg = load_server_config(toml)
    grid = InProcessGrid(client_app, {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)})
    run_id = run_federation(grid, cfg, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        path = last_checkpoint(s, run_id).path
    engine.dispose()
    model = M3FM(get_config(model_name))
    load_checkpoint(path, model)
    return model


def evaluate(model: M3FM, site: SiteConfig, data: SiteData, min_cell: int | None) -> dict[str, dict]:
    return evaluate_tasks(model, data, load_tokenizer(model.cfg), min_cell or site.min_cell_size, "test")


def group_means(per_site: dict[str, dict[str, dict]]) -> dict[str, float | str]:
    """Mean headline AUC per task group over every (site, task) with one; SUPPRESSED where there is none."""
    out = {}
    for g in GROUPS:
        aucs = [m["auc"] for tasks in per_site.values() for m in tasks.values()
                if m["group"] == g and isinstance(m.get("auc"), float)]
        out[g] = float(np.mean(aucs)) if aucs else SUPPRESSED
    aucs = [v for v in out.values() if isinstance(v, float)]
    out["mean"] = float(np.mean(aucs)) if aucs else SUPPRESSED
    return out


def compare(site_dirs: list[Path], plan: dict, out: Path, min_cell: int | None = None, log=print) -> dict:
    sites = [load_site(p) for p in site_dirs]
    model_name = sites[0].model_config
    cfg = get_config(model_name)
    datas = [SiteData(s.database_url, s.work_dir, cfg) for s in sites]
    init = initial_weights(ServerConfig(path=out, model=model_name))  # what the federated arms start from

    def start() -> M3FM:
        model = M3FM(cfg)
        model.load_state_dict(init)
        return model

    results, seconds = {}, {}
    for arm in ARMS:
        t0 = time.perf_counter()
        if arm == "local-only":
            per_site = {}
            for site, data in zip(sites, datas):
                model = train_alone(start(), [data], plan, 1)
                per_site[site.site_id] = evaluate(model, site, data, min_cell)
        else:
            if arm == "centralized":
                model = train_alone(start(), datas, plan, len(sites))
            else:
                arm_plan = plan if arm == "federated" else {**plan, "pretrain": {**plan["pretrain"], "rounds": 0}}
                model = train_federated(sites, arm_plan, model_name, out, arm)
            per_site = {s.site_id: evaluate(model, s, d, min_cell) for s, d in zip(sites, datas)}
        results[arm] = {"groups": group_means(per_site),
                        "sites": {k: {t: m.get("auc") for t, m in v.items()} for k, v in per_site.items()}}
        seconds[arm] = time.perf_counter() - t0
        log(f"{arm}: mean AUC {results[arm]['groups']['mean']} ({seconds[arm]:.0f}s)")
    summary = {"sites": [s.site_id for s in sites], "plan": plan, "model": model_name,
               "min_cell": min_cell or {s.site_id: s.min_cell_size for s in sites}, "arms": results, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
