"""DP-SGD cost at a site: seconds per optimizer step and peak memory of a patient-level private local round over the
same round without DP, per model configuration and phase, at equal patients per step.

  python benchmarks/dp_sgd.py [--configs tiny small] [--base] [--steps 8] [--batch 4] [--clipping hooks fast]
                              [--repeats 3] [--poisson] [--work /tmp/m3fm-bench] [--device cpu]

Both rounds run the code sites run (m3fm/local.py with one task or scale per step, privacy/dp_local.py) from the
same initial weights on a tiny synthetic site ingested for each configuration's crops. A plain step trains `batch`
items of one key; a private step trains one item of each of `batch` patients drawn at random (the same number of
items, so the ratio is the cost of privacy alone), or with --poisson one item of each Poisson-sampled patient, as a
site does (`batch` patients on average: fewer or more items than the plain step, so the ratio moves with the draw).
Every (configuration, phase, mode) runs in a fresh process, so its peak memory (VmHWM on CPU, max allocated on a
GPU) is its own; step time is (a round of 2 + steps steps - a round of 2 steps) / steps, after a warm-up round, so
round setup is left out, each round the fastest of --repeats timings (the machine is shared). "dp / plain per item"
divides each round's time by the items it trained. --base adds M3FM-Base at batch 2 (`--configs --base` alone
writes results/dp_sgd-base.json). A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
import tomllib
from pathlib import Path

import common

import tomli_w


def site_for(config: str, work: Path) -> Path:
    """The tiny cohort's first site, ingested again with `config`'s crops (reused when there)."""
    tiny = common.tiny_cohort(work / "dp-cohort", sites=1, exams=16)[0]
    if config == "tiny":
        return tiny
    folder = work / f"dp-site-{config}"
    if not (folder / "site.toml").is_file():
        from client.ingest import ingest_site
        from client.site import load_site

        shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("site.toml"), dirs_exist_ok=True)
        toml = tomllib.loads((tiny / "site.toml").read_text())
        toml["storage"]["work_dir"] = str(work / f"dp-work-{config}")
        toml["ingest"]["model_config"] = config
        (folder / "site.toml").write_text(tomli_w.dumps(toml))
        ingest_site(load_site(folder), workers=2)
    return folder


def measure(site_dir: str, config: str, phase: str, mode: str, steps: int, batch: int, device: str,
            clipping: str, fixed_batch: bool = True, repeats: int = 3) -> dict:
    """In a fresh process: seconds per step and peak memory of `mode` (plain or dp) rounds."""
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

    from privacy.dp_sgd import PatientSampler

    torch.set_num_threads(1)
    items = [0]  # items trained a round
    sample = PatientSampler.sample

    def counted(self, key):
        got = sample(self, key)  # drawn either way: it counts the key's step for the ledger the round writes
        if fixed_batch:  # the timing's sample: `batch` patients (the plain step's items), one item of each
            got = [self.choice.choice(u) for u in self.choice.sample(self.units[key], min(batch, len(self.units[key])))]
        items[0] += len(got)
        return got

    PatientSampler.sample = counted
    site = load_site(Path(site_dir))
    cfg = get_config(config)
    data, tokenizer = SiteData(site.database_url, site.work_dir, cfg), load_tokenizer(cfg)
    torch.manual_seed(0)
    model = M3FM(cfg).to(device)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, physical_batch=batch, clipping=clipping)
    ledger_dir = tempfile.mkdtemp()

    def one_round(n: int) -> tuple[float, int]:
        pc = PhaseConfig(phase, rounds=1, local_steps=n, batch_size=batch, tasks_per_step=1)
        items[0] = 0 if mode == "dp" else n * batch
        t0 = time.perf_counter()
        if mode == "plain":
            out = (local_pretrain if phase == "pretrain" else local_multitask)(model, data, tokenizer, pc, 1, 1)
        else:
            run = private_pretrain if phase == "pretrain" else private_multitask
            out = run(model, data, tokenizer, pc, 1, 1, dp, SiteBudget(None, None), PrivacyLedger(Path(ledger_dir)),
                      ("bench", 1))
        assert out["trained"], out
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, items[0]

    one_round(1)  # warm-up: allocator, first-call costs
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # the fastest of `repeats` timings of each round: this machine is shared, and a slow moment inflates a round
    (short, short_items), (long, long_items) = (min(one_round(n) for _ in range(repeats)) for n in (2, 2 + steps))
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else common.rss_bytes_peak()
    shutil.rmtree(ledger_dir, ignore_errors=True)
    return {"step_s": (long - short) / steps, "items_per_step": (long_items - short_items) / steps,
            "item_s": (long - short) / max(long_items - short_items, 1), "peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=["tiny", "small"], help="none with --base: the base rows alone")
    ap.add_argument("--base", action="store_true", help="also M3FM-Base at batch 2")
    ap.add_argument("--base-steps", type=int, default=3, help="timed steps of the base rows")
    ap.add_argument("--base-phases", nargs="+", default=["pretrain", "multitask"],
                    help="base multitask needs more than 24 GiB at batch 2 on a CPU (no activation checkpointing)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clipping", nargs="+", default=["hooks", "fast"], help="Opacus per-sample clipping modes")
    ap.add_argument("--poisson", action="store_true", help="private steps sample patients as a site does (Poisson), "
                    "not exactly `batch` of them")
    ap.add_argument("--repeats", type=int, default=3, help="timings of each round; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    args = ap.parse_args()
    runs = [(c, args.batch, args.steps) for c in args.configs] + ([("base", 2, args.base_steps)] if args.base else [])
    ctx = mp.get_context("spawn")
    rows = []
    for config, batch, steps in runs:
        site = str(site_for(config, args.work))
        for phase in (args.base_phases if config == "base" else ("pretrain", "multitask")):
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                plain = pool.apply(measure, (site, config, phase, "plain", steps, batch, args.device, "hooks", True,
                                             args.repeats))
            for clipping in args.clipping:
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    dp = pool.apply(measure, (site, config, phase, "dp", steps, batch, args.device, clipping,
                                              not args.poisson, args.repeats))
                rows.append({"config": config, "phase": phase, "batch": batch, "steps": steps, "clipping": clipping,
                             "plain step s": plain["step_s"], "dp step s": dp["step_s"],
                             "dp / plain": dp["step_s"] / plain["step_s"], "dp items a step": dp["items_per_step"],
                             "dp / plain per item": dp["item_s"] / plain["item_s"], "plain peak MiB": plain["peak_mib"],
                             "dp peak MiB": dp["peak_mib"], "dp / plain memory": dp["peak_mib"] / plain["peak_mib"]})
                print(rows[-1], flush=True)
    common.report("dp_sgd" if args.configs else "dp_sgd-base", f"patient-level DP-SGD step over plain step ({args.device}, "
                  f"{'Poisson-sampled' if args.poisson else 'equal'} patients per step)",
                  rows, {"device": args.device, "sampling": "poisson" if args.poisson else "fixed"})


if __name__ == "__main__":
    main()
