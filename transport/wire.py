"""Weights on the wire: one Flower Array per dtype, the packed vectors (m3fm/weights/packing.py) joined in order.

Flower moves each Array as its own objects (the Array and its 5 MB chunks), one HTTP request each, through the
SuperLink, which answers about a hundred of them a second on two busy cores (traced with FLWR_LOG_LEVEL=DEBUG:
a tiny model's 35 packed groups were ~70 objects, 1.2-1.8 s per hop between SuperNode and SuperLink, most of a
round's fixed cost). Joined, a tiny model is 2 objects per message; a large one is its bytes in 5 MB chunks either
way. Both ends know the order and lengths from the model's configuration (packing.packed_sizes on the site, the
global model's vectors on the coordinator), so nothing else travels; packing.split_joined checks the lengths.
A record keyed by packed group (the SecAgg+ path, tests, a clipped reply) is read as it is.
"""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType

from transport.protocol import ARRAYS


def npy_view(data: bytes) -> np.ndarray | None:
    """The array inside .npy bytes (as Array and ndarray_to_bytes write them) as a read-only view, without the copy
    np.load or Array.numpy() makes; None unless a version 1 or 2 header of a C-ordered plain dtype."""
    view = memoryview(data)
    major = view[6] if len(view) > 9 else 0
    start = {1: 10, 2: 12}.get(major)
    if start is None:
        return None
    header_len = int.from_bytes(view[8:start], "little")
    head = io.BytesIO(view[:start + header_len].tobytes())
    version = np.lib.format.read_magic(head)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(head)
    if fortran_order or dtype.hasobject:
        return None
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=start + header_len).reshape(shape)


def npy_array(x: np.ndarray) -> Array:
    """An Array holding x's .npy bytes, made with one copy (Array(x) writes through a BytesIO and copies again)."""
    x = np.ascontiguousarray(x)
    return _npy(x.dtype, x.shape, [x])


def joined_record(packed: Mapping[str, np.ndarray]) -> ArrayRecord:
    """packed key -> vector => ArrayRecord of one .npy vector per dtype name, parts in `packed`'s order; each
    value is copied once, straight into the Array's bytes."""
    parts: dict[str, list[np.ndarray]] = {}
    for v in packed.values():
        v = np.ascontiguousarray(v).reshape(-1)
        parts.setdefault(v.dtype.name, []).append(v)
    return ArrayRecord({name: _npy(np.dtype(name), (sum(v.size for v in vectors),), vectors)
                        for name, vectors in parts.items()})


def _npy(dtype: np.dtype, shape: tuple, parts: list[np.ndarray]) -> Array:
    """An Array of `shape` whose .npy bytes are a version 1 header and then the contiguous `parts`, in order."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    return Array(dtype=np.dtype(dtype).name, shape=tuple(int(n) for n in shape), stype=SType.NUMPY,
                 data=b"".join([head.getvalue(), *(p.reshape(-1).view(np.uint8).data for p in parts)]))


def record_like(packed: Mapping[str, np.ndarray], received: ArrayRecord) -> ArrayRecord:
    """A reply's weights in the form its message brought them: joined (what the coordinator sends,
    server/delivery.py), or one Array per packed key (in-process callers); Flower's client-side clipping mod
    requires the reply's keys to be the message's."""
    if received.keys() == packed.keys():
        return ArrayRecord({k: npy_array(v) for k, v in packed.items()})
    return joined_record(packed)


def arrays_of(content: RecordDict) -> ArrayRecord | None:
    """The content's weights (its ARRAYS record), or None; read without `content.array_records` (see drop_arrays)."""
    record = content.get(ARRAYS)
    return record if isinstance(record, ArrayRecord) else None


def drop_arrays(content: RecordDict) -> None:
    """Let a message's weights go now. Each access to a RecordDict's `array_records`, `config_records` or
    `metric_records` builds a new view that refers to itself (its value check is its own bound method) and to
    the RecordDict, so a message whose records were looked at stays alive, weights and all, until Python's next
    cycle collection. Folding one joined reply after another left too few objects behind to make collections
    frequent, and a coordinator held every reply of the round (benchmarks/aggregation.py: peak 12x the model at
    16 sites). Removing the weights from the content frees them whatever views remain, provided none was an
    `array_records` view (hence arrays_of)."""
    if arrays_of(content) is not None:
        del content[ARRAYS]
