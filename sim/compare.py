"""`m3fm-sim compare`: federated vs centralized vs local-only, and pretrained vs from scratch, on one cohort.

One compute budget for every arm, counted in micro-batches of one batch size (a pretraining step is one
micro-batch; a multitask step is one micro-batch per task it trains, `tasks_per_step` of them or every task):
  federated            R rounds x k local steps at each of S sites per phase (the real ServerApp round loop and
                       ClientApp, in process), MIM/MLM pretraining then multitask training
  federated-scratch    the same multitask rounds, no pretraining
  centralized          all sites' training data pooled in one place, one optimizer, as many micro-batches per phase
                       as the S sites trained together (a pooled step that trains every task runs fewer steps)
  local-only           each site alone: R x k steps per phase, one optimizer (every site its own model)
Every arm starts from the same initial weights (the run seed's) and is evaluated on each site's test split (a
local-only model on its own site's). The table is the mean AUC per task group over sites and tasks (m3fm/metrics.py
headline AUC); groups a site suppresses (under its minimum cell size) do not enter the mean. Per site and task the
summary keeps the AUC, its DeLong 95% CI and the positives; `curve=True` adds the federated arm's test AUC after
every multitask round (its checkpoints, evaluated afterwards).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.app import app as client_app
from client.site import SiteConfig, load_site
from m3fm.checkpoint import load_checkpoint
from m3fm.data.datasets import PretrainDataset, QADataset, SiteData
from m3fm.evaluation import evaluate_tasks
from m3fm.phase import PhaseConfig
from m3fm.local import multitask_population, multitask_steps, pretrain_steps
from m3fm.metrics import SUPPRESSED
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.tasks import TASKS
from server.config import ServerConfig, load_server_config
from server.rounds import initial_weights, run_federation
from server.store import Checkpoint, Round, last_checkpoint, open_server_store
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


def multitask_micro_batches(pc: PhaseConfig, tasks: int) -> int:
    """Micro-batches one site's multitask steps take: one per task chosen each step."""
    return pc.rounds * pc.local_steps * min(pc.tasks_per_step or tasks, tasks)


def train_alone(model: M3FM, datas: list[SiteData], plan: dict, budget_of, seed: int = 0) -> M3FM:
    """Centralized (several sites pooled) or local-only (one site): each phase as one long run, one optimizer.
    budget_of(phase config, tasks trained) -> the phase's optimizer steps."""
    tokenizer = load_tokenizer(model.cfg)
    for pc in phases(plan):
        if pc.rounds == 0:
            continue
        if pc.name == "pretrain":
            ds = Pooled([PretrainDataset(d, "train", seed=seed) for d in datas])
            long = replace(pc, rounds=1, local_steps=budget_of(pc, 1))
            pretrain_steps(model, ds, sorted(set(ds.keys)), tokenizer, long, 1, seed)
        else:
            ds = Pooled([QADataset(d, "train", tasks=pc.tasks or None, train=True, seed=seed) for d in datas])
            tasks = sorted(set(ds.keys))
            long = replace(pc, rounds=1, local_steps=budget_of(pc, len(tasks)))
            multitask_steps(model, ds, tasks, tokenizer, long, 1, seed)
    return model


def pooled_budget(datas: list[SiteData], min_items: list[int]):
    """The centralized arm's steps: as many micro-batches as the sites trained, each site with its own tasks."""
    def budget_of(pc: PhaseConfig, tasks: int) -> int:
        if pc.name == "pretrain":
            return pc.rounds * pc.local_steps * len(datas)
        site_tasks = [len(multitask_population(d, pc, 1, m)[1]) for d, m in zip(datas, min_items)]
        total = sum(multitask_micro_batches(pc, t) for t in site_tasks)
        return max(1, round(total / min(pc.tasks_per_step or tasks, tasks)))
    return budget_of


def local_budget(pc: PhaseConfig, tasks: int) -> int:
    return pc.rounds * pc.local_steps


