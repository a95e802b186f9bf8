"""The ClientApp of `benchmarks/secagg.py --engine deployment` (its ServerApp: benchmarks/secagg_app.py).

A site's answer with a random update of the model's size instead of training, the same local compute in both
modes: plaintext sends it joined, as a site's service does; the secure path goes through secaggplus_mod and
answer_chunk (the update kept on the site's disk from chunk 0 to the last) as client/app.py and the service do.
Only Flower, NumPy and transport/ are imported: each message's ClientApp process imports this module anew.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from transport.lean_masking import lean_collect_stage
from transport.masked_arrays import masked_vectors_as_arrays
from transport.protocol import ARRAYS, CHUNK_KEY, CHUNK_VALUES_KEY, CONFIG, TRAINED_MARK_KEY
from transport.secure_chunks import ChunkedUpdate, answer_chunk
from transport.wire import joined_record



def timed_mod(msg: Message, context: Context, call_next) -> Message:
    """Seconds inside the ClientApp per SecAgg+ stage (mask work, our chunk, serialization of the reply), appended
    to the site's work folder as JSON lines: the benchmark splits a secure round into site work and transport."""
    configs = msg.content.config_records.get("secaggplus_configs")  # secaggplus_mod pops the stage
    stage = str(configs["stage"]) if configs is not None and "stage" in configs else "plain"
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    work = Path(str(context.node_config["work"]))
    work.mkdir(parents=True, exist_ok=True)  # in-process (benchmarks/secagg.py) nothing has made it before setup
    with open(work / "timings.jsonl", "a") as f:
        f.write(json.dumps({"stage": stage, "s": time.perf_counter() - t0}) + "\n")
    return reply


lean_collect_stage()  # as client/app.py: secaggplus_mod's masking in blocks and in place
clientapp = ClientApp(mods=[timed_mod, masked_vectors_as_arrays, secaggplus_mod])
PLAIN = "train.plain"


def random_values(n: int, scale: float, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """n float32 normal values, made in blocks (no float64 copy of the model)."""
    rng, block = np.random.default_rng(seed), 2**24
    out = np.empty(n, dtype=np.float32) if out is None else out
    for i in range(0, n, block):
        part = out[i:i + block]
        rng.standard_normal(out=part, dtype=np.float32)
        part *= scale
    return out


@clientapp.train("plain")
def plain(msg: Message, context: Context) -> Message:
    size = int(msg.content[CONFIG]["values"])
    update = random_values(size, 0.01, seed=context.node_id % 2**32)
    return Message(RecordDict({ARRAYS: joined_record({"model": update})}), reply_to=msg)


@clientapp.train()
def secure(msg: Message, context: Context) -> Message:
    """A chunk of a SecAgg+ round (secaggplus_mod masks it): chunk 0 makes the random update on the site's disk."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config, folder = dict(fitins.config), Path(str(context.node_config["work"]))
    c, round_id = int(config[CHUNK_KEY]), ("bench", 1)

    def make() -> ChunkedUpdate:  # chunk 0 brings the weights, as to a site that trains on them
        size = parameters_to_ndarrays(fitins.parameters)[0].size
        update = ChunkedUpdate.create(folder, round_id, [("model", size)], int(config[CHUNK_VALUES_KEY]))
        random_values(size, 0.01, seed=context.node_id % 2**32, out=update.flat)
        update.marks = {"model": float(config[TRAINED_MARK_KEY])}
        update.save()
        return update

    chunk = answer_chunk(folder, round_id, c, make)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(chunk), 1, {})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
