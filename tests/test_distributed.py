"""Several ranks of one site (m3fm/distributed.py), gloo on CPU, 2 real processes: a task-parallel multitask step
equals one process accumulating the same micro-batches, and so does a local round of several steps; a
data-parallel pretraining step equals one process accumulating the ranks' batches."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m3fm.data.collate import collate_pretrain, collate_qa
from m3fm.distributed import Ranks, all_reduce_grads
from m3fm.phase import PhaseConfig
from m3fm.local import multitask_steps
from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.text import load_tokenizer
from m3fm.train import TrainConfig, build_optimizer, multitask_step, pretrain_loss, pretrain_step, qa_loss, set_lr
from privacy.budget import DPSGDConfig
from privacy.dp_local import private_step, secret_seed
from privacy.dp_sgd import Clipping
from sim.toy_batches import toy_pretrain_samples, toy_qa_samples

# rank 0 runs two tasks' micro-batches, rank 1 one: unequal counts, and heads only one rank touches
TASKS_BY_RANK = (["nodule_presence", "lung_rads"], ["cvd_diagnosis"])


def model_and_batches(tasks):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = M3FM(cfg)
    tokenizer = load_tokenizer(cfg)
    return model, [collate_qa(toy_qa_samples(cfg, t, 4, seed=i), tokenizer, cfg) for i, t in enumerate(tasks)]


def rank_step(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(TASKS_BY_RANK))
    try:
        # the same model and samples as the single process; this rank takes its share of the micro-batches
        model, batches = model_and_batches([t for tasks in TASKS_BY_RANK for t in tasks])
        mine = batches[:2] if rank == 0 else batches[2:]
        tc = TrainConfig(lr=1e-3, total_steps=100, warmup_steps=0)
        grads = {}

        def reduce():
            all_reduce_grads(model, len(mine))
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        multitask_step(model, build_optimizer(model, tc), mine, tc, 10, before_step=reduce)
        torch.save({"grads": grads, "state": model.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_task_parallel_step_on_two_ranks_equals_one_process_accumulating_the_micro_batches(tmp_path):
    mp.spawn(rank_step, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "state")),
             nprocs=len(TASKS_BY_RANK), join=True)
    model, batches = model_and_batches([t for tasks in TASKS_BY_RANK for t in tasks])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = TrainConfig(lr=1e-3, total_steps=100, warmup_steps=0)
    grads = {}
    multitask_step(model, build_optimizer(model, tc), batches, tc, 10, before_step=lambda: grads.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    reference = model.state_dict()
    moved = [k for k in reference if not torch.equal(reference[k], before[k])]
    assert moved and len(moved) < len(reference)  # the step moved weights, and some (other tasks' heads) not
    for rank in range(len(TASKS_BY_RANK)):
        got = torch.load(tmp_path / f"state.{rank}")
        # the same parameters hold a gradient (one only a rank's task touched included), with the same values
        assert got["grads"].keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-7, msg=lambda m: f"{k}: {m}")
        # and the step. Adam's first step moves a weight by lr * g / (|g| + eps): a gradient at rounding level (a
        # key bias's, zero in exact arithmetic under softmax) moves it by anything up to lr, whose sign and size
        # the summation order decides (CI once saw 2.1e-5 on a key bias). Those weights (a few hundred of the
        # model's) are held to Adam's bound, lr; every other weight to 2e-5
        for k, v in reference.items():
            diff = (got["state"][k].double() - v.double()).abs()
            g = grads.get(k, torch.zeros_like(v))
            rounding = (g != 0) & (g.abs() < 1e-6)  # a zero gradient moves nothing: held to 2e-5 too
            assert float(torch.where(rounding, 0.0, diff).max()) <= 2e-5, k
            assert float(torch.where(rounding, diff, 0.0).max()) <= tc.lr, k


class ToyQA:
    """A dataset as multitask_steps reads one: items by index, and each item's key (its task)."""

    def __init__(self, tasks):
        cfg = get_config("tiny")
        self.items = [s for i, t in enumerate(tasks) for s in toy_qa_samples(cfg, t, 8, seed=i)]
        self.keys = [s["task"] for s in self.items]

    def __getitem__(self, i):
        return self.items[i]


ROUND_TASKS = ["nodule_presence", "lung_rads", "cvd_diagnosis"]


