"""DP-SGD cost at a site: seconds per optimizer step of a private local round (Opacus per-sample gradients,
clipping, noise, Poisson sampling) over the same round without DP, per phase, on an ingested tiny site.

  python benchmarks/dp_sgd.py [--steps 6] [--batch 4] [--work /tmp/m3fm-bench]

Both rounds run the code sites run (m3fm/local.py, privacy/dp_local.py) from the same initial weights. A
measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import torch

from client.site import load_site
from m3fm.data.datasets import SiteData
from m3fm.local import PhaseConfig, local_multitask, local_pretrain
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from privacy.budget import DPSGDConfig, SiteBudget
from privacy.dp_local import private_multitask, private_pretrain
from privacy.dp_sgd import PrivacyLedger


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    args = ap.parse_args()
    site = load_site(common.tiny_cohort(args.work / "dp-cohort", sites=1, exams=16)[0])
    cfg = get_config(site.model_config)
    data, tokenizer = SiteData(site.database_url, site.work_dir, cfg), load_tokenizer(cfg)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, physical_batch=args.batch)
    budget = SiteBudget(None, None)
    rows = []
    for phase, plain, private in (("pretrain", local_pretrain, private_pretrain),
                                  ("multitask", local_multitask, private_multitask)):
        pc = PhaseConfig(phase, rounds=1, local_steps=args.steps, batch_size=args.batch, tasks_per_step=1)
        seconds = {}
        for mode in ("plain", "dp-sgd"):
            torch.manual_seed(0)
            model = M3FM(cfg)
            t0 = time.perf_counter()
            if mode == "plain":
                out = plain(model, data, tokenizer, pc, 1, 1)
            else:
                with tempfile.TemporaryDirectory() as ledger_dir:
                    out = private(model, data, tokenizer, pc, 1, 1, dp, budget, PrivacyLedger(Path(ledger_dir)),
                                  ("bench", 1))
            assert out["trained"], out
            seconds[mode] = (time.perf_counter() - t0) / args.steps
        rows.append({"phase": phase, "config": cfg.name, "batch": args.batch, "steps": args.steps,
                     "plain_step_s": seconds["plain"], "dp_step_s": seconds["dp-sgd"],
                     "dp_over_plain": seconds["dp-sgd"] / seconds["plain"]})
    common.report("dp_sgd", "DP-SGD step time over plain step time (same site, same steps)", rows)


if __name__ == "__main__":
    main()
