"""How much data does one task need? One task trained on one site's training split, or on several sites' pooled,
with the train and test AUC of every site after each quarter of the steps.

  python benchmarks/pooling.py --cohort /tmp/c14 --sites site-01 [site-04 ...] [--task emphysema] [--steps 600]
                               [--batch-size 8] [--lr 1e-3] [--seed 0] [--eval-draws 1]

--eval-draws K scores each test split K times, each with other draws of what an evaluation item leaves to chance
(where a negative's nodule slab is cut, which lung an unlabelled item shows), and gives the mean and spread: with
one draw, nodule presence's test AUC moved by 0.03-0.06 between draws on the same model (docs/learning.md).

Written for issue 14: site-01's 78 emphysema training exams are memorised (train AUC 1.00, test near chance) while
site-01 and site-04 pooled are learned at both sites: the reason a small site needs the federation. A measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from client.site import load_site
from m3fm.data.datasets import QADataset, SiteData
from m3fm.evaluation import collect_predictions
from m3fm.phase import PhaseConfig
from m3fm.local import multitask_steps
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.model.configs import get_config
from sim.compare import Pooled


def auc(p) -> float:
    return float(roc_auc_score(np.asarray(p.answers) == 0, p.probs[:, 0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, required=True)
    ap.add_argument("--sites", nargs="+", required=True, help="site folder names whose training splits are pooled")
    ap.add_argument("--task", default="emphysema")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-draws", type=int, default=1, help="test AUC as the mean over this many evaluation draws")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sites = [load_site(args.cohort / s) for s in args.sites]
    cfg = get_config(sites[0].model_config)
    datas = [SiteData(s.database_url, s.work_dir, cfg) for s in sites]
    torch.manual_seed(args.seed)
    model, tokenizer = M3FM(cfg), load_tokenizer(cfg)
    ds = Pooled([QADataset(d, "train", tasks=[args.task], train=True, seed=args.seed) for d in datas])
    rows = []
    for quarter in range(1, 5):
        pc = PhaseConfig("multitask", rounds=4, local_steps=args.steps // 4, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=20, tasks=(args.task,))
        losses, _ = multitask_steps(model, ds, [args.task], tokenizer, pc, quarter, args.seed)
        row = {"steps": quarter * pc.local_steps, "train loss (last 20)": round(float(np.mean(losses[args.task][-20:])), 3)}
        for site, data in zip(sites, datas):
            for split, draws in (("train", 1), ("test", args.eval_draws)):
                aucs = [auc(collect_predictions(model, data, tokenizer, split, tasks=[args.task], draw=k)[args.task])
                        for k in range(draws)]
                row[f"{site.site_id} {split} AUC"] = round(float(np.mean(aucs)), 3)
                if draws > 1:
                    row[f"{site.site_id} {split} AUC sd over draws"] = round(float(np.std(aucs)), 3)
        rows.append(row)
        print(row, flush=True)
    name = f"pooling-{args.task}-{'+'.join(args.sites)}" + (f"-seed{args.seed}" if args.seed else "")
    common.report(name, f"{args.task} trained on {' + '.join(args.sites)} pooled ({len(ds)} training items, batch "
                  f"{args.batch_size}, lr {args.lr})", rows, {"sites": args.sites, "task": args.task, "seed": args.seed,
                                                                    "eval_draws": args.eval_draws})


if __name__ == "__main__":
    main()
