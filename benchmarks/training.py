"""Training throughput: samples per second of a pretraining step (MIM + MLM) and of a multitask step, per model
configuration and number of local ranks, on this machine's devices; with the model FLOPs of one step (PyTorch's
FlopCounterMode) and, on GPUs, model FLOP utilization against the devices' dense bf16 peak. Synthetic batches
(sim/toy_batches.py), the same pretrain_step / multitask_step the sites run.

A step is the same work whatever the number of ranks: --micro-batches micro-batches of --batch samples (pretraining:
crops of one scale; multitask: one task each, different tasks), which N ranks share as a site's ranks do
(m3fm/local.py, m3fm/distributed.py: gloo on CPU, NCCL on GPUs, one all-reduce a step). On CPU each rank gets
cores / N threads, so N=1 and N=2 use the same cores.

  python benchmarks/training.py [--configs tiny small] [--devices 1 2] [--batch 4] [--micro-batches 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.distributed import Ranks
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.train import TrainConfig, build_optimizer, multitask_step, pretrain_step
from sim.toy_batches import toy_pretrain_samples, toy_qa_samples

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity
TASKS = ("atelectasis", "nodule_presence", "cvd_diagnosis", "lung_rads")  # one per micro-batch, in turn


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def rank_steps(rank: int, world: int, init: str, config: str, phase: str, batch: int, micro_batches: int, steps: int,
               out: str) -> None:
    """One rank (or the single process) of the measurement: its share of every step's micro-batches."""
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    ranks = Ranks(rank, world) if world > 1 else None
    torch.manual_seed(0)
    cfg = get_config(config)
    tokenizer = load_tokenizer(cfg)
    model = M3FM(cfg).to(device)
    tc = TrainConfig(lr=1e-4, warmup_steps=0, total_steps=steps + 2)
    optimizer = build_optimizer(model, tc)
    rng = random.Random(0)
    if phase == "pretrain":
        every = [collate_pretrain(toy_pretrain_samples(cfg, "chest", batch, seed=j), tokenizer, cfg)
                 for j in range(micro_batches)]  # "chest": a both-lungs crop, the scale most tasks look at
    else:
        every = [collate_qa(toy_qa_samples(cfg, TASKS[j % len(TASKS)], batch, seed=j), tokenizer, cfg, rng)
                 for j in range(micro_batches)]
    mine = ranks.share(every) if ranks is not None else every
    hook = ranks.before_step(model, len(mine)) if ranks is not None else None
    if phase == "pretrain":
        step = lambda i: pretrain_step(model, optimizer, mine, tokenizer, tc, i, before_step=hook)  # noqa: E731
    else:
        step = lambda i: multitask_step(model, optimizer, mine, tc, i, before_step=hook)  # noqa: E731
    step(0)  # warm-up: allocations, kernels
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = torch.tensor([float(counter.get_total_flops())], device=device)
    if world > 1:
        dist.all_reduce(flops)  # the step's FLOPs over all ranks
        dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(2 + i)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                                         "step_s": seconds, "flops": float(flops.sum())}))


def measure(config: str, phase: str, devices: int, batch: int, micro_batches: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        args = (devices, f"file://{Path(tmp) / 'rendezvous'}", config, phase, batch, micro_batches, steps, out)
        mp.spawn(rank_steps, args=args, nprocs=devices, join=True)  # N=1 too: the same process setup
        got = json.loads(Path(out).read_text())
    samples = batch * micro_batches
    return {"config": config, "phase": phase, "devices": devices,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "params_m": got["params_m"],
            "samples_per_step": samples, "step_s": got["step_s"], "samples_per_s": samples / got["step_s"],
            "gflop_per_step": got["flops"] / 1e9, "achieved_tflops": got["flops"] / got["step_s"] / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument("--devices", nargs="+", type=int, default=[1], help="local ranks to measure (one per GPU)")
    ap.add_argument("--phases", nargs="+", default=["pretrain", "multitask"])
    ap.add_argument("--batch", type=int, default=4, help="samples per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step, shared among the ranks")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="one device's dense peak (default: known GPUs)")
    ap.add_argument("--out", default="training", help="results/NAME.json")
    args = ap.parse_args()
    peak = peak_tflops(args.peak_tflops)
    if torch.cuda.is_available() and max(args.devices) > torch.cuda.device_count():
        ap.error(f"--devices {max(args.devices)}: this machine has {torch.cuda.device_count()} GPU(s)")
    rows = []
    for config in args.configs:
        for phase in args.phases:
            first = None
            for n in args.devices:
                row = measure(config, phase, n, args.batch, args.micro_batches, args.steps)
                first = first or row
                row["speedup"] = row["samples_per_s"] / first["samples_per_s"]  # over the first --devices listed
                row["mfu"] = row["achieved_tflops"] / (peak * n) if peak else "n/a (CPU)"
                rows.append(row)
    not_measured = [] if torch.cuda.is_available() else [
        "GPU rows (base pretraining throughput and bf16 MFU on 1 GPU): no GPU on this machine, and none was lent "
        "to this task by the device tool"]
    common.report(args.out, "training throughput per number of local ranks (the same step work for every N; FLOPs "
                  "counted by PyTorch)", rows, {"peak_tflops": peak, "not_measured": not_measured,
                                                "batch": args.batch, "micro_batches": args.micro_batches})


if __name__ == "__main__":
    main()
