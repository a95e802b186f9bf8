"""Task-aware aggregation as Flower strategies: FedAvg, FedProx and FedAdam with per-group averaging.

Every reply is checked before it counts (same keys, shapes and dtypes as the
global model, all finite, sample counts that name real parameter groups, an
update no larger than the configured bound); a failing reply is dropped and
kept in `rejections` with its reason. Each parameter is then averaged over the
sites that trained its group (m3fm/model/groups.py; weights travel packed,
one vector per group, m3fm/model/packing.py), weighted by their sample
counts for that group; a parameter nobody trained keeps its value. FedProx and
FedAdam keep Flower's own logic around that average (the proximal term travels
in the train config; FedAdam's server step runs on the task-aware average).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from m3fm.model.packing import group_of_packed

COUNT = "n."  # metric keys "n.<group>": the site's sample count for a parameter group
SITE_RECORD, ARRAYS, METRICS = "site", "arrays", "metrics"


def array_record(packed: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in packed.items()})


def reply_problem(content, reference: dict[str, np.ndarray], groups: set[str], max_update_norm: float) -> str | None:
    """Why a train reply cannot be aggregated, or None when it can."""
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return f"reply lacks the {ARRAYS!r} array record or the {METRICS!r} metric record"
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    missing, unexpected = reference.keys() - arrays.keys(), arrays.keys() - reference.keys()
    if missing or unexpected:
        return f"keys differ from the global model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
    counts = {k[len(COUNT):]: v for k, v in metrics.items() if k.startswith(COUNT)}
    if bad := sorted(g for g in counts if g not in groups):
        return f"sample counts name unknown parameter groups {bad[:5]}"
    if any(not isinstance(v, int) or v < 0 for v in counts.values()) or counts.get("shared", 0) <= 0:
        return f"sample counts must be non-negative integers with n.shared > 0, got {counts}"
    squared = 0.0
    for key, ref in reference.items():
        a = arrays[key]
        if tuple(a.shape) != ref.shape:
            return f"shape of {key}: expected {ref.shape}, got {tuple(a.shape)}"
        if a.dtype != str(ref.dtype):
            return f"dtype of {key}: expected {ref.dtype}, got {a.dtype}"
        x = a.numpy()
        if not np.isfinite(x).all():
            return f"non-finite values in {key}"
        squared += float(np.sum((x.astype(np.float64) - ref) ** 2))
    if (norm := squared ** 0.5) > max_update_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}"
    return None


def task_aware_average(reference: dict[str, np.ndarray], replies: list[tuple[dict[str, np.ndarray], dict[str, int]]],
                       uniform: bool = False) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Packed weights (m3fm/model/packing.py): one vector per parameter group.
    replies: (arrays, group -> sample count); uniform: every site that trained a group counts once (central DP).
    -> new arrays, and per key the number of sites that trained it (0: kept as it was)."""
    out, contributors = {}, {}
    for key, ref in reference.items():
        group = group_of_packed(key)
        weighted = [(arrays[key], 1 if uniform else counts[group]) for arrays, counts in replies
                    if counts.get(group, 0) > 0]
        contributors[key] = len(weighted)
        if not weighted:
            out[key] = ref
            continue
        total = sum(w for _, w in weighted)
        acc = sum(a.astype(np.float64) * (w / total) for a, w in weighted)
        out[key] = np.asarray(acc, dtype=ref.dtype)
    return out, contributors


def weighted_metrics(replies: list[tuple[MetricRecord, int]]) -> MetricRecord:
    """Counts (items.*, num-examples) summed over sites; every other metric averaged over the sites that report
    it, weighted by their n.shared."""
    sums, weights = defaultdict(float), defaultdict(float)
    for metrics, w in replies:
        for k, v in metrics.items():
            if k.startswith((COUNT, "dp.")) or not isinstance(v, (int, float)):  # dp.*: per site, in the ledger
                continue
            summed = k.startswith("items.") or k == "num-examples"
            sums[k] += float(v) * (1 if summed else w)
            weights[k] += 0 if summed else w
    return MetricRecord({k: sums[k] / weights[k] if weights[k] else sums[k] for k in sorted(sums)})


