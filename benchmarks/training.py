"""Training throughput: samples per second of a pretraining step (MIM + MLM) and of a multitask step, per model
configuration, on this machine's device; with the model FLOPs of one step (PyTorch's FlopCounterMode) and, on a
GPU, model FLOP utilization against the device's dense bf16 peak. Synthetic batches (sim/toy_batches.py), the same
pretrain_step / multitask_step the sites run.

  python benchmarks/training.py [--configs tiny small] [--batch 4] [--steps 5] [--peak-tflops N]
"""

from __future__ import annotations

import argparse
import random
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
from torch.utils.flop_counter import FlopCounterMode

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.train import TrainConfig, build_optimizer, multitask_step, pretrain_step
from sim.toy_batches import toy_pretrain_samples, toy_qa_samples

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(config: str, phase: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = get_config(config)
    tokenizer = load_tokenizer(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = M3FM(cfg).to(device)
    tc = TrainConfig(lr=1e-4, warmup_steps=0, total_steps=steps + 2)
    optimizer = build_optimizer(model, tc)
    rng = random.Random(0)
    scale = "chest"  # a both-lungs crop: the scale most tasks look at
    if phase == "pretrain":
        batch_data = collate_pretrain(toy_pretrain_samples(cfg, scale, batch), tokenizer, cfg)
        step = lambda i: pretrain_step(model, optimizer, batch_data, tokenizer, tc, i)  # noqa: E731
    else:
        micro = [collate_qa(toy_qa_samples(cfg, "atelectasis", batch), tokenizer, cfg, rng)]
        step = lambda i: multitask_step(model, optimizer, micro, tc, i)  # noqa: E731
    step(0)  # warm-up: allocations, kernels
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(2 + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {"config": config, "phase": phase, "device": str(device), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "batch": batch, "step_s": seconds, "samples_per_s": batch / seconds, "gflop_per_step": flops / 1e9,
            "achieved_tflops": flops / seconds / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: known GPUs)")
    args = ap.parse_args()
    peak = peak_tflops(args.peak_tflops)
    rows = []
    for config in args.configs:
        for phase in ("pretrain", "multitask"):
            row = measure(config, phase, args.batch, args.steps)
            row["mfu"] = row["achieved_tflops"] / peak if peak else "n/a (CPU)"
            rows.append(row)
    common.report("training", "training throughput (one micro-batch per step; FLOPs counted by PyTorch)", rows,
                  {"peak_tflops": peak})


if __name__ == "__main__":
    main()
