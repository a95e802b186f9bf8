"""The ServerApp `benchmarks/secagg.py --engine deployment` runs on a real SuperLink (its ClientApp:
benchmarks/secagg_site_app.py, a module of its own so that each ClientApp process imports only what a site's does).

One round, secure (server/secure.py's secure_train_round: SecAgg+ per chunk) or plaintext (the joined weights out
with the coordinator's push, each reply pulled and folded in turn, as server/delivery.py does). ClientApp: a site's
answer with a random update of the model's size instead of training, the same local compute in both modes. The
ServerApp writes its timings to the run config's `out` file.

Run config: values, sites, secure (0/1), chunk-values, out.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from secagg_site_app import PLAIN, random_values
from server.delivery import arrivals, push
from server.secure import PromptGrid, SecAggConfig, secure_train_round
from transport.object_pulls import quick_object_pulls
from transport.protocol import ARRAYS, CONFIG
from transport.wire import arrays_of, drop_arrays, npy_array

serverapp = ServerApp()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    try:
        one_round(grid, context.run_config)
    except BaseException:  # the driver reads why from the out file (a ServerApp's output goes nowhere it sees)
        Path(str(context.run_config["out"])).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
        raise


def timed_stages(stages: list) -> None:
    """Each SecAgg+ stage's wall time at the ServerApp (push, the sites' work, every hop, the pulls)."""
    inner = PromptGrid.send_and_receive

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        t0 = time.perf_counter()
        replies = inner(self, messages, timeout=timeout)
        stage = next((str(m.content.config_records["secaggplus_configs"]["stage"]) for m in messages
                      if "secaggplus_configs" in m.content.config_records), "fit")
        stages.append({"stage": stage, "s": time.perf_counter() - t0})
        return replies
    PromptGrid.send_and_receive = send_and_receive


def one_round(grid: Grid, rc) -> None:
    quick_object_pulls()
    stages: list[dict] = []
    timed_stages(stages)
    size, sites, secure, chunk = int(rc["values"]), int(rc["sites"]), bool(int(rc["secure"])), int(rc["chunk-values"])
    deadline = time.monotonic() + 300
    while len(grid.get_node_ids()) < sites and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())[:sites]
    weights = random_values(size, 0.02, seed=0)
    # plaintext: the global model as the coordinator's strategy holds it (made before the idle level, as there)
    model = None if secure else ArrayRecord({"model": npy_array(weights)})
    idle_mb = peak_rss_mb()
    t0 = time.perf_counter()
    if secure:
        out, contributors, done = secure_train_round(grid, SecAggConfig(clipping_range=0.1, chunk_values=chunk),
                                                     ArrayRecord({"model": Array(weights)}), {"server-round": 1},
                                                     1, nodes)
        ok = out is not None and contributors == {"model": sites}
    else:
        content = RecordDict({ARRAYS: model, CONFIG: ConfigRecord({"values": size})})
        # the coordinator's push: weights joined into one copy for the wire, let go once sent
        pending = push(grid, [Message(content, dst_node_id=n, message_type=PLAIN) for n in nodes], {})
        mean, got = np.zeros(size, dtype=np.float32), 0
        for _, reply in arrivals(grid, pending, 3600):  # one reply at a time, as the coordinator folds them
            if not reply.has_error() and (record := arrays_of(reply.content)) is not None:
                mean += record["float32"].numpy() / sites
                got += 1
            drop_arrays(reply.content)
            del reply
        mean += weights
        ok = got == sites
    seconds = time.perf_counter() - t0
    Path(str(rc["out"])).write_text(json.dumps({"ok": ok, "round_s": seconds, "serverapp_idle_peak_mb": idle_mb,
                                                "serverapp_peak_mb": peak_rss_mb(), "stages": stages}))
