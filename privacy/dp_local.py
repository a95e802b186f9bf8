"""The two local training phases under patient-level DP-SGD (privacy/dp_sgd.py): same data, losses, counts and
key order (one scale or one task per step) as m3fm/local.py, but each step Poisson-samples patients, takes one item
of each, clips it, adds the noise once, and the site's accountant is charged per patient. `tasks_per_step` does
not apply: a step trains one task, so a patient contributes one clipped gradient to it.

Parameters the phase never trains are frozen first (the predictors while
pretraining, the MIM/MLM heads during multitask training): noise on them would
only move weights no data touched.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import defaultdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.distributed import Ranks
from m3fm.phase import PhaseConfig
from m3fm.local import multitask_population, pretrain_population, text_items, too_few
from m3fm.weights.groups import multitask_group_counts, parameter_group, pretrain_group_counts
from m3fm.model.m3fm import M3FM
from m3fm.model.text import TextTokenizer
from m3fm.train import build_optimizer, model_device, pretrain_loss, qa_loss, set_lr
from privacy.budget import DPSGDConfig, SiteBudget
from privacy.accounting import PrivacyLedger, plan_round, sample_rate
from privacy.dp_sgd import PatientSampler, private_training

UNTRAINED_BY_PHASE = {"pretrain": ("heads.", "task_id_head.", "task_encoder."),
                      "multitask": ("mim_decoder.", "mlm_head.")}


def freeze_outside_phase(model: M3FM, phase: str) -> None:
    for name, p in model.named_parameters():
        if name.startswith(UNTRAINED_BY_PHASE[phase]):
            p.requires_grad_(False)


def key_groups(phase: str, key: str) -> set[str]:
    """The parameter groups (m3fm/weights/groups.py) a step of one key can reach: the shared trunk and the key's own
    tokenizer, task embedding and predictor, never another key's."""
    return set(pretrain_group_counts({key: 1}, 1) if phase == "pretrain" else multitask_group_counts({key: 1}))


class KeyParameters:
    """Per step, only the parameters the step's key can reach take part: clipped, noised and moved. Which key a
    step trains is a fixed schedule, not data, so leaving another key's parameters out releases nothing; noising
    them would move every other task's predictor by noise alone at every step (Adam scales that noise up to a
    full step), and cost a zero per-sample gradient and a noise draw for each."""

    def __init__(self, model: M3FM, phase: str):
        self.phase = phase
        self.params = [(parameter_group(n), p) for n, p in model.named_parameters() if p.requires_grad]

    def only(self, key: str) -> None:
        groups = key_groups(self.phase, key)
        for group, p in self.params:
            p.requires_grad_(group in groups)

    def restore(self) -> None:
        """Every parameter the phase trains trainable again, as before the round."""
        for _, p in self.params:
            p.requires_grad_(True)


def patients_by_key(data, ds, per_key: dict[str, int]) -> dict[str, list[list[int]]]:
    """key -> one list per training patient with items of that key: the patient's item indices into ds."""
    units: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, k in enumerate(ds.keys):
        if k in per_key:
            units[k][data.patient_of(ds.exam_id(i))].append(i)
    return {k: [by_patient[p] for p in sorted(by_patient)] for k, by_patient in sorted(units.items())}


def key_plan(data, ds, per_key: dict[str, int], batch_size: int, steps: int, first_step: int = 0):
    """-> (patients by key, the key each step trains: round robin over the phase's steps as m3fm/local.py does,
    the accountant's (patient sampling rate, steps) per key of that schedule)."""
    units = patients_by_key(data, ds, per_key)
    keys = sorted(units)
    schedule = [keys[s % len(keys)] for s in range(first_step, first_step + steps)]
    entries = [(sample_rate(len(units[k]), batch_size), schedule.count(k)) for k in sorted(set(schedule))]
    return units, schedule, entries


def private_step(clipping, key: str, items: list[int], size: int, loss_of, ranks: Ranks | None = None) -> None:
    """Clip every sampled item's gradient, accumulate over micro-batches of at most `size` items, add the noise
    once, step. An empty Poisson sample still takes a (noise-only) step: skipping it would reveal the batch was
    empty. With several ranks each takes its share of the micro-batches (all sampled the same items) and the
    optimizer adds the ranks' clipped sums (privacy/dp_sgd.py's RankSum); a rank with none still steps."""
    dp_optimizer = clipping.optimizer
    micro = [items[j:j + size] for j in range(0, len(items), size)]
    micro = ranks.share(micro) if ranks is not None else micro
    if not micro:
        clipping.nothing_sampled()
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)
    for j, rows in enumerate(micro):
        clipping.backward(loss_of(key, rows))
        if j < len(micro) - 1:
            dp_optimizer.signal_skip_step(True)  # Opacus: clip and accumulate only
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)