def rank_round(rank: int, init: str, out: str, tasks_per_step: int, dropout: float) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, tokenizer, pc = round_setup(tasks_per_step, dropout)
        losses, trained = multitask_steps(model, ToyQA(ROUND_TASKS), ROUND_TASKS, tokenizer, pc, 1,
                                          ranks=Ranks(rank, 2))
        torch.save({"state": model.state_dict(), "losses": dict(losses), "trained": dict(trained)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def round_setup(tasks_per_step, dropout=0.0):
    """tiny, or tiny with base's dropout and drop path (each micro-batch draws them from its own seed)."""
    torch.manual_seed(0)
    model = M3FM(replace(get_config("tiny"), dropout=dropout, drop_path=dropout))
    pc = PhaseConfig("multitask", rounds=1, local_steps=3, lr=1e-3, batch_size=4, tasks=tuple(ROUND_TASKS),
                     tasks_per_step=tasks_per_step)
    return model, load_tokenizer(get_config("tiny")), pc


# every task each step (2 on rank 0, 1 on rank 1); one (a rank idles); every task, with dropout and drop path (the
# last two slow: the same rank processes and comparison as the first)
@pytest.mark.parametrize("tasks_per_step,dropout", [(0, 0.0), pytest.param(1, 0.0, marks=pytest.mark.slow),
                                                    pytest.param(0, 0.1, marks=pytest.mark.slow)])
def test_a_local_round_on_two_ranks_ends_with_the_weights_and_totals_of_one_process(tmp_path, tasks_per_step, dropout):
    mp.spawn(rank_round, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "round"), tasks_per_step, dropout),
             nprocs=2, join=True)
    model, tokenizer, pc = round_setup(tasks_per_step, dropout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses, trained = multitask_steps(model, ToyQA(ROUND_TASKS), ROUND_TASKS, tokenizer, pc, 1)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for rank in range(2):
        got = torch.load(tmp_path / f"round.{rank}")
        assert got["trained"] == dict(trained)  # the site's totals on every rank
        assert got["losses"].keys() == losses.keys()
        for t, v in losses.items():
            assert sorted(got["losses"][t]) == pytest.approx(sorted(v), rel=1e-4)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_merged_totals_read_zero_for_a_task_no_rank_trained(tmp_path):
    """Two steps of one task each cannot train all three tasks: a multitask round on several ranks failed with a
    KeyError for the untrained task (local_multitask reads every task's count) where one process read 0."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        losses, trained = Ranks(0, 1).merge({"lung_rads": [0.5], "nodule_presence": [0.7]},
                                            {"lung_rads": 1, "nodule_presence": 1})
    finally:
        dist.destroy_process_group()
    assert [trained[t] for t in ROUND_TASKS] == [1, 1, 0] and losses["cvd_diagnosis"] == []


def pretrain_setup():
    cfg = get_config("tiny")
    model, _ = model_and_batches([])
    tokenizer = load_tokenizer(cfg)
    batches = [collate_pretrain(toy_pretrain_samples(cfg, "chest", 4, seed=r), tokenizer, cfg) for r in range(2)]
    return model, tokenizer, batches, TrainConfig(lr=1e-3, total_steps=100, warmup_steps=0)


def rank_pretrain(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, tokenizer, batches, tc = pretrain_setup()
        pretrain_step(model, build_optimizer(model, tc), batches[rank], tokenizer, tc, 10,
                      torch.Generator().manual_seed(rank), before_step=Ranks(rank, 2).before_step(model, 1))
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_data_parallel_pretraining_step_on_two_ranks_equals_one_process_accumulating_both_batches(tmp_path):
    """MIM and MLM, each rank its own batch and masks; one process accumulates the two batches (same masks)."""
    mp.spawn(rank_pretrain, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "pre")), nprocs=2, join=True)
    model, tokenizer, batches, tc = pretrain_setup()
    optimizer = build_optimizer(model, tc)
    set_lr(optimizer, 10, tc)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    for r, batch in enumerate(batches):
        loss, _, _ = pretrain_loss(model, batch, tokenizer, tc, torch.Generator().manual_seed(r))
        (loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    for rank in range(2):
        got = torch.load(tmp_path / f"pre.{rank}")
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")


def private_setup():
    model, _ = model_and_batches([])
    cfg = get_config("tiny")
    tokenizer = load_tokenizer(cfg)
    samples = toy_qa_samples(cfg, "nodule_presence", 10, seed=5)
    tc = TrainConfig(lr=1e-3, total_steps=100, warmup_steps=0)

    def loss_of(key, rows):
        return qa_loss(model, collate_qa([samples[i] for i in rows], tokenizer, cfg), tc, per_sample=True)[0]
    return model, tc, loss_of


def private_round(ranks=None) -> dict:
    """Two DP-SGD steps of 10 and 0 sampled items in micro-batches of 4 (three micro-batches, then none), noise from
    a seeded generator so that one process and two ranks can be compared."""
    model, tc, loss_of = private_setup()
    clipping = Clipping(model, build_optimizer(model, tc), 0.7, DPSGDConfig(noise_multiplier=0.7, max_grad_norm=0.5),
                        ranks)
    clipping.optimizer.generator = torch.Generator().manual_seed(7)  # used on rank 0 only: noise drawn once
    for step, items in enumerate([list(range(10)), []]):
        set_lr(clipping.optimizer, step, tc)
        clipping.optimizer.expected_batch_size = 8.0
        private_step(clipping, "nodule_presence", items, 4, loss_of, ranks)
    clipping.close()
    return model.state_dict()


def rank_private(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.save(private_round(Ranks(rank, 2)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dp_sgd_on_two_ranks_takes_the_steps_of_one_process_with_the_noise_drawn_once(tmp_path):
    """Rank 0 clips micro-batches 1 and 3, rank 1 micro-batch 2; the clipped sums are added and one noise draw
    (rank 0's) is added: the same steps as one process, so the mechanism, and epsilon, do not depend on N."""
    mp.spawn(rank_private, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "dp")), nprocs=2, join=True)
    reference = private_round()
    before, _ = model_and_batches([])
    assert any(not torch.equal(v, before.state_dict()[k]) for k, v in reference.items())
    for rank in range(2):
        got = torch.load(tmp_path / f"dp.{rank}")
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")


def rank_seed(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.save([secret_seed(Ranks(rank, 2)) for _ in range(2)], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_patient_sampler_seed_is_secret_and_shared_by_a_sites_ranks(tmp_path):
    """From the OS, not the run's seed (the coordinator knows that one), and rank 0's on every rank."""
    mp.spawn(rank_seed, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "seed")), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"seed.{r}") for r in range(2))
    assert first == second and first[0] != first[1]
    assert secret_seed() != secret_seed()
