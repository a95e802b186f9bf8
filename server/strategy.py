"""Task-aware aggregation as Flower strategies: FedAvg, FedProx and FedAdam with per-group averaging, folded
reply by reply as the replies arrive.

`aggregate_train` takes any iterable of replies; server/delivery.py hands them over one at a time as they come
off the SuperLink. Every reply is checked before it counts (same keys, shapes and dtypes as the global model, all
finite, sample counts that name real parameter groups, an update no larger than the configured bound); a failing
reply is dropped and recorded in the round's outcome with its reason. A good one is folded into a `TaskAwareSum`
(server/task_sum.py) and let go before the next one is taken, so the coordinator holds the global model, one running sum and one
reply, whatever the number of sites. Each parameter ends up averaged over the sites that trained its group
(m3fm/weights/groups.py; weights travel packed, one vector per group, m3fm/weights/packing.py), weighted by their
sample counts for that group; a parameter nobody trained keeps its value. FedProx and FedAdam keep
Flower's own logic around that average (the proximal term travels in the train config; FedAdam's server step runs
on the task-aware average).

What a round came to (accepted, skipped and rejected replies, contributors per group, the new weights, the
evaluation) is one `RoundOutcome`, the strategy's `outcome`; `train_round` and `evaluate_round` return it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from server.task_sum import TaskAwareSum, array_record, array_view, record_values, squared_distance
from transport.protocol import (ARRAYS, COUNT, DP, ITEMS, METRICS, NUM_EXAMPLES, SITE, SITE_ID, SKIPPED, TIME,
                                counts_of, train_type)
from transport.wire import arrays_of, drop_arrays

def reply_problem(content, reference: dict[str, np.ndarray], groups: set[str], max_update_norm: float) -> str | None:
    """Why a train reply cannot be aggregated, or None when it can."""
    if (arrays := arrays_of(content)) is None or not isinstance(content.get(METRICS), MetricRecord):
        return f"reply lacks the {ARRAYS!r} array record or the {METRICS!r} metric record"
    metrics = content[METRICS]
    try:
        values = record_values(arrays, reference)
    except ValueError as e:
        return str(e)
    counts = counts_of(metrics)
    if bad := sorted(g for g in counts if g not in groups):
        return f"sample counts name unknown parameter groups {bad[:5]}"
    if any(not isinstance(v, int) or v < 0 for v in counts.values()) or counts.get("shared", 0) <= 0:
        return f"sample counts must be non-negative integers with {COUNT}shared > 0, got {counts}"
    squared = 0.0
    for key, ref in reference.items():
        part = squared_distance(values[key], ref)
        if not math.isfinite(part):
            return f"non-finite values in {key}"
        squared += part
    if (norm := squared ** 0.5) > max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}"
    return None


def weighted_metrics(replies: list[tuple[MetricRecord, int]]) -> MetricRecord:
    """Counts (items.*, num-examples) summed over sites; every other metric averaged over the sites that report
    it, weighted by their n.shared."""
    sums, weights = defaultdict(float), defaultdict(float)
    for metrics, w in replies:
        for k, v in metrics.items():
            # dp.*: per site, in the ledger; time.*: per site, where its reply time went (in site_metrics)
            if k.startswith((COUNT, DP, TIME)) or not isinstance(v, (int, float)):
                continue
            summed = k.startswith(ITEMS) or k == NUM_EXAMPLES
            sums[k] += float(v) * (1 if summed else w)
            weights[k] += 0 if summed else w
    return MetricRecord({k: sums[k] / weights[k] if weights[k] else sums[k] for k in sorted(sums)})


@dataclass
class RoundOutcome:
    """What one round's replies came to. Each entry names site_id and node_id."""
    replies: int = 0  # train replies taken: answers, and the lost ones delivery gave up on
    accepted: list[dict] = field(default_factory=list)  # + metrics: every reply that counted
    skips: list[dict] = field(default_factory=list)  # + reason: replied without training
    rejections: list[dict] = field(default_factory=list)  # + reason: dropped
    contributors: dict[str, int] = field(default_factory=dict)  # packed key -> sites that trained it
    arrays: ArrayRecord | None = None  # the new global weights; None: no reply counted
    metrics: MetricRecord | None = None  # training metrics, aggregated
    evaluations: list[dict] = field(default_factory=list)  # + metrics or error: the round's evaluation replies
    evaluate_metrics: MetricRecord | None = None

    @property
    def untrained(self) -> set[str]:
        return {k for k, n in self.contributors.items() if n == 0}


