"""Does the model's answer depend on the question? Local multitask training at one site, then one yes/no task's
AUC on the train and test splits, its correlation with a classical image index, and the same test items asked
other questions (a task-conditioned model answers them differently).

  python benchmarks/task_conditioning.py --site SITE_DIR [--steps 200] [--task emphysema] [--seeds 0 1 2]
                                         [--only-task]

Written to find why emphysema came out inverted at one site (issue 14): the emphysema index is the classical
LAA-950 (fraction of lung voxels below -950 HU in the cached lungs crop). A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from client.site import load_site
from m3fm.data.collate import collate_qa
from m3fm.data.crops import read_memmap
from m3fm.data.datasets import QADataset, SiteData
from m3fm.evaluation import collect_predictions
from m3fm.phase import PhaseConfig
from m3fm.local import local_multitask
from m3fm.model.configs import get_config
from m3fm.model.heads import task_probabilities
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.tasks import get_task

OTHER_QUESTIONS = ("Is there consolidation?", "Is there atelectasis?", "Does the patient have COVID-19?")


def laa950(data: SiteData, exam_id: str) -> float:
    arr = read_memmap(data.work_dir / data.series[exam_id][0].crops["lungs"].path).astype(np.float32)
    lung = arr[(arr > -1100) & (arr < -500)]
    return float(np.mean(lung < -950)) if lung.size else 0.0


def run(data: SiteData, task: str, steps: int, seed: int, only_task: bool, lr: float, warmup: int,
        tasks_per_step: int = 0) -> dict:
    torch.manual_seed(seed)
    model, tokenizer = M3FM(data.cfg), load_tokenizer(data.cfg)
    pc = PhaseConfig("multitask", rounds=1, local_steps=steps, batch_size=4, tasks=(task,) if only_task else (),
                     lr=lr, warmup_steps=warmup, tasks_per_step=tasks_per_step)
    local_multitask(model, data, tokenizer, pc, 1, 1, seed=seed)
    row = {"seed": seed, "trained on": task if only_task else "every task"}
    for split in ("train", "test"):
        p = collect_predictions(model, data, tokenizer, split, tasks=[task])[task]
        y = np.asarray(p.answers) == 0
        row[f"{split} AUC"] = round(float(roc_auc_score(y, p.probs[:, 0])), 3)
        row[f"{split} corr(P(yes), LAA950)"] = round(float(np.corrcoef(p.probs[:, 0],
                                                                        [laa950(data, e) for e in p.exam_ids])[0, 1]), 3)
    model.eval()
    samples = [s for s in QADataset(data, "test", tasks=[task], train=False)]
    with torch.no_grad():
        answers = [task_probabilities(get_task(task), model(collate_qa([{**s, "question": q} for s in samples],
                                                                        tokenizer, data.cfg))[0])[:, 0].numpy()
                   for q in (get_task(task).questions[0], *OTHER_QUESTIONS)]
    # how much the answer to the same item moves when another question is asked (0: the question is ignored)
    row["answer change, other questions"] = round(float(np.mean([np.abs(a - answers[0]).mean() for a in answers[1:]])), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", type=Path, required=True, help="an ingested site folder")
    ap.add_argument("--task", default="emphysema")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=PhaseConfig.lr)
    ap.add_argument("--warmup", type=int, default=0, help="warmup steps")
    ap.add_argument("--tasks-per-step", type=int, default=0, help="micro-batches (one task each) per optimizer step; "
                    "0: every task")
    ap.add_argument("--name", default="", help="suffix of the result file")
    ap.add_argument("--only-task", action="store_true", help="train on --task alone (the single-task reference)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    site = load_site(args.site)
    data = SiteData(site.database_url, site.work_dir, get_config("tiny"))
    rows = [run(data, args.task, args.steps, s, args.only_task, args.lr, args.warmup, args.tasks_per_step)
            for s in args.seeds]
    name = "task_conditioning" + ("-single" if args.only_task else "") + (f"-{args.name}" if args.name else "")
    common.report(name, f"{site.site_id}: {args.task} after {args.steps} local multitask steps (tiny, lr {args.lr})",
                  rows, {"site": site.site_id, "task": args.task, "steps": args.steps, "lr": args.lr,
                         "warmup": args.warmup, "tasks per step": args.tasks_per_step})


if __name__ == "__main__":
    main()
