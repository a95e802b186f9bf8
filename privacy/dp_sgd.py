"""Sample-level DP-SGD at a site: Opacus around one local round, the accountant kept on the site's disk.

The unit of privacy is one training item: a CT crop with its record (pretraining)
or one question about one exam (multitask). A patient with several exams or
several labelled tasks contributes several items; protecting a whole patient
needs group privacy on top of the epsilon reported here.

Each step Poisson-samples items (Opacus's DPDataLoader over item indices), runs
them in micro-batches of one key each (a scale for pretraining, a task for
multitask training: the model takes one of either per forward pass), clips every
item's gradient and adds the noise once per step (Opacus's DPOptimizer with
skipped steps between micro-batches). Losses are per-sample means
(m3fm/model/heads.py), so an item's gradient never depends on its batch mates.

A new PrivacyEngine per message would forget earlier rounds, so the RDP
accountant's history lives in `work_dir/privacy/accountant.json` and is loaded
before, and saved after, every private round: epsilon accumulates over rounds,
runs and client restarts.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from privacy.budget import DPSGDConfig, PrivacyConfigError, SiteBudget


def epsilon_of(history: list, delta: float) -> float:
    """Opacus's RDP accountant over (noise multiplier, sample rate, steps) entries."""
    history = [tuple(h) for h in history if h[2] > 0]
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))


def noise_for_target(target: float, delta: float, plan: list[tuple[float, int]]) -> float:
    """The smallest noise multiplier (to 1e-3) whose spend over the plan [(sample rate, steps)] stays within target."""
    spend = lambda sigma: epsilon_of([(sigma, q, n) for q, n in plan if n > 0], delta)  # noqa: E731
    lo, hi = 0.3, 1.0
    while spend(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyConfigError(f"target epsilon {target} cannot be met by this plan at delta {delta}")
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spend(mid) > target else (lo, mid)
    return hi


class PrivacyLedger:
    """The site's accountant history and one entry per private round, in one JSON file written atomically."""

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / "privacy" / "accountant.json"
        data = {"history": [], "rounds": []}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                assert isinstance(data["history"], list) and isinstance(data["rounds"], list)
            except (ValueError, KeyError, AssertionError, TypeError):
                # refusing is the only safe answer: a lost history would let the site overspend
                raise PrivacyConfigError(f"{self.path}: the privacy accountant is damaged; restore it from backup "
                                         "(training with DP is refused until then)") from None
        self.history: list[list] = data["history"]
        self.rounds: list[dict] = data["rounds"]

    def epsilon(self, delta: float, extra: list | None = None) -> float:
        return epsilon_of(self.history + (extra or []), delta)

    def record(self, history: list, entry: dict) -> None:
        self.history = [list(h) for h in history]
        self.rounds.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"history": self.history, "rounds": self.rounds}, indent=1))
        os.replace(tmp, self.path)


def sample_rate(num_items: int, batch_size: int) -> float:
    """Opacus's Poisson rate for a DataLoader of num_items in batches of batch_size (1 / number of batches)."""
    return 1.0 / math.ceil(num_items / batch_size)


@dataclass
class PrivateRound:
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float  # the site's total after this round
    epsilon_before: float

    def metrics(self) -> dict[str, float]:
        return {"dp.epsilon": self.epsilon, "dp.epsilon-round": self.epsilon - self.epsilon_before,
                "dp.delta": self.delta, "dp.noise-multiplier": self.noise_multiplier,
                "dp.sample-rate": self.sample_rate, "dp.steps": self.steps}


def plan_round(dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, num_items: int, batch_size: int,
               steps: int, plan: list[tuple[float, int]] | None = None) -> tuple[PrivateRound, str | None]:
    """The round's DP parameters and the epsilon it would reach; a reason to refuse when that passes the ceiling."""
    delta = budget.delta_for(dp)
    q = sample_rate(num_items, batch_size)
    sigma = dp.noise_multiplier or noise_for_target(dp.target_epsilon, delta, plan or [(q, steps)])
    before = ledger.epsilon(delta)
    after = ledger.epsilon(delta, [[sigma, q, steps]])
    planned = PrivateRound(sigma, q, steps, delta, after, before)
    if budget.max_epsilon is not None and after > budget.max_epsilon:
        return planned, (f"privacy budget: this round would take epsilon from {before:.3f} to {after:.3f} "
                         f"(delta {delta:g}), past the site's max_epsilon {budget.max_epsilon:g}")
    return planned, None


def private_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_items: int, batch_size: int,
                     planned: PrivateRound, dp: DPSGDConfig, ledger: PrivacyLedger, seed: int):
    """Wrap model and optimizer with Opacus; -> (DP optimizer, a function giving each step's sampled indices,
    a function that records the round in the ledger once training is done)."""
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.load_state_dict({"history": [tuple(h) for h in ledger.history], "mechanism": "rdp"})
    loader = DataLoader(TensorDataset(torch.arange(num_items)), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed))
    wrapped, dp_optimizer, dp_loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=planned.noise_multiplier,
                                                     max_grad_norm=dp.max_grad_norm, poisson_sampling=True)
    assert dp_loader.sample_rate == planned.sample_rate  # the rate the ceiling check used
    batches = iter(())

    def next_indices() -> list[int]:
        nonlocal batches
        try:
            (idx,) = next(batches)
        except StopIteration:
            batches = iter(dp_loader)
            (idx,) = next(batches)
        return idx.tolist()

    def finish(run: str, server_round: int, phase: str) -> PrivateRound:
        # the site's service keeps this model for the next round: Opacus's own cleanup removes its hooks and the
        # per-sample attributes it added to the parameters
        wrapped._close()
        history = engine.accountant.history
        steps = sum(h[2] for h in history) - sum(h[2] for h in ledger.history)
        eps = epsilon_of(history, planned.delta)
        done = PrivateRound(planned.noise_multiplier, planned.sample_rate, steps, planned.delta, eps,
                            planned.epsilon_before)
        ledger.record(history, {"run": run, "round": server_round, "phase": phase, "at": time.time(), **asdict(done)})
        return done

    return dp_optimizer, next_indices, finish


def fill_missing_grad_samples(dp_optimizer, rows: int) -> None:
    """Parameters this micro-batch did not reach (another scale's tokenizer) get zero per-sample gradients,
    so Opacus can clip and noise every trainable parameter alike."""
    for p in dp_optimizer.params:
        if getattr(p, "grad_sample", None) is None:
            p.grad_sample = torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
