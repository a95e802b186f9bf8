"""Local training demo of the full model: pretraining then multitask steps, checkpoint, strict reload."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from m3fm.checkpoint import load_checkpoint, save_checkpoint
from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.tasks import ALL_TASKS
from m3fm.train import TrainConfig, build_optimizer, multitask_step, pretrain_step
from sim.toy_batches import toy_pretrain_samples, toy_qa_samples


def run_model_demo(config: str, steps: int, out: Path, batch: int = 4, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    cfg = get_config(config)
    tokenizer = load_tokenizer(cfg)
    model = M3FM(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tc = TrainConfig(lr=1e-3, warmup_steps=max(1, steps // 10), total_steps=2 * steps)
    optimizer = build_optimizer(model, tc)
    rng = random.Random(seed)
    result: dict = {"config": config, "device": str(device), "steps": steps, "pretrain": [], "multitask": []}

    t0 = time.perf_counter()
    for step in range(steps):
        scale = cfg.scales[step % len(cfg.scales)].name
        pb = collate_pretrain(toy_pretrain_samples(cfg, scale, batch, seed=step % 4), tokenizer, cfg)
        result["pretrain"].append(pretrain_step(model, optimizer, pb, tokenizer, tc, step))
    result["pretrain_seconds"] = time.perf_counter() - t0
    log(f"pretraining: {steps} steps in {result['pretrain_seconds']:.1f}s, "
        f"loss {result['pretrain'][0]['loss']:.3f} -> {result['pretrain'][-1]['loss']:.3f}")

    t0 = time.perf_counter()
    for step in range(steps):
        micro = [collate_qa(toy_qa_samples(cfg, t.name, batch, seed=step % 4), tokenizer, cfg, rng) for t in ALL_TASKS]
        result["multitask"].append(multitask_step(model, optimizer, micro, tc, steps + step))
    result["multitask_seconds"] = time.perf_counter() - t0
    log(f"multitask: {steps} steps x {len(ALL_TASKS)} tasks in {result['multitask_seconds']:.1f}s, "
        f"loss {result['multitask'][0]['loss']:.3f} -> {result['multitask'][-1]['loss']:.3f}")

    path = save_checkpoint(out / "model-demo.pt", model, cfg, optimizer, step=2 * steps,
                           extra={"tokenizer": tokenizer.fingerprint})
    reloaded = M3FM(cfg).to(device)
    load_checkpoint(path, reloaded)
    check = collate_qa(toy_qa_samples(cfg, "lung_cancer_risk", batch, seed=99), tokenizer, cfg).to(device)
    model.eval()
    reloaded.eval()
    same = torch.equal(model.predict(check), reloaded.predict(check))
    result["checkpoint"] = str(path)
    result["reload_identical"] = same
    log(f"checkpoint {path}: reloaded strictly, predictions identical: {same}")
    return result