class TaskAwareFedAvg(FedAvg):
    """FedAvg whose train messages name the phase's action and whose average is task-aware."""

    def __init__(self, *args, **kwargs):  # cooperative: FedProx and FedAdam call it with FedAvg's arguments
        super().__init__(*args, **kwargs)
        self.groups: set[str] = set()  # parameter groups of the model (set by build_strategy)
        self.max_update_norm = float("inf")
        self.reference: dict[str, np.ndarray] = {}  # the global weights sent this round (views, no copy)
        self.uniform_weights = False  # central DP (server/central_dp.py): each site counts once per group
        self.clip_reply = None  # server-side central DP: clips a checked reply before it counts (central_dp.py)
        self.outcome = RoundOutcome()  # of the round aggregated last
        self.sent_to: dict[str, int] = {}  # message id -> node it went to (server/delivery.py), to name replies
        self.site_names: dict[int, str] = {}  # node -> the site id it last answered with

    # read by tests/test_privacy.py; the round loop reads `outcome`
    rejections = property(lambda self: self.outcome.rejections)
    accepted = property(lambda self: self.outcome.accepted)

    def who(self, msg: Message) -> dict:
        """The site and node a reply answers for. The SuperLink sends error replies itself (src_node_id 1), so the
        node is the one the answered message went to; the site is what that node said it was, in this reply or
        an earlier one, else "node-N"."""
        node = self.sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        rec = msg.content.config_records.get(SITE) if not msg.has_error() else None
        if rec and SITE_ID in rec:
            self.site_names[node] = str(rec[SITE_ID])
        return {"site_id": self.site_names.get(node, f"node-{node}"), "node_id": str(node)}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self.reference = {k: array_view(a) for k, a in arrays.items()}
        messages = super().configure_train(server_round, arrays, config, grid)
        action = train_type(config["phase"])  # the ClientApp routes on it: @app.train("pretrain") ...
        return [Message(content=m.content, message_type=action, dst_node_id=m.metadata.dst_node_id)
                for m in messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Check and fold each reply as it arrives -> (new arrays, aggregated metrics), (None, None) when no
        reply counted; the details go to self.outcome."""
        self.outcome = RoundOutcome()
        running = TaskAwareSum(self.reference, self.uniform_weights)
        counted: list[tuple[MetricRecord, int]] = []
        for msg in replies:
            self.outcome.replies += 1
            self._take(msg, running, counted)
            if msg.has_content():
                drop_arrays(msg.content)  # its arrays go now, before the next reply is pulled
            del msg
        if not self.outcome.accepted:
            return None, None
        averaged, self.outcome.contributors = running.result()
        return array_record(averaged, consume=True), weighted_metrics(counted)

    def _take(self, msg: Message, running: TaskAwareSum, counted: list) -> None:
        """Record one reply in the outcome, folding it into `running` when it counts."""
        out, who = self.outcome, self.who(msg)
        if msg.has_error():
            out.rejections.append({**who, "reason": f"site error: {msg.error.reason}"})
            return
        if any(a["site_id"] == who["site_id"] for a in out.accepted):  # e.g. an old and a new SuperNode
            out.rejections.append({**who, "reason": f"a second reply from {who['site_id']}; the first counted"})
            return
        site = msg.content.config_records.get(SITE) or {}
        if site.get(SKIPPED):
            out.skips.append({**who, "reason": str(site[SKIPPED])})
            return
        if self.clip_reply is None:
            problem = reply_problem(msg.content, self.reference, self.groups, self.max_update_norm)
        elif (problem := reply_problem(msg.content, self.reference, self.groups, float("inf"))) is None:
            self.clip_reply(msg)  # as Flower's wrapper did before any check: the bound applies to the clipped update
            problem = reply_problem(msg.content, self.reference, self.groups, self.max_update_norm)
        if problem:
            out.rejections.append({**who, "reason": problem})
            return
        metrics = msg.content.metric_records[METRICS]
        counts = {g: int(n) for g, n in counts_of(metrics).items()}
        running.add(record_values(arrays_of(msg.content), self.reference), counts)
        counted.append((MetricRecord(dict(metrics)), counts["shared"]))
        out.accepted.append({**who, "metrics": dict(metrics)})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """Evaluation replies as they arrive -> weighted metrics, None when none had any; each reply's metrics or
        error go to self.outcome.evaluations."""
        self.outcome.evaluations = []
        usable = []
        for msg in replies:
            who = self.who(msg)
            if msg.has_error() or METRICS not in msg.content.metric_records:
                reason = msg.error.reason if msg.has_error() else "no metrics"
                self.outcome.evaluations.append({**who, "error": reason})
                continue
            metrics = msg.content.metric_records[METRICS]
            self.outcome.evaluations.append({**who, "metrics": dict(metrics)})
            usable.append((MetricRecord(dict(metrics)), max(1, int(metrics.get(NUM_EXAMPLES, 1)))))
        return weighted_metrics(usable) if usable else None

    def state(self) -> dict[str, np.ndarray]:
        """Server-side optimizer state to checkpoint (none for FedAvg and FedProx)."""
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)[:3]}")


class TaskAwareFedProx(FedProx, TaskAwareFedAvg):
    """FedProx (proximal-mu sent in the train config) over the task-aware average."""


class TaskAwareFedAdam(FedAdam, TaskAwareFedAvg):
    """FedAdam's server step on the task-aware average; parameters nobody trained stay where they were."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = super().aggregate_train(server_round, replies)  # FedAdam only steps on the average
        if arrays is not None:
            # momentum would otherwise keep moving parameters no site trained this round; and Flower's step
            # computes in float64 (its bias correction is a NumPy float64), so cast back to the model's dtype
            untrained = self.outcome.untrained
            arrays = ArrayRecord({k: Array(self.reference[k] if k in untrained
                                           else a.numpy().astype(self.reference[k].dtype))
                                  for k, a in arrays.items()})
        return arrays, metrics

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for name, moments in (("m_t", self.m_t), ("v_t", self.v_t)):
            for k, v in (moments or {}).items():
                out[f"{name}/{k}"] = v
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        m = {k[4:]: v for k, v in state.items() if k.startswith("m_t/")}
        v = {k[4:]: v for k, v in state.items() if k.startswith("v_t/")}
        self.m_t, self.v_t = m or None, v or None


def train_round(strategy, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
    """The strategy (a TaskAwareFedAvg, or central DP's wrapper around one) aggregates the replies as they
    arrive -> the round's outcome, with the new global weights (None: no reply counted) and metrics."""
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    outcome = strategy.outcome
    outcome.arrays, outcome.metrics = arrays, metrics
    return outcome


def evaluate_round(strategy, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
    """The evaluation replies of the round just trained, as they arrive -> the round's outcome with them."""
    metrics = strategy.aggregate_evaluate(server_round, replies)
    strategy.outcome.evaluate_metrics = metrics
    return strategy.outcome


def build_strategy(name: str, groups: set[str], min_sites: int, max_update_norm: float, proximal_mu: float = 0.0,
                   eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> TaskAwareFedAvg:
    common = dict(min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites)
    if name == "fedavg":
        strategy = TaskAwareFedAvg(**common)
    elif name == "fedprox":
        strategy = TaskAwareFedProx(proximal_mu=proximal_mu, **common)
    elif name == "fedadam":
        strategy = TaskAwareFedAdam(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau, **common)
    else:
        raise ValueError(f"unknown strategy {name!r}; choose fedavg, fedprox or fedadam")
    strategy.groups, strategy.max_update_norm = set(groups), max_update_norm
    return strategy
