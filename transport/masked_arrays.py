"""SecAgg+'s masked vectors on Flower's array path, 4 bytes a value.

`secaggplus_mod` answers the collect stage with the site's masked vector as int64 `ndarray_to_bytes` inside its
ConfigRecord. A ConfigRecord has no children, so the transport moves it as one object of 8 bytes a value, where an
Array goes as 5 MB ArrayChunks. Measured through the deployment engine (`benchmarks/secagg.py --engine deployment
--sizes 67108864`, 3 sites, 2 chunks of 2**25 values, 2026-12-04): the collect stage took 105 s a chunk (the
sites' own ClientApp time was 20 s for the whole round), where the plaintext round moved the same 256 MB model
down and up in its ArrayRecord in 46 s.

So the site's outermost mod (`masked_vectors_as_arrays`, outside secaggplus_mod) moves the vector into an
ArrayRecord, as uint32 when every value fits (SecAgg+ reduces each value mod modulus_range, 2**32 by default),
and the coordinator's grid (server/secure.py, PromptGrid) puts it back where the workflow reads it
(`masked_vectors_as_bytes`). The same integers travel; nothing of the protocol changes.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from transport.protocol import MASKED_ARRAYS_KEY
from transport.wire import npy_array, npy_view


def _vector(data: bytes) -> np.ndarray:
    view = npy_view(data)
    if view is None:
        raise ValueError("a masked vector must be .npy bytes of a C-ordered array of integers")
    return view


def masked_vectors_as_arrays(msg: Message, context: Context, call_next) -> Message:
    """A client mod, outermost: a collect-stage reply's masked vector goes as Arrays (uint32 if it fits)."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return reply
    arrays = {}
    for i, data in enumerate(configs.pop(Key.MASKED_PARAMETERS)):
        x = _vector(data)
        fits = x.size == 0 or (x.min() >= 0 and x.max() < 2**32)
        arrays[str(i)] = npy_array(x.astype(np.uint32) if fits else x)
        del x, data
    reply.content.array_records[MASKED_ARRAYS_KEY] = ArrayRecord(arrays)
    return reply


def masked_vectors_as_bytes(reply: Message) -> Message:
    """At the coordinator: the reply as secaggplus_mod made it (int64 .npy bytes in its ConfigRecord)."""
    if reply.has_error() or MASKED_ARRAYS_KEY not in reply.content.array_records:
        return reply
    record = reply.content.array_records.pop(MASKED_ARRAYS_KEY)
    vectors = []
    for i in range(len(record)):
        array = record.pop(str(i))
        vectors.append(ndarray_to_bytes(_vector(array.data).astype(np.int64)))
        del array
    # A fresh record, not the one that came: Flower's transport inflates objects of equal content once
    # (supercore/inflatable/inflatable_utils.py keeps them by content hash), so the emptied ConfigRecord
    # the site sent is the very object the reply's empty `fitres.metrics` ConfigRecord is, and writing into it
    # would put the masked vector into the metrics too (compat.recorddict_to_fitres then fails on a list).
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    reply.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({**configs, Key.MASKED_PARAMETERS: vectors})
    return reply
