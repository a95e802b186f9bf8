"""The privacy accounting of patient-level DP-SGD (privacy/dp_sgd.py): epsilon from Opacus's RDP accountant, the
site's ledger on disk, and the plan of a private round against the site's ceiling.

Kept apart from the DP optimizer so that the coordinator, the reports and a site service import it without
Opacus: the package's import (`opacus/__init__.py`) pulls in its privacy engine and `torch.distributed.tensor`,
1.7-2 s at every process start (`python -X importtime`), which a run without DP-SGD would pay for nothing. Opacus
is imported where an epsilon is first computed.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privacy.budget import DPSGDConfig, PrivacyConfigError, SiteBudget


def _opacus_rdp():
    """Opacus's RDP analysis and its accountant's default orders, imported on first use (see above)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    return rdp, RDPAccountant.DEFAULT_ALPHAS


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp, orders = _opacus_rdp()
    return rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)


def epsilon_of(history: list, delta: float) -> float:
    """Opacus's RDP accountant over (noise multiplier, sample rate, steps) entries, computed as it does (RDP per
    entry = RDP of one step x steps, summed, then converted at delta over its default orders) with each (noise,
    rate) pair's one-step RDP computed once: a site's history gains an entry per key every round, and Opacus's
    accountant recomputes every entry over 60 orders (fractional ones by series) on each call, which took seconds
    a round after a few rounds."""
    history = [tuple(h) for h in history if h[2] > 0]
    if not history:
        return 0.0
    analysis, orders = _opacus_rdp()
    rdp = sum(_rdp_of_one_step(float(sigma), float(q)) * steps for sigma, q, steps in history)
    eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


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


UNIT = "patient"  # the privacy unit every ledger row and report names
MECHANISM = f"dp-sgd per {UNIT}"


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
        # rounds of the item-level DP-SGD this replaced: their epsilon bounds an item, not a patient
        self.item_level_rounds = sum(1 for r in self.rounds if r.get("unit") != UNIT)

    def epsilon(self, delta: float, extra: list | None = None) -> float:
        return epsilon_of(self.history + (extra or []), delta)

    def record(self, history: list, entry: dict) -> None:
        self.history = [list(h) for h in history]
        self.rounds.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"history": self.history, "rounds": self.rounds}, indent=1))
        os.replace(tmp, self.path)


def sample_rate(num_patients: int, batch_size: int) -> float:
    """The Poisson rate that samples batch_size of num_patients per step on average (as Opacus's DPDataLoader:
    1 / number of batches)."""
    return 1.0 / math.ceil(num_patients / batch_size)


@dataclass
class PrivateRound:
    noise_multiplier: float
    sample_rate: float  # the largest per-key patient sampling rate of the round
    steps: int
    delta: float
    epsilon: float  # the site's total after this round, per patient
    epsilon_before: float

    def metrics(self) -> dict[str, float]:
        return {"dp.epsilon": self.epsilon, "dp.epsilon-round": self.epsilon - self.epsilon_before,
                "dp.delta": self.delta, "dp.noise-multiplier": self.noise_multiplier,
                "dp.sample-rate": self.sample_rate, "dp.steps": self.steps}


def plan_round(dp: DPSGDConfig, budget: SiteBudget, ledger: PrivacyLedger, entries: list[tuple[float, int]],
               plan: list[tuple[float, int]] | None = None) -> tuple[PrivateRound | None, str | None]:
    """The round's DP parameters and the epsilon it would reach; a reason to refuse when that passes the ceiling.
    entries: the round's (patient sampling rate, steps) per key; plan: the same over the run's whole plan (for a
    noise derived from target_epsilon)."""
    if ledger.item_level_rounds:
        return None, (f"{ledger.path} holds {ledger.item_level_rounds} item-level DP-SGD round(s) from an older "
                      "version: their epsilon bounds a training item, not a patient, so no per-patient total can be "
                      "stated. Move the file aside (keep it: those patients did spend that budget) to start a "
                      "per-patient ledger")
    delta = budget.delta_for(dp)
    sigma = dp.noise_multiplier or noise_for_target(dp.target_epsilon, delta, plan or entries)
    before = ledger.epsilon(delta)
    after = ledger.epsilon(delta, [[sigma, q, n] for q, n in entries if n > 0])
    planned = PrivateRound(sigma, max(q for q, _ in entries), sum(n for _, n in entries), delta, after, before)
    if budget.max_epsilon is not None and after > budget.max_epsilon:
        return planned, (f"privacy budget: this round would take epsilon per patient from {before:.3f} to "
                         f"{after:.3f} (delta {delta:g}), past the site's max_epsilon {budget.max_epsilon:g}")
    return planned, None
