"""The task-aware average, folded one reply at a time, and the arrays it reads straight off the wire.

A reply's arrays arrive as .npy bytes (Flower's Array); `array_view` reads them in place where Array.numpy()
would copy (transport/wire.py's `npy_array` writes one with a single copy). `TaskAwareSum` keeps per packed key
the weighted sum of the sites' updates; `task_aware_average` is the same average over a list, in float64, the reference it is
tested against. Loops go chunk by chunk so temporaries stay in cache and never reach a group's size.
"""

from __future__ import annotations

import math
import mmap
from collections import defaultdict
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from m3fm.weights.packing import group_of_packed, split_joined
from transport.wire import npy_array, npy_view

CHUNK = 1 << 16  # values per step of the loops over a group: temporaries stay in cache, never a group's size


def array_view(a: Array) -> np.ndarray:
    """An Array's values as a read-only view into its .npy bytes. Array.numpy() copies them, which for the shared
    trunk (about 80% of the model) would hold most of a reply twice."""
    if a.stype != SType.NUMPY:
        raise TypeError(f"unsupported serialization {a.stype!r}")
    view = npy_view(a.data)
    return a.numpy() if view is None else view


def record_values(record: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A reply's arrays -> packed key -> read-only view, whether they came joined, one vector per dtype
    (transport/wire.py), or one Array per packed key; ValueError saying where they do not fit the global model."""
    if record.keys() != reference.keys():
        if record.keys() & reference.keys():
            missing, unexpected = reference.keys() - record.keys(), record.keys() - reference.keys()
            raise ValueError(f"keys differ from the global model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        return split_joined({k: _view(k, a) for k, a in record.items()},
                            {k: (ref.size, ref.dtype) for k, ref in reference.items()})
    out = {}
    for key, ref in reference.items():
        a = record[key]
        if tuple(a.shape) != ref.shape:
            raise ValueError(f"shape of {key}: expected {ref.shape}, got {tuple(a.shape)}")
        if a.dtype != str(ref.dtype):
            raise ValueError(f"dtype of {key}: expected {ref.dtype}, got {a.dtype}")
        x = out[key] = _view(key, a)
        if x.shape != ref.shape or x.dtype != ref.dtype:  # the bytes say otherwise than the array's own fields
            raise ValueError(f"values of {key}: expected {ref.dtype} {ref.shape}, the data holds {x.dtype} {x.shape}")
    return out


def _view(key: str, a: Array) -> np.ndarray:
    try:
        return array_view(a)
    except (ValueError, TypeError) as e:
        raise ValueError(f"unreadable values of {key}: {e}") from e


def array_record(packed: dict[str, np.ndarray], consume: bool = False) -> ArrayRecord:
    """consume: empty `packed` as it goes, so each array is let go as soon as its bytes are made."""
    record = ArrayRecord()
    for key in list(packed):
        record[key] = npy_array(packed.pop(key) if consume else packed[key])
    return record


def zeros(size: int, dtype) -> np.ndarray:
    """A zeroed vector in its own private anonymous memory map. The kernel zeroes the pages on first touch either
    way, but np.zeros also advises huge pages, and under THP defrag=madvise that first touch compacts memory
    (measured on the benchmark machine: 0.76 s to first touch 0.9 GiB from np.zeros, 0.4 s from this map)."""
    dtype = np.dtype(dtype)
    memory = mmap.mmap(-1, max(1, size * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, dtype, count=size)


def squared_distance(x: np.ndarray, ref: np.ndarray) -> float:
    """||x - ref||^2, chunk by chunk: float32 dot products per chunk (BLAS), summed in float64; a chunk whose
    float32 sum overflows is summed again in float64. nan/inf when x holds a non-finite value."""
    x, ref = x.reshape(-1), ref.reshape(-1)
    scratch = np.empty(min(CHUNK, x.size), np.result_type(x.dtype, np.float32))
    total = 0.0
    for start in range(0, x.size, CHUNK):
        xs, rs = x[start:start + CHUNK], ref[start:start + CHUNK]
        d = scratch[:xs.size]
        np.subtract(xs, rs, out=d)
        part = float(np.dot(d, d))
        if not math.isfinite(part) and np.isfinite(xs).all():
            d64 = xs.astype(np.float64) - rs
            part = float(np.dot(d64, d64))
        total += part
    return total



class TaskAwareSum:
    """The task-aware average of replies folded one at a time. Per packed key it keeps the weighted sum of the
    sites' updates (weights minus the global ones) in the model's float type, plus the total weight and the number
    of sites: summing updates rather than weights keeps float32 exact to its last bit or so (an update is small next
    to the weights), and a float64 sum would double the coordinator's largest buffer. Weights are sample counts for
    the key's group, or 1 (`uniform`: central DP); a site that did not train a group adds nothing to it."""

    def __init__(self, reference: Mapping[str, np.ndarray], uniform: bool = False):
        self.reference, self.uniform = reference, uniform
        self.sums: dict[str, np.ndarray] = {}  # made on a key's first contribution
        self.weights: dict[str, int] = defaultdict(int)
        self.contributors = {key: 0 for key in reference}

    def add(self, arrays: Mapping[str, np.ndarray], counts: Mapping[str, int]) -> None:
        for key, ref in self.reference.items():
            n = counts.get(group_of_packed(key), 0)
            if n <= 0:
                continue
            w = 1 if self.uniform else n
            acc = self.sums.get(key)
            if acc is None:
                acc = self.sums[key] = zeros(ref.size, np.result_type(ref.dtype, np.float32))
            x, r = arrays[key].reshape(-1), ref.reshape(-1)
            scratch = np.empty(min(CHUNK, r.size), acc.dtype)
            for start in range(0, r.size, CHUNK):
                stop = start + CHUNK
                d = scratch[:min(CHUNK, r.size - start)]
                np.subtract(x[start:stop], r[start:stop], out=d)
                if w != 1:
                    d *= w
                acc[start:stop] += d
            self.weights[key] += w
            self.contributors[key] += 1

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """-> the averaged arrays (the running sums, reused in place), and per key the sites that trained it
        (0: the global value, unchanged). The sum cannot take more replies afterwards."""
        out = {}
        for key, ref in self.reference.items():
            acc = self.sums.pop(key, None)
            if acc is None:
                out[key] = ref
                continue
            acc /= self.weights[key]
            acc += ref.reshape(-1)
            out[key] = acc.reshape(ref.shape).astype(ref.dtype, copy=False)
        return out, dict(self.contributors)


def task_aware_average(reference: dict[str, np.ndarray], replies: list[tuple[dict[str, np.ndarray], dict[str, int]]],
                       uniform: bool = False) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The batch form of TaskAwareSum, in float64 over a list: the reference its running sum is tested against.
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