def train_federated(sites: list[SiteConfig], plan: dict, model_name: str, out: Path, name: str,
                    seed: int = 0) -> tuple[M3FM, list[tuple[int, str]]]:
    """-> the final model, and (round, checkpoint path) of every multitask round."""
    toml = write_server_toml(out / f"{name}.toml", name, model_name, len(sites), {"evaluate_every": 0, **plan},
                             out_dir=f"runs-{name}", site_reports=False, seed=seed)
    cfg = load_server_config(toml)
    grid = InProcessGrid(client_app, {i + 1: {"site-dir": str(s.site_dir)} for i, s in enumerate(sites)})
    run_id = run_federation(grid, cfg, log=lambda *_: None)
    engine = open_server_store(cfg.database_url)
    with Session(engine) as s:
        path = last_checkpoint(s, run_id).path
        multitask = [(r.round, c.path) for r, c in s.execute(
            select(Round, Checkpoint).join(Checkpoint, (Checkpoint.run_id == Round.run_id) & (Checkpoint.round == Round.round))
            .where(Round.run_id == run_id, Round.phase == "multitask").order_by(Round.round))]
    engine.dispose()
    model = M3FM(get_config(model_name))
    load_checkpoint(path, model)
    return model, multitask


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


def site_metrics(per_site: dict[str, dict[str, dict]]) -> dict:
    """What the summary keeps per site and task: AUC, its 95% CI and the positives (suppressed stays so)."""
    return {k: {t: {f: m.get(f) for f in ("auc", "auc_ci", "positives", "n") if f in m} for t, m in v.items()}
            for k, v in per_site.items()}


def compare(site_dirs: list[Path], plan: dict, out: Path, min_cell: int | None = None, log=print, seed: int = 0,
            curve: bool = False) -> dict:
    sites = [load_site(p) for p in site_dirs]
    model_name = sites[0].model_config
    cfg = get_config(model_name)
    datas = [SiteData(s.database_url, s.work_dir, cfg) for s in sites]
    init = initial_weights(ServerConfig(path=out, model=model_name, seed=seed))  # what the federated arms start from

    def start() -> M3FM:
        model = M3FM(cfg)
        model.load_state_dict(init)
        return model

    results, seconds, rounds = {}, {}, []
    for arm in ARMS:
        t0 = time.perf_counter()
        if arm == "local-only":
            per_site = {}
            for site, data in zip(sites, datas):
                model = train_alone(start(), [data], plan, local_budget, seed)
                per_site[site.site_id] = evaluate(model, site, data, min_cell)
        else:
            if arm == "centralized":
                budget = pooled_budget(datas, [min_cell or s.min_cell_size for s in sites])
                model = train_alone(start(), datas, plan, budget, seed)
            else:
                arm_plan = plan if arm == "federated" else {**plan, "pretrain": {**plan["pretrain"], "rounds": 0}}
                model, checkpoints = train_federated(sites, arm_plan, model_name, out, arm, seed)
                if curve and arm == "federated":
                    rounds = federated_curve(checkpoints, model_name, sites, datas, min_cell)
            if rounds and arm == "federated":  # the curve's last round is the final model: evaluated already
                per_site = rounds[-1].pop("per_site")
            else:
                per_site = {s.site_id: evaluate(model, s, d, min_cell) for s, d in zip(sites, datas)}
        results[arm] = {"groups": group_means(per_site), "sites": site_metrics(per_site)}
        seconds[arm] = time.perf_counter() - t0
        log(f"{arm}: mean AUC {results[arm]['groups']['mean']} ({seconds[arm]:.0f}s)")
    summary = {"sites": [s.site_id for s in sites], "plan": plan, "model": model_name, "seed": seed,
               "min_cell": min_cell or {s.site_id: s.min_cell_size for s in sites}, "arms": results, "seconds": seconds}
    if curve:
        summary["federated_rounds"] = rounds
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def federated_curve(checkpoints: list[tuple[int, str]], model_name: str, sites: list[SiteConfig],
                    datas: list[SiteData], min_cell: int | None) -> list[dict]:
    """The federated arm's test AUC per task group after each multitask round; the last row also keeps its full
    evaluation ("per_site"), which is the final model's."""
    rows = []
    for rnd, path in checkpoints:
        model = M3FM(get_config(model_name))
        load_checkpoint(path, model)
        per_site = {s.site_id: evaluate(model, s, d, min_cell) for s, d in zip(sites, datas)}
        rows.append({"round": rnd, "groups": group_means(per_site), "sites": site_metrics(per_site)})
    if rows:
        rows[-1]["per_site"] = per_site
    return rows
