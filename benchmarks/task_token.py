"""Does a fresh model learn an image finding next to clinical text? One image task trained on the sites' pooled
training splits, over seeds, with the <TASK> token holding the image's CLS output (the model now) or the question
alone (the public code's token, as before issue 14), and the latter with the clinical text left out.

  python benchmarks/task_token.py --cohort /tmp/ceval [--task emphysema] [--steps 400] [--seeds 0 1 2 3]

Emphysema in its window is separated by the crop's mean intensity alone (AUC 1.00 on the eval cohort), so a model
that stalls below that is not short of signal. Prints, per arm and seed, the pooled test and train AUC after each
quarter of the steps and the first step with test AUC >= 0.95; writes results/task_token.json. A measurement,
never pass/fail.
"""

from __future__ import annotations

import argparse
import dataclasses
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import common
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from client.site import load_site
import m3fm.data.collate
from m3fm.data.datasets import QADataset, SiteData
from m3fm.evaluation import collect_predictions
from m3fm.phase import PhaseConfig
from m3fm.local import multitask_steps
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from sim.compare import Pooled

# arm -> (task_image_summary, clinical text kept)
ARMS = {"question + image CLS (now)": (True, True), "question only (public code)": (False, True),
        "question only, no clinical text": (False, False)}


def pooled_auc(model: M3FM, datas: list[SiteData], tokenizer, task: str, split: str) -> float:
    ys, ps = [], []
    for d in datas:
        p = collect_predictions(model, d, tokenizer, split, tasks=[task])[task]
        ys.append(np.asarray(p.answers) == 0)
        ps.append(p.probs[:, 0])
    return float(roc_auc_score(np.concatenate(ys), np.concatenate(ps)))


def run(datas, task: str, steps: int, batch_size: int, lr: float, seed: int, summary: bool) -> dict:
    cfg = dataclasses.replace(datas[0].cfg, task_image_summary=summary)
    torch.manual_seed(seed)
    model, tokenizer = M3FM(cfg), load_tokenizer(cfg)
    ds = Pooled([QADataset(d, "train", tasks=[task], train=True, seed=seed) for d in datas])
    row, first = {}, None
    for quarter in range(1, 5):
        pc = PhaseConfig("multitask", rounds=4, local_steps=steps // 4, batch_size=batch_size, lr=lr, tasks=(task,))
        multitask_steps(model, ds, [task], tokenizer, pc, quarter, seed)
        test = pooled_auc(model, datas, tokenizer, task, "test")
        row[f"test AUC @{quarter * pc.local_steps}"] = round(test, 3)
        row[f"train AUC @{quarter * pc.local_steps}"] = round(pooled_auc(model, datas, tokenizer, task, "train"), 3)
        if first is None and test >= 0.95:
            first = quarter * pc.local_steps
    row["first step >= 0.95"] = first if first is not None else "-"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, required=True)
    ap.add_argument("--task", default="emphysema")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = ap.parse_args()
    torch.set_num_threads(1)
    sites = [s for s in (load_site(p) for p in sorted(args.cohort.glob("site-*"))) if args.task in s.tasks]
    cfg = get_config(sites[0].model_config)
    datas = [SiteData(s.database_url, s.work_dir, cfg) for s in sites]
    rows = []
    for arm, (summary, text) in ARMS.items():
        for seed in args.seeds:
            # without text: every clinical sentence dropped, in training and in evaluation
            with nullcontext() if text else mock.patch.object(m3fm.data.collate, "clinical_text", lambda *a, **k: ""):
                row = run(datas, args.task, args.steps, args.batch_size, args.lr, seed, summary)
            rows.append({"arm": arm, "seed": seed, **row})
            print(rows[-1], flush=True)
    common.report("task_token", f"{args.task} on {' + '.join(s.site_id for s in sites)} pooled, batch "
                  f"{args.batch_size}, lr {args.lr}: what the <TASK> token holds",
                  rows, {"task": args.task, "sites": [s.site_id for s in sites], "seeds": args.seeds})


if __name__ == "__main__":
    main()
