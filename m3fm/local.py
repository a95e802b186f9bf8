"""A site's part of one federated round: local pretraining, local multitask training, local evaluation.

Plain functions over an ingested site (m3fm/data/datasets.py) and a model that
already holds the global weights; no networking. Each returns what may leave
the site: sample counts per parameter group (m3fm/weights/groups.py), losses and
aggregate metrics. A task or scale with fewer training items than the site's
minimum cell size is neither trained nor reported: a count or a weight from so
few patients says too much about them.

The learning-rate schedule runs over the whole phase (rounds x local steps), so
round r continues the cosine where round r-1 left it; the AdamW moments start
afresh each round, as in FedAvg.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.data.datasets import PretrainDataset, QADataset, SiteData, batches_by_key
from m3fm.distributed import Ranks
from m3fm.evaluation import collect_predictions
from m3fm.metrics import delong
from m3fm.weights.groups import multitask_group_counts, pretrain_group_counts
from m3fm.model.m3fm import M3FM
from m3fm.model.text import TextTokenizer, mask_for_mlm
from m3fm.tasks import YES_NO, get_task
from m3fm.phase import PhaseConfig
from m3fm.train import TrainConfig, build_optimizer, multitask_step, pretrain_step


def _cycle(batches: list[list[int]], rng: random.Random):
    while True:
        order = list(batches)
        rng.shuffle(order)
        yield from order


def proximal_hook(model: M3FM, mu: float):
    """FedProx: the gradient of mu/2 * ||w - w_global||^2, added before the optimizer step."""
    if mu <= 0:
        return None
    anchor = [p.detach().clone() for p in model.parameters()]

    def add_proximal_gradient():
        for p, a in zip(model.parameters(), anchor):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=mu)
    return add_proximal_gradient


TOO_FEW = {"pretrain": "fewer than {} training crops at every scale",
           "multitask": "fewer than {} training items for every task"}


def too_few(phase: str, min_items: int) -> dict:
    """The answer of a round with nothing the site may train (every scale or task under min_items)."""
    return {"trained": False, "reason": TOO_FEW[phase].format(min_items), "counts": {}}


def _counted(items: dict[str, int], min_items: int) -> dict[str, int]:
    return {k: n for k, n in sorted(items.items()) if n >= min_items}


def pretrain_population(data: SiteData, pc: PhaseConfig, model: M3FM, phase_round: int, min_items: int,
                        seed: int = 0) -> tuple[PretrainDataset, dict[str, int]]:
    """The training crops and the count per scale the site may train (scales under min_items left out)."""
    ds = PretrainDataset(data, "train", seed=seed)
    ds.set_epoch(phase_round)
    wanted = set(pc.scales) or {s.name for s in model.cfg.scales}
    return ds, _counted({k: ds.keys.count(k) for k in set(ds.keys) if k in wanted}, min_items)


def multitask_population(data: SiteData, pc: PhaseConfig, phase_round: int, min_items: int,
                         seed: int = 0) -> tuple[QADataset, dict[str, int]]:
    """The training questions and the count per task the site may train (tasks under min_items left out)."""
    ds = QADataset(data, "train", tasks=pc.tasks or None, train=True, seed=seed)
    ds.set_epoch(phase_round)
    return ds, _counted({k: ds.keys.count(k) for k in set(ds.keys)}, min_items)


def text_items(data: SiteData, ds: PretrainDataset, scales) -> int:
    """Training crops at the given scales whose exam has text (the MLM head's sample count)."""
    return sum(1 for (exam_id, _), k in zip(ds.items, ds.keys) if k in scales and _has_text(data, exam_id))


def local_pretrain(model: M3FM, data: SiteData, tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int,
                   min_items: int, seed: int = 0, proximal_mu: float = 0.0, ranks: Ranks | None = None) -> dict:
    """MIM + MLM for pc.local_steps steps, one scale per step, cycling over the scales the site can train."""
    t0 = time.perf_counter()
    ds, per_scale = pretrain_population(data, pc, model, phase_round, min_items, seed)
    if not per_scale:
        return too_few("pretrain", min_items)
    losses, trained = pretrain_steps(model, ds, sorted(per_scale), tokenizer, pc, phase_round, seed,
                                     proximal_hook(model, proximal_mu), ranks)
    scale_items = {s: n for s, n in per_scale.items() if trained[s]}
    return {"trained": True, "counts": pretrain_group_counts(scale_items, text_items(data, ds, scale_items)),
            "items": {f"scale:{s}": n for s, n in scale_items.items()}, "steps": pc.local_steps,
            "loss": {k: float(np.mean(v)) for k, v in losses.items()}, "seconds": time.perf_counter() - t0}


def pretrain_steps(model: M3FM, ds, scales: list[str], tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int,
                   seed: int = 0, hook=None, ranks: Ranks | None = None) -> tuple[dict[str, list], dict[str, int]]:
    """The optimizer steps of local_pretrain over any dataset with `keys` (one site's, or sites pooled). A step
    accumulates pc.micro_batches micro-batches, one scale each, the scales taken in turn. With `ranks` the
    micro-batches are shared among the site's ranks, data-parallel, each with masks drawn from its own seed, so the
    weights end as one process's would whatever the number of ranks (tests/test_distributed.py)."""
    rng = random.Random(f"{seed}|pretrain|{phase_round}")
    streams = {s: _cycle([b for b in batches_by_key(ds.keys, pc.batch_size, seed=rng.randrange(2**31))
                          if ds.keys[b[0]] == s], rng) for s in scales}
    tc = pc.train_config()
    optimizer = build_optimizer(model, tc)
    masks_seed = rng.randrange(2**31)
    dropout_seed = int(torch.randint(2**31, ()))  # torch's generator: the site's round seed (client/federated.py)
    losses, trained = defaultdict(list), defaultdict(int)
    for i in range(pc.local_steps):
        step = (phase_round - 1) * pc.local_steps + i
        k = pc.micro_batches
        picked = [(j, next(streams[scales[(step * k + j) % len(scales)]])) for j in range(k)]  # every rank draws all
        picked = ranks.share(picked) if ranks is not None else picked
        micro = [collate_pretrain([ds[j] for j in b], tokenizer, model.cfg) for _, b in picked]
        generators = [torch.Generator().manual_seed(masks_seed + step * k + j) for j, _ in picked]
        out = pretrain_step(model, optimizer, micro, tokenizer, tc, step, generators,
                            before_step=ranks.before_step(model, len(micro), hook) if ranks is not None else hook,
                            seeds=[dropout_seed + step * k + j for j, _ in picked])
        for mb, mim, mlm in zip(micro, out["mims"], out["mlms"]):
            losses["mim"].append(mim)
            losses["mlm"].append(mlm)  # 0 for a batch without text, as the round's mean has always counted it
            trained[mb.scale] += 1
    return ranks.merge(losses, trained) if ranks is not None else (losses, trained)


def _has_text(data: SiteData, exam_id: str) -> bool:
    exam = data.exams.get(exam_id) or {}
    return bool(exam.get("sentences") or exam.get("report"))


def local_multitask(model: M3FM, data: SiteData, tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int,
                    min_items: int, seed: int = 0, proximal_mu: float = 0.0, ranks: Ranks | None = None) -> dict:
    """Task-parallel QA: each step accumulates one micro-batch per task, then takes one optimizer step."""
    t0 = time.perf_counter()
    ds, per_task = multitask_population(data, pc, phase_round, min_items, seed)
    if not per_task:
        return too_few("multitask", min_items)
    losses, trained = multitask_steps(model, ds, sorted(per_task), tokenizer, pc, phase_round, seed,
                                      proximal_hook(model, proximal_mu), ranks)
    task_items = {t: n for t, n in per_task.items() if trained[t]}
    return {"trained": True, "counts": multitask_group_counts(task_items),
            "items": {f"task:{t}": n for t, n in task_items.items()}, "steps": pc.local_steps,
            "loss": {t: float(np.mean(v)) for t, v in losses.items()}, "seconds": time.perf_counter() - t0}


def multitask_steps(model: M3FM, ds, tasks: list[str], tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int,
                    seed: int = 0, hook=None, ranks: Ranks | None = None) -> tuple[dict[str, list], dict[str, int]]:
    """The optimizer steps of local_multitask over any dataset with `keys` (one site's, or sites pooled). With
    `ranks` (m3fm/distributed.py) each step's task micro-batches are shared among the site's ranks, task-parallel,
    and every rank returns the site's totals; the weights end as one process's would (tests/test_distributed.py)."""
    rng = random.Random(f"{seed}|multitask|{phase_round}")
    all_batches = batches_by_key(ds.keys, pc.batch_size, seed=rng.randrange(2**31))
    streams = {t: _cycle([b for b in all_batches if ds.keys[b[0]] == t], rng) for t in tasks}
    k = pc.tasks_per_step or len(tasks)
    tc = pc.train_config()
    optimizer = build_optimizer(model, tc)
    dropout_seed = int(torch.randint(2**31, ()))  # torch's generator: the site's round seed (client/federated.py)
    losses, trained = defaultdict(list), defaultdict(int)
    for i in range(pc.local_steps):
        step = (phase_round - 1) * pc.local_steps + i
        chosen = [tasks[(step * k + j) % len(tasks)] for j in range(min(k, len(tasks)))]
        picked = [(j, t, next(streams[t])) for j, t in enumerate(chosen)]  # every rank draws every batch
        picked = ranks.share(picked) if ranks is not None else picked
        # a micro-batch's clinical-sentence dropout has its own seed, so it is the same on whichever rank runs it
        micro = [collate_qa([ds[j] for j in b], tokenizer, model.cfg, rng=random.Random(f"{seed}|{step}|{t}"))
                 for _, t, b in picked]
        out = multitask_step(model, optimizer, micro, tc, step,
                             before_step=ranks.before_step(model, len(micro), hook) if ranks is not None else hook,
                             seeds=[dropout_seed + step * k + j for j, _, _ in picked])
        for t, v in out["tasks"].items():
            losses[t].append(v)
            trained[t] += 1
    return ranks.merge(losses, trained) if ranks is not None else (losses, trained)


@torch.no_grad()
def local_evaluate(model: M3FM, data: SiteData, tokenizer: TextTokenizer, phase: str, min_items: int,
                   split: str = "val", batch_size: int = 8, tasks=None) -> dict:
    """Losses (and, for multitask, accuracy and yes/no AUC) on a split; groups under min_items are left out."""
    model.eval()
    device = next(model.parameters()).device
    if phase == "pretrain":
        ds = PretrainDataset(data, split)
        metrics, n = {}, {}
        generator = torch.Generator().manual_seed(0)  # the same masks every evaluation
        for scale in sorted(set(ds.keys)):
            idx = [i for i, k in enumerate(ds.keys) if k == scale]
            if len(idx) < min_items:
                continue
            mim, mlm = [], []
            for j in range(0, len(idx), batch_size):
                batch = collate_pretrain([ds[i] for i in idx[j:j + batch_size]], tokenizer, model.cfg).to(device)
                mim.append(model.forward_mim(batch.image, batch.voxel_size, scale, None, generator)[0].item())
                if batch.text_ids is not None:
                    inputs, labels = mask_for_mlm(batch.text_ids.cpu(), tokenizer, 0.15, generator)
                    mlm.append(model.forward_mlm(inputs.to(device), batch.text_mask, labels.to(device)).item())
            metrics[f"mim:{scale}"] = float(np.mean(mim))
            if mlm:
                metrics[f"mlm:{scale}"] = float(np.mean(mlm))
            n[f"scale:{scale}"] = len(idx)
        return {"metrics": metrics, "items": n}
    metrics, n = {}, {}
    for name, p in collect_predictions(model, data, tokenizer, split, tasks, batch_size, min_items).items():
        metrics[f"loss:{name}"] = p.loss_sum / p.n
        n[f"task:{name}"] = p.n
        task = get_task(name)
        if task.loss == "ce":
            answers = np.asarray(p.answers)
            metrics[f"accuracy:{name}"] = float(np.mean(p.probs.argmax(1) == answers))
            y = answers == 0
            if task.answers == YES_NO and min(y.sum(), (~y).sum()) >= min_items:  # both classes big enough
                metrics[f"auc:{name}"] = delong(y, p.probs[:, 0])[0]
    return {"metrics": {k: v for k, v in metrics.items() if math.isfinite(v)}, "items": n}
