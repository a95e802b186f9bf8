"""Aggregation throughput at the coordinator: TaskAwareFedAvg.aggregate_train (reply checks, the task-aware
weighted mean per parameter group, the new ArrayRecord) over S sites' replies, per model configuration.

  python benchmarks/aggregation.py [--configs tiny base large] [--sites 4] [--repeats 2]

Replies are the configuration's real packed weights plus noise, every site training every group. Throughput is
the replies' bytes aggregated per second. A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import time

import common
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from m3fm.model.configs import get_config
from m3fm.model.m3fm import M3FM
from m3fm.model.packing import group_of_packed, pack_state
from server.strategy import build_strategy


def replies(reference: dict[str, np.ndarray], sites: int) -> list[Message]:
    rng = np.random.default_rng(0)
    out = []
    for node in range(1, sites + 1):
        sent = Message(RecordDict(), dst_node_id=node, message_type="train.multitask")
        sent.metadata.__dict__["_message_id"] = f"m{node}"
        record = ArrayRecord()  # one group at a time: only the serialized reply stays in memory
        for k, v in reference.items():
            record[k] = Array(v + rng.standard_normal(v.shape, dtype=np.float32) * 1e-3)
        counts = {f"n.{group_of_packed(k)}": 10 + node for k in reference}
        msg = Message(RecordDict({"site": ConfigRecord({"site_id": f"site-{node}", "skipped": ""}),
                                  "metrics": MetricRecord({**counts, "loss.x": 1.0}), "arrays": record}), reply_to=sent)
        msg.metadata.__dict__["_src_node_id"] = node
        out.append(msg)
    return out


def measure(config: str, sites: int, repeats: int) -> dict:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.manual_seed(0)
    reference = pack_state(M3FM(get_config(config)).state_dict())
    reference_mb = sum(v.nbytes for v in reference.values()) / 2**20
    params = sum(v.size for v in reference.values())
    msgs = replies(reference, sites)
    best = float("inf")
    for _ in range(repeats):
        strategy = build_strategy("fedavg", {group_of_packed(k) for k in reference}, sites, 1e9)
        strategy.reference = reference
        t0 = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, msgs)
        best = min(best, time.perf_counter() - t0)
        assert arrays is not None and len(strategy.accepted) == sites
    mb = reference_mb * sites
    return {"config": config, "params_m": params / 1e6, "groups": len(reference), "sites": sites,
            "seconds": best, "mb_per_s": mb / best, "mparams_per_s": params * sites / best / 1e6,
            "peak_rss_gib": common.rss_bytes_peak() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "base", "large"])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for c in args.configs:
        rows.append(measure(c, args.sites, args.repeats))
        print(rows[-1], flush=True)
    common.report("aggregation", f"task-aware FedAvg aggregation, {args.sites} sites (best of {args.repeats})", rows)


if __name__ == "__main__":
    main()
