"""The two local training phases under DP-SGD (privacy/dp_sgd.py): same data, losses and counts as
m3fm/local.py, but Poisson-sampled steps, per-item clipping and noise, and the site's accountant charged.

Parameters the phase never trains are frozen first (the predictors while
pretraining, the MIM/MLM heads during multitask training): noise on them would
only move weights no data touched.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from functools import partial

import numpy as np
import torch

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.local import PhaseConfig, multitask_population, pretrain_population, text_items, too_few
from m3fm.model.groups import multitask_group_counts, pretrain_group_counts
from m3fm.model.m3fm import M3FM
from m3fm.model.text import TextTokenizer
from m3fm.train import build_optimizer, model_device, pretrain_loss, qa_loss, set_lr
from privacy.budget import DPSGDConfig, SiteBudget
from privacy.dp_sgd import PrivacyLedger, fill_missing_grad_samples, plan_round, private_training

UNTRAINED_BY_PHASE = {"pretrain": ("heads.", "task_id_head.", "task_encoder."),
                      "multitask": ("mim_decoder.", "mlm_head.")}


def freeze_outside_phase(model: M3FM, phase: str) -> None:
    for name, p in model.named_parameters():
        if name.startswith(UNTRAINED_BY_PHASE[phase]):
            p.requires_grad_(False)


def micro_batches(indices: list[int], keys: list[str], size: int) -> list[tuple[str, list[int]]]:
    """A step's sampled items as one-key micro-batches of at most `size` items."""
    by_key = defaultdict(list)
    for i in indices:
        by_key[keys[i]].append(i)
    return [(k, rows[j:j + size]) for k, rows in sorted(by_key.items()) for j in range(0, len(rows), size)]


def private_step(dp_optimizer, micro: list[tuple[str, list[int]]], loss_of) -> None:
    """Clip every item's gradient, accumulate over the micro-batches, add the noise once, step.
    An empty Poisson sample still takes a (noise-only) step: skipping it would reveal the batch was empty."""
    if not micro:
        fill_missing_grad_samples(dp_optimizer, 0)
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)
    for j, (key, rows) in enumerate(micro):
        loss_of(key, rows).backward()
        fill_missing_grad_samples(dp_optimizer, len(rows))
        if j < len(micro) - 1:
            dp_optimizer.signal_skip_step(True)  # Opacus: clip and accumulate only
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)


def _private_round(model: M3FM, phase: str, ds, per_key: dict[str, int], pc: PhaseConfig, phase_round: int,
                   dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, where: tuple[str, int], seed: int,
                   plan, make_loss) -> dict:
    """The private local round both phases share: ceiling check, Opacus wrapping, Poisson-sampled steps, ledger.
    make_loss(items, tc, rng) -> (loss_of(key, rows) -> loss tensor, losses recorded per key)."""
    t0 = time.perf_counter()
    items = [i for i, k in enumerate(ds.keys) if k in per_key]
    keys = [ds.keys[i] for i in items]
    planned, refusal = plan_round(dp, budget, ledger, len(items), pc.batch_size, pc.local_steps, plan)
    if refusal:
        return {"trained": False, "reason": refusal, "counts": {}}
    freeze_outside_phase(model, phase)
    tc = pc.train_config()
    rng = random.Random(f"{seed}|dp-{phase}|{phase_round}")
    dp_optimizer, next_indices, finish = private_training(model, build_optimizer(model, tc), len(items),
                                                          pc.batch_size, planned, dp, ledger, rng.randrange(2**31))
    loss_of, losses = make_loss(items, tc, rng)
    model.train()
    for i in range(pc.local_steps):
        set_lr(dp_optimizer, (phase_round - 1) * pc.local_steps + i, tc)
        private_step(dp_optimizer, micro_batches(next_indices(), keys, dp.physical_batch), loss_of)
    return {"trained": True, "steps": pc.local_steps, "loss": {k: float(np.mean(v)) for k, v in losses.items()},
            "seconds": time.perf_counter() - t0, "privacy": finish(*where, phase).metrics()}


def private_pretrain(model: M3FM, data, tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int, min_items: int,
                     dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, where: tuple[str, int],
                     seed: int = 0, plan=None) -> dict:
    ds, per_scale = pretrain_population(data, pc, model, phase_round, min_items, seed)
    if not per_scale:
        return too_few("pretrain", min_items)

    def make_loss(items, tc, rng):
        generator, losses = torch.Generator().manual_seed(rng.randrange(2**31)), defaultdict(list)

        def loss_of(scale, rows):
            batch = collate_pretrain([ds[items[i]] for i in rows], tokenizer, model.cfg)
            loss, mim, mlm = pretrain_loss(model, batch, tokenizer, tc, generator, per_sample=True)
            losses["mim"].append(mim.item())
            losses["mlm"].append(mlm.item())
            return loss
        return loss_of, losses

    out = _private_round(model, "pretrain", ds, per_scale, pc, phase_round, dp, budget, ledger, where, seed, plan,
                         make_loss)
    if out["trained"]:
        out.update(counts=pretrain_group_counts(per_scale, text_items(data, ds, per_scale)),
                   items={f"scale:{s}": n for s, n in per_scale.items()})
    return out


def private_multitask(model: M3FM, data, tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int, min_items: int,
                      dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, where: tuple[str, int],
                      seed: int = 0, plan=None) -> dict:
    ds, per_task = multitask_population(data, pc, phase_round, min_items, seed)
    if not per_task:
        return too_few("multitask", min_items)
    device = model_device(model)

    def make_loss(items, tc, rng):
        collate, losses = partial(collate_qa, tokenizer=tokenizer, cfg=model.cfg, rng=rng), defaultdict(list)

        def loss_of(task, rows):
            loss, answer_loss = qa_loss(model, collate([ds[items[i]] for i in rows]).to(device), tc)
            losses[task].append(answer_loss.item())
            return loss
        return loss_of, losses

    out = _private_round(model, "multitask", ds, per_task, pc, phase_round, dp, budget, ledger, where, seed, plan,
                         make_loss)
    if out["trained"]:
        out.update(counts=multitask_group_counts(per_task), items={f"task:{t}": n for t, n in per_task.items()})
    return out
