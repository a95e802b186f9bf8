"""Does a site alone, FedAvg, or pooling learn emphysema, with its low-attenuation window encoded -1..1 (the public
code's scaling, before session 14) or "below" (-900 HU and above 0, -1000 HU 1: m3fm/tasks.py HUWindow)?

  python benchmarks/window_encoding.py --cohort /tmp/demo/cohort [--sites site-01 site-04] [--rounds 8] [--steps 75]

Emphysema alone, the tiny model, lr 1e-3, batch 8, no pretraining. Arms on one budget of micro-batches: the last site
alone (rounds x steps x sites steps), FedAvg over the sites (the real ServerApp round loop and ClientApp in process,
sim/compare.py), and the sites pooled (as many steps as FedAvg's micro-batches). Prints each site's test AUC and,
beside it, the same model's AUC on its training exams (a model that memorises scores 1.00 there and chance on test);
writes results/window_encoding.json. A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import common
import torch

import m3fm.data.datasets
from client.site import load_site
from m3fm.data.crops import normalize_hu
from m3fm.data.datasets import SiteData
from m3fm.evaluation import evaluate_tasks
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from server.config import ServerConfig
from server.rounds import initial_weights
from sim.compare import local_budget, pooled_budget, train_alone, train_federated


def signed(x, window):
    """Every window as the public code scales it, -1..1 (the emphysema window's encoding before session 14)."""
    return normalize_hu(x, window._replace(encoding="signed"))


def auc(model: M3FM, data: SiteData, split: str):
    m = evaluate_tasks(model, data, load_tokenizer(model.cfg), 1, split, tasks=["emphysema"]).get("emphysema", {})
    return round(m["auc"], 3) if isinstance(m.get("auc"), float) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, required=True, help="an ingested cohort whose sites label emphysema")
    ap.add_argument("--sites", nargs="+", default=["site-01", "site-04"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=75)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sites = [load_site(args.cohort / s) for s in args.sites]
    cfg = get_config(sites[0].model_config)
    datas = [SiteData(s.database_url, s.work_dir, cfg) for s in sites]
    plan = {"pretrain": {"rounds": 0, "local_steps": 1},
            "multitask": {"rounds": args.rounds, "local_steps": args.steps, "lr": 1e-3, "warmup_steps": 20,
                          "tasks_per_step": 1, "batch_size": 8, "tasks": ["emphysema"]}}
    alone = {**plan, "multitask": {**plan["multitask"], "rounds": args.rounds * len(sites)}}
    rows = []
    for encoding in ("-1..1 (before)", "below (now)"):
        with mock.patch.object(m3fm.data.datasets, "normalize_hu", signed) if "before" in encoding else nullcontext():
            for arm in (f"{sites[-1].site_id} alone", "FedAvg", "pooled"):
                scored = list(zip(sites, datas)) if arm != f"{sites[-1].site_id} alone" else [(sites[-1], datas[-1])]
                if arm == "FedAvg":
                    model, _ = train_federated(sites, plan, cfg.name, Path(tempfile.mkdtemp()), "fedavg", args.seed)
                else:  # the federated arm's initial weights (the run seed's), trained in one place
                    model = M3FM(cfg)
                    model.load_state_dict(initial_weights(ServerConfig(path=Path(tempfile.mkdtemp()), model=cfg.name,
                                                                       seed=args.seed)))
                    if arm == "pooled":
                        train_alone(model, datas, plan, pooled_budget(datas, [1] * len(sites)), args.seed)
                    else:
                        train_alone(model, datas[-1:], alone, local_budget, args.seed)
                row = {"encoding": encoding, "arm": arm}
                for site, data in scored:
                    row[site.site_id] = f"{auc(model, data, 'test')} (train {auc(model, data, 'train')})"
                rows.append(row)
                print(row, flush=True)
    cols = ["encoding", "arm", *(s.site_id for s in sites)]
    rows = [{c: r.get(c, "-") for c in cols} for r in rows]
    common.report("window_encoding", f"emphysema test AUC (training-exam AUC), {args.rounds} x {args.steps} steps "
                  f"a site", rows, {"plan": plan, "cohort": str(args.cohort), "seed": args.seed})


if __name__ == "__main__":
    main()
