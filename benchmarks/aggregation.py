"""Coordinator memory and throughput of the streaming aggregation: TaskAwareFedAvg.aggregate_train checking and
folding S sites' replies one at a time, as server/delivery.py hands them over, at one model configuration.

  python benchmarks/aggregation.py [--config base] [--sites 4 8 16]

Each case runs in a fresh process, so no peak carries over. The global model is the configuration's packed
layout (sizes from the model on the meta device) filled with random float32 values; each reply is a fresh
ArrayRecord of those vectors plus a small site-specific update, every site training every group, made only when
the strategy asks for the next reply, joined into one float32 vector as replies travel (transport/wire.py). A
reply holds its .npy bytes as a pulled one does; they are written in place (a bytearray), so making a reply costs
no second copy of it (Flower's own inflate of a pulled reply briefly
does: that is not measured here). `before` is the process's resident memory before the global model exists
(Python, NumPy, torch, Flower: the constant), `peak` its VmHWM at the end; `peak/model` is (peak - before) over
the model's bytes. Throughput is the replies' bytes over the time spent in the strategy (checks, fold, the new
ArrayRecord); the time spent making replies is left out. A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time

import common
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

CHUNK = 1 << 16


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def wire_array(size: int, fill) -> Array:
    """A float32 vector as it comes off the wire: an Array holding its .npy bytes, filled chunk by chunk in place
    by fill(out, start)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (size,)})
    offset = len(head.getvalue())
    buf = bytearray(offset + 4 * size)
    buf[:offset] = head.getvalue()
    values = np.frombuffer(buf, np.float32, count=size, offset=offset)
    for start in range(0, size, CHUNK):
        fill(values[start:start + CHUNK], start)
    array = Array(dtype="float32", shape=(size,), stype=SType.NUMPY, data=b"")
    array.data = buf
    return array


def record(fills: dict) -> ArrayRecord:
    """key -> (size, fill): an ArrayRecord of wire_arrays (set one by one: ArrayRecord(dict) would remake each
    Array, and Array() takes only bytes)."""
    out = ArrayRecord()
    for key, (size, fill) in fills.items():
        out[key] = wire_array(size, fill)
    return out


def measure(config: str, sites: int) -> dict:
    """One case, in this process."""
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from m3fm.model.configs import get_config
    from m3fm.model.m3fm import M3FM
    from m3fm.weights.packing import group_of_packed, layout
    from server.strategy import build_strategy, train_round
    from server.task_sum import array_view
    from transport.protocol import ARRAYS, COUNT, METRICS, SITE, SITE_ID, SKIPPED

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    with torch.device("meta"):
        state = M3FM(get_config(config)).state_dict()
    sizes = {key: sum(state[n].numel() for n in names) for key, names in layout(state).items()}
    assert all(state[names[0]].dtype == torch.float32 for names in layout(state).values())
    del state
    before = status_bytes("VmRSS")
    rng = np.random.default_rng(0)
    global_record = record({k: (n, lambda out, _: rng.standard_normal(out=out, dtype=np.float32))
                            for k, n in sizes.items()})
    reference = {k: array_view(a) for k, a in global_record.items()}  # what configure_train sets
    model_bytes = 4 * sum(sizes.values())
    noise = rng.standard_normal(CHUNK, dtype=np.float32) * 1e-3
    making = [0.0]

    starts = np.cumsum([0, *sizes.values()])  # where each packed group begins in the joined vector
    parts = list(reference.values())

    def site_update(scale: np.float32):
        def fill(out, start):  # out: the joined vector's values [start, start + out.size)
            np.multiply(noise[:out.size], scale, out=out)
            g = int(np.searchsorted(starts, start, side="right")) - 1
            done = 0
            while done < out.size:
                at = start + done - starts[g]
                n = min(out.size - done, parts[g].size - at)
                out[done:done + n] += parts[g][at:at + n]
                done, g = done + n, g + 1
        return fill

    def replies():
        for node in range(1, sites + 1):
            t0 = time.perf_counter()
            sent = Message(RecordDict(), dst_node_id=node, message_type="train.multitask")
            sent.metadata.__dict__["_message_id"] = f"m{node}"
            arrays = record({"float32": (int(starts[-1]), site_update(np.float32(node)))})
            counts = {f"{COUNT}{group_of_packed(k)}": 10 + node for k in sizes}
            msg = Message(RecordDict({SITE: ConfigRecord({SITE_ID: f"site-{node}", SKIPPED: ""}),
                                      METRICS: MetricRecord({**counts, "loss.x": 1.0}), ARRAYS: arrays}), reply_to=sent)
            msg.metadata.__dict__["_src_node_id"] = node
            del arrays
            making[0] += time.perf_counter() - t0
            yield msg
            del msg

    strategy = build_strategy("fedavg", {group_of_packed(k) for k in sizes}, sites, float("inf"))
    strategy.reference = reference
    t0 = time.perf_counter()
    outcome = train_round(strategy, 1, replies())
    seconds = time.perf_counter() - t0 - making[0]
    assert outcome.arrays is not None and len(outcome.accepted) == sites, outcome.rejections
    peak = status_bytes("VmHWM")
    return {"config": config, "sites": sites, "params_m": sum(sizes.values()) / 1e6, "model_gib": model_bytes / 2**30,
            "before_gib": before / 2**30, "peak_gib": peak / 2**30, "peak/model": (peak - before) / model_bytes,
            "strategy_s": seconds, "making_s": making[0], "gb_per_s": sites * model_bytes / seconds / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="base")
    ap.add_argument("--sites", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single case, run in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, args.one)))
        return
    rows = []
    for sites in args.sites:
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--one", str(sites)],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{sites} sites: {out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    common.report("aggregation", f"streaming task-aware FedAvg at the coordinator, {args.config}, one process per case",
                  rows)


if __name__ == "__main__":
    main()