class TaskAwareFedAvg(FedAvg):
    """FedAvg whose train messages name the phase's action and whose average is task-aware."""

    def __init__(self, *args, **kwargs):  # cooperative: FedProx and FedAdam call it with FedAvg's arguments
        super().__init__(*args, **kwargs)
        self.groups: set[str] = set()  # parameter groups of the model (set by build_strategy)
        self.max_update_norm = float("inf")
        self.reference: dict[str, np.ndarray] = {}
        self.rejections: list[dict] = []  # of the last aggregation: site, node, reason
        self.skips: list[dict] = []  # sites that replied without training, and why
        self.accepted: list[dict] = []  # site, node, metrics of every reply that counted
        self.evaluations: list[dict] = []  # of the last evaluation: site, node, metrics or error
        self.untrained: set[str] = set()
        self.contributors: dict[str, int] = {}  # packed key -> sites that trained it, last aggregation
        self.uniform_weights = False  # central DP (server/central_dp.py): each site counts once per group
        self.sent_to: dict[str, int] = {}  # message id -> node it went to (server/delivery.py), to name replies
        self.site_names: dict[int, str] = {}  # node -> the site id it last answered with

    def who(self, msg: Message) -> dict:
        """The site and node a reply answers for. The SuperLink sends error replies itself (src_node_id 1), so the
        node is the one the answered message went to; the site is what that node said it was, in this reply or
        an earlier one, else "node-N"."""
        node = self.sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        rec = msg.content.config_records.get(SITE_RECORD) if not msg.has_error() else None
        if rec and "site_id" in rec:
            self.site_names[node] = str(rec["site_id"])
        return {"site_id": self.site_names.get(node, f"node-{node}"), "node_id": str(node)}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self.reference = {k: a.numpy() for k, a in arrays.items()}
        messages = super().configure_train(server_round, arrays, config, grid)
        action = f"train.{config['phase']}"  # the ClientApp routes on it: @app.train("pretrain") ...
        return [Message(content=m.content, message_type=action, dst_node_id=m.metadata.dst_node_id)
                for m in messages]

    def aggregate_train(self, server_round: int, replies):
        self.rejections, self.skips, self.accepted = [], [], []
        usable = []
        for msg in replies:
            who = self.who(msg)
            if msg.has_error():
                self.rejections.append({**who, "reason": f"site error: {msg.error.reason}"})
                continue
            if any(a["site_id"] == who["site_id"] for a in self.accepted):  # e.g. an old and a new SuperNode
                self.rejections.append({**who, "reason": f"a second reply from {who['site_id']}; the first counted"})
                continue
            site = msg.content.config_records.get(SITE_RECORD) or {}
            if site.get("skipped"):
                self.skips.append({**who, "reason": str(site["skipped"])})
                continue
            if problem := reply_problem(msg.content, self.reference, self.groups, self.max_update_norm):
                self.rejections.append({**who, "reason": problem})
                continue
            metrics = msg.content.metric_records[METRICS]
            counts = {k[len(COUNT):]: int(v) for k, v in metrics.items() if k.startswith(COUNT)}
            arrays = {k: a.numpy() for k, a in msg.content.array_records[ARRAYS].items()}
            usable.append((arrays, counts, metrics))
            self.accepted.append({**who, "metrics": dict(metrics)})
        if not usable:
            return None, None
        averaged, self.contributors = task_aware_average(self.reference, [(a, c) for a, c, _ in usable],
                                                         self.uniform_weights)
        self.untrained = {k for k, n in self.contributors.items() if n == 0}
        metrics = weighted_metrics([(m, c["shared"]) for _, c, m in usable])
        return array_record(averaged), metrics

    def aggregate_evaluate(self, server_round: int, replies):
        self.evaluations = []
        usable = []
        for msg in replies:
            who = self.who(msg)
            if msg.has_error() or METRICS not in msg.content.metric_records:
                reason = msg.error.reason if msg.has_error() else "no metrics"
                self.evaluations.append({**who, "error": reason})
                continue
            metrics = msg.content.metric_records[METRICS]
            self.evaluations.append({**who, "metrics": dict(metrics)})
            usable.append((metrics, max(1, int(metrics.get("num-examples", 1)))))
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

    def aggregate_train(self, server_round: int, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            # momentum would otherwise keep moving parameters no site trained this round; and Flower's step
            # computes in float64 (its bias correction is a NumPy float64), so cast back to the model's dtype
            arrays = ArrayRecord({k: Array(self.reference[k] if k in self.untrained
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