def secret_seed(ranks: Ranks | None = None) -> int:
    """The patient sampler's seed, from the operating system's entropy: amplification by sampling assumes nobody
    outside the site can tell who was sampled, and the coordinator knows the run's seed. A site's ranks share
    rank 0's draw, so they all clip the same sample."""
    seed = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
    if ranks is not None:
        dist.broadcast(seed, src=0, group=ranks.group)
    return int(seed)


def _private_round(model: M3FM, phase: str, data, ds, per_key: dict[str, int], pc: PhaseConfig, phase_round: int,
                   dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, where: tuple[str, int], seed: int,
                   plan, make_loss, ranks: Ranks | None = None) -> dict:
    """The private local round both phases share: ceiling check, Opacus wrapping, patient-sampled steps, ledger.
    make_loss(tc, rng) -> (loss_of(key, item indices into ds) -> loss tensor, losses recorded per key)."""
    t0 = time.perf_counter()
    units, schedule, entries = key_plan(data, ds, per_key, pc.batch_size, pc.local_steps,
                                        (phase_round - 1) * pc.local_steps)
    planned, refusal = plan_round(dp, budget, ledger, entries, plan)
    if refusal:
        return {"trained": False, "reason": refusal, "counts": {}}
    freeze_outside_phase(model, phase)
    reach = KeyParameters(model, phase)
    tc = pc.train_config()
    rng = random.Random(f"{seed}|dp-{phase}|{phase_round}")
    clipping, finish = private_training(model, build_optimizer(model, tc), planned, dp, ledger, ranks)
    sampler = PatientSampler(units, pc.batch_size, secret_seed(ranks))
    loss_of, losses = make_loss(tc, rng)
    model.train()
    for i, key in enumerate(schedule):
        reach.only(key)
        set_lr(clipping.optimizer, (phase_round - 1) * pc.local_steps + i, tc)
        clipping.optimizer.expected_batch_size = sampler.expected_batch(key)
        private_step(clipping, key, sampler.sample(key), dp.physical_batch, loss_of, ranks)
    reach.restore()
    if ranks is not None:
        losses = ranks.merge(losses, {})[0]
    return {"trained": True, "steps": pc.local_steps, "loss": {k: float(np.mean(v)) for k, v in losses.items()},
            "seconds": time.perf_counter() - t0, "privacy": finish(sampler, *where, phase).metrics()}


def private_pretrain(model: M3FM, data, tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int, min_items: int,
                     dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, where: tuple[str, int],
                     seed: int = 0, plan=None, ranks: Ranks | None = None) -> dict:
    ds, per_scale = pretrain_population(data, pc, model, phase_round, min_items, seed)
    if not per_scale:
        return too_few("pretrain", min_items)

    def make_loss(tc, rng):
        generator, losses = torch.Generator().manual_seed(rng.randrange(2**31)), defaultdict(list)

        def loss_of(scale, rows):
            batch = collate_pretrain([ds[i] for i in rows], tokenizer, model.cfg)
            loss, mim, mlm = pretrain_loss(model, batch, tokenizer, tc, generator, per_sample=True)
            losses["mim"].append(mim.mean().item())
            losses["mlm"].append(mlm.mean().item())
            return loss
        return loss_of, losses

    out = _private_round(model, "pretrain", data, ds, per_scale, pc, phase_round, dp, budget, ledger, where, seed, plan,
                         make_loss, ranks)
    if out["trained"]:
        out.update(counts=pretrain_group_counts(per_scale, text_items(data, ds, per_scale)),
                   items={f"scale:{s}": n for s, n in per_scale.items()})
    return out


def private_multitask(model: M3FM, data, tokenizer: TextTokenizer, pc: PhaseConfig, phase_round: int, min_items: int,
                      dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, where: tuple[str, int],
                      seed: int = 0, plan=None, ranks: Ranks | None = None) -> dict:
    ds, per_task = multitask_population(data, pc, phase_round, min_items, seed)
    if not per_task:
        return too_few("multitask", min_items)
    device = model_device(model)

    def make_loss(tc, rng):
        collate, losses = partial(collate_qa, tokenizer=tokenizer, cfg=model.cfg, rng=rng), defaultdict(list)

        def loss_of(task, rows):
            loss, answer_loss = qa_loss(model, collate([ds[i] for i in rows]).to(device), tc, per_sample=True)
            losses[task].append(answer_loss.mean().item())
            return loss
        return loss_of, losses

    out = _private_round(model, "multitask", data, ds, per_task, pc, phase_round, dp, budget, ledger, where, seed, plan,
                         make_loss, ranks)
    if out["trained"]:
        out.update(counts=multitask_group_counts(per_task), items={f"task:{t}": n for t, n in per_task.items()})
    return out
