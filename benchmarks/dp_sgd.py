"""DP-SGD cost at a site: seconds per optimizer step and peak memory of a patient-level private local round over the
same round without DP, per model configuration and phase, at equal patients per step.

  python benchmarks/dp_sgd.py [--configs tiny small] [--base] [--steps 8] [--batch 4] [--clipping hooks fast]
                              [--repeats 3] [--interleave] [--poisson] [--work /tmp/m3fm-bench] [--device cpu]

Both rounds run the code sites run (m3fm/local.py with one task or scale per step, privacy/dp_local.py) from the
same initial weights on a tiny synthetic site ingested for each configuration's crops. A plain step trains `batch`
items of one key (each repeat's round draws its own, seeded by the repeat); a private step trains one item of each
of `batch` patients drawn at random (the same number of items, so the ratio is the cost of privacy alone; a key with
fewer than `batch` patients draws some of them twice), or with --poisson one item of each Poisson-sampled patient,
as a site does (`batch` patients on average: fewer or more items than the plain step, so the ratio moves with the
draw).
Every (configuration, phase, mode) runs in a fresh process, so its peak memory (VmHWM on CPU, max allocated on a
GPU) is its own; step time is (a round of 2 + steps steps - a round of 2 steps) / steps, after a warm-up round, so
round setup is left out, each round the fastest of --repeats timings (the machine is shared). With --interleave,
plain and private rounds alternate in one process, --repeats pairs, and the ratio is the median over the pairs
(with its range): the run-to-run noise of separate processes (up to +-0.3 here) falls on both modes alike, and each
mode's peak memory comes from a short run of its own. "dp / plain per item" divides each round's time by the items
it trained. On a CPU the ratio is also given in the process's CPU time (torch runs one thread here): wall time takes
in every moment the shared machine gives to other work, CPU time only this process's own work. --base adds
M3FM-Base at batch 2 (`--configs --base` alone writes results/dp_sgd-base.json). A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
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


def measure(site_dir: str, config: str, phase: str, modes: tuple[str, ...], steps: int, batch: int, device: str,
            clipping: str, fixed_batch: bool = True, repeats: int = 3) -> dict:
    """In a fresh process: seconds per step of each of `modes` (plain, dp) and the process's peak memory. With both
    modes, their rounds alternate on the same model (plain, dp, plain, dp, ...), so a slow moment of the machine
    falls on both alike, and the ratio is the median over the pairs."""
    import torch

    from client.site import load_site
    from m3fm.data.datasets import SiteData
    from m3fm.phase import PhaseConfig
    from m3fm.local import local_multitask, local_pretrain
    from m3fm.model.configs import get_config
    from m3fm.model.m3fm import M3FM
    from m3fm.model.text import load_tokenizer
    from privacy.budget import DPSGDConfig, SiteBudget
    from privacy.dp_local import private_multitask, private_pretrain
    from privacy.accounting import PrivacyLedger
    from privacy.dp_sgd import PatientSampler

    torch.set_num_threads(1)
    items = [0]  # items trained a round
    sample = PatientSampler.sample

    def counted(self, key):
        got = sample(self, key)  # drawn either way: it counts the key's step for the ledger the round writes
        if fixed_batch:  # the timing's sample: `batch` patients (the plain step's items), one item of each; a key
            # with fewer patients (this small site has one) takes every patient, then draws some again, up to
            # `batch` items: the step's cost at the plain step's items, not a cheaper step
            units = self.units[key]
            patients = self.choice.sample(units, min(batch, len(units)))
            patients += [self.choice.choice(units) for _ in range(batch - len(patients))]
            got = [self.choice.choice(u) for u in patients]
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

    def one_round(mode: str, n: int, seed: int = 0) -> tuple[float, float, int]:
        pc = PhaseConfig(phase, rounds=1, local_steps=n, batch_size=batch, tasks_per_step=1)
        items[0] = 0 if mode == "dp" else n * batch
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "plain":
            out = (local_pretrain if phase == "pretrain" else local_multitask)(model, data, tokenizer, pc, 1, 1, seed)
        else:
            run = private_pretrain if phase == "pretrain" else private_multitask
            out = run(model, data, tokenizer, pc, 1, 1, dp, SiteBudget(None, None), PrivacyLedger(Path(ledger_dir)),
                      ("bench", 1))
        assert out["trained"], out
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, items[0]

    def timed_step(mode: str, seed: int) -> tuple[float, float, float]:
        """(seconds a step, CPU seconds a step, items a step): a round of 2 + steps steps less a round of 2 (round
        setup left out). CPU time is the process's own (one thread): a moment the shared machine gives to others
        stretches the wall time, not it."""
        (short, short_cpu, short_items) = one_round(mode, 2, seed)
        (long, long_cpu, long_items) = one_round(mode, 2 + steps, seed)
        return (long - short) / steps, (long_cpu - short_cpu) / steps, (long_items - short_items) / steps

    for mode in modes:
        one_round(mode, 1)  # warm-up: allocator, first-call costs
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timings = {m: [] for m in modes}
    for repeat in range(repeats):
        for mode in modes:
            # a fresh draw each repeat in both modes (the private sampler's seed is secret): a plain round fixed at
            # seed 0 made the ratio lean on how large its few items happened to be
            timings[mode].append(timed_step(mode, repeat + 1))
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else common.rss_bytes_peak()
    shutil.rmtree(ledger_dir, ignore_errors=True)
    out = {"peak_mib": peak / 2**20}
    for mode, ts in timings.items():
        # alone, the fastest of the repeats counts (a slow moment only inflates a round); paired, the median
        pick = min if len(modes) == 1 else statistics.median
        step_s, cpu_s = pick(t for t, _, _ in ts), pick(c for _, c, _ in ts)
        items_a_step = statistics.median(i for _, _, i in ts)
        out[mode] = {"step_s": step_s, "cpu_step_s": cpu_s, "items_per_step": items_a_step,
                     "item_s": step_s / max(items_a_step, 1e-9)}
    if len(modes) == 2:
        out["ratios"] = [d[0] / p[0] for p, d in zip(timings["plain"], timings["dp"])]
        out["cpu_ratios"] = [d[1] / p[1] for p, d in zip(timings["plain"], timings["dp"])]
    return out


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
    ap.add_argument("--repeats", type=int, default=3, help="timings of each round; the fastest counts (with "
                    "--interleave: plain/private pairs, the median ratio counts)")
    ap.add_argument("--interleave", action="store_true", help="time plain and private rounds alternately in one "
                    "process (the ratio over pairs); each mode's peak memory from a short run of its own")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3fm-bench")
    args = ap.parse_args()
    runs = [(c, args.batch, args.steps) for c in args.configs] + ([("base", 2, args.base_steps)] if args.base else [])
    ctx = mp.get_context("spawn")
    rows = []

    def in_fresh_process(*args):
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            return pool.apply(measure, args)

    for config, batch, steps in runs:
        site = str(site_for(config, args.work))
        for phase in (args.base_phases if config == "base" else ("pretrain", "multitask")):
            plain = None if args.interleave else in_fresh_process(site, config, phase, ("plain",), steps, batch,
                                                                  args.device, "hooks", True, args.repeats)
            for clipping in args.clipping:
                sampled = not args.poisson
                if args.interleave:  # timing alternates in one process; each mode's memory alone, 2 steps
                    both = in_fresh_process(site, config, phase, ("plain", "dp"), steps, batch, args.device, clipping,
                                            sampled, args.repeats)
                    if plain is None:
                        plain = in_fresh_process(site, config, phase, ("plain",), 2, batch, args.device, "hooks",
                                                 True, 1)
                    dp_peak = in_fresh_process(site, config, phase, ("dp",), 2, batch, args.device, clipping,
                                               sampled, 1)["peak_mib"]
                    p, d = both["plain"], both["dp"]
                    ratio = statistics.median(both["ratios"])
                    spread = f"{min(both['ratios']):.2f}-{max(both['ratios']):.2f}"
                    cpu = {"dp / plain, CPU time": statistics.median(both["cpu_ratios"]),
                           "CPU range": f"{min(both['cpu_ratios']):.2f}-{max(both['cpu_ratios']):.2f}"}
                else:
                    dp = in_fresh_process(site, config, phase, ("dp",), steps, batch, args.device, clipping, sampled,
                                          args.repeats)
                    p, d, dp_peak = plain["plain"], dp["dp"], dp["peak_mib"]
                    ratio, spread = d["step_s"] / p["step_s"], ""
                    cpu = {"dp / plain, CPU time": d["cpu_step_s"] / p["cpu_step_s"]}
                rows.append({"config": config, "phase": phase, "batch": batch, "steps": steps, "clipping": clipping,
                             "plain step s": p["step_s"], "dp step s": d["step_s"], "dp / plain": ratio,
                             **({"dp / plain range": spread} if args.interleave else {}),
                             **(cpu if args.device == "cpu" else {}),
                             "dp items a step": d["items_per_step"],
                             "dp / plain per item": d["item_s"] / p["item_s"], "plain peak MiB": plain["peak_mib"],
                             "dp peak MiB": dp_peak, "dp / plain memory": dp_peak / plain["peak_mib"]})
                print(rows[-1], flush=True)
    name = ("dp_sgd" if args.configs else "dp_sgd-base") + ("-interleaved" if args.interleave else "")
    common.report(name, f"patient-level DP-SGD step over plain step ({args.device}, "
                  f"{'Poisson-sampled' if args.poisson else 'equal'} patients per step)",
                  rows, {"device": args.device, "sampling": "poisson" if args.poisson else "fixed",
                         "interleaved": args.interleave, "repeats": args.repeats})


if __name__ == "__main__":
    main()
