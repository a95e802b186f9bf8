"""Secure aggregation past 2 GiB: the packed update split into chunks, each summed by its own SecAgg+ instance.

Flower's SecAgg+ sends a site's masked vector as int64 values inside one ConfigRecord, a single object that may
not pass 2 GiB: 268M values, where base has 259M parameters, large 506M and huge 869M (docs/privacy.md). Every
process on the way also holds the whole vector several times over (the quantized copy, one int64 mask per
neighbour, the running sum). So the coordinator runs the protocol once per chunk of at most `chunk_values` values
of the site's flattened update (every packed key's update in packed order, as float32), each chunk a SecAgg+
instance of its own with fresh keys and shares. A site trains once, when chunk 0 comes (the only chunk whose
message carries the global weights), keeps its update on its own disk, and answers the later chunks from it;
the extra memory of every process is then a chunk's worth (times its neighbours), not the model's.

After its values, a chunk carries one "trained it" mark for each packed key it holds a part of, so each chunk is
self-contained: per key part, the unmasked mean of the marks tells how many of the chunk's sites trained it.

Dropouts stay SecAgg+'s business, chunk by chunk: a site lost in chunk c is dropped from chunk c on (the others'
shares remove its masks, as in one instance) and the chunks before c keep its contribution; each chunk is the
mean over the sites that completed it, as if the site had left part-way through the model. No chunk is ever
summed twice over different sets of sites: two sums of one chunk would give away their difference, which can be
one site's update.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# 8 bytes a masked value, one ConfigRecord per message, which must stay under 2 GiB with room for the marks
MAX_CHUNK_VALUES = 2**28 - 2**20


@dataclass(frozen=True)
class Segment:
    """A part of one packed key's vector inside a chunk."""
    key: str
    start: int  # offset of the part in the key's vector
    stop: int
    at: int  # where the part begins in the chunk's values


def chunk_plan(sizes: Sequence[tuple[str, int]], chunk_values: int) -> list[list[Segment]]:
    """(packed key, values) in packed order -> for each chunk, the key parts it holds, in order. Chunk c holds the
    flattened update's values [c * chunk_values, (c + 1) * chunk_values)."""
    if not 0 < chunk_values <= MAX_CHUNK_VALUES:
        raise ValueError(f"chunk_values must be in [1, {MAX_CHUNK_VALUES}] (a chunk's masked int64 values travel "
                         f"as one object under 2 GiB), got {chunk_values}")
    chunks: list[list[Segment]] = []
    current: list[Segment] = []
    filled = 0
    for key, n in sizes:
        start = 0
        while start < n:
            take = min(n - start, chunk_values - filled)
            current.append(Segment(key, start, start + take, filled))
            start, filled = start + take, filled + take
            if filled == chunk_values:
                chunks.append(current)
                current, filled = [], 0
    if current or not chunks:
        chunks.append(current)
    return chunks


class ChunkedUpdate:
    """A site's update for one SecAgg+ round, on the site's disk from chunk 0 to the last: the flattened values
    (a memory-mapped .npy, so no process holds the model-sized update in memory, and any process of the site can
    answer a later chunk: a restarted service, or another Ray actor of a simulation) and a mark per packed key
    (the trained mark, or 0 for a key the site did not train) with the round it belongs to beside it (.json,
    written last: a half-written update is never answered from)."""

    def __init__(self, folder: Path, round_id: tuple, sizes: Sequence[tuple[str, int]], flat: np.ndarray,
                 marks: dict[str, float], chunk_values: int):
        self.folder, self.round_id, self.sizes, self.flat = Path(folder), tuple(round_id), list(sizes), flat
        self.marks, self.chunk_values = marks, chunk_values
        self.plan = chunk_plan(self.sizes, chunk_values)

    @classmethod
    def create(cls, folder: Path, round_id: tuple, sizes: Sequence[tuple[str, int]], chunk_values: int):
        """A zeroed update to fill (values on disk); replaces any earlier round's."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "update.json").unlink(missing_ok=True)
        flat = np.lib.format.open_memmap(folder / "update.npy", mode="w+", dtype=np.float32,
                                         shape=(sum(n for _, n in sizes),))
        return cls(folder, round_id, sizes, flat, {}, chunk_values)

    def save(self) -> None:
        self.flat.flush()
        meta = {"round": list(self.round_id), "sizes": self.sizes, "marks": self.marks,
                "chunk_values": self.chunk_values}
        tmp = self.folder / "update.json.partial"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.folder / "update.json")

    @classmethod
    def load(cls, folder: Path, round_id: tuple) -> "ChunkedUpdate | None":
        """The saved update of that round, or None (none saved, or another round's)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "update.json").read_text())
        except FileNotFoundError:
            return None
        if tuple(meta["round"]) != tuple(round_id):
            return None
        flat = np.load(folder / "update.npy", mmap_mode="r")
        return cls(folder, round_id, [tuple(x) for x in meta["sizes"]], flat, meta["marks"], meta["chunk_values"])

    def discard(self) -> None:
        """After the last chunk: the update leaves the site's disk."""
        (self.folder / "update.json").unlink(missing_ok=True)
        self.flat = None
        (self.folder / "update.npy").unlink(missing_ok=True)

    def chunk(self, c: int) -> list[np.ndarray]:
        """Chunk c as SecAgg+ sends it: [its values, one mark per key part it holds] (copies, off the disk)."""
        if not 0 <= c < len(self.plan):
            raise ValueError(f"chunk {c} asked; this round's update has {len(self.plan)} chunk(s)")
        values = np.array(self.flat[c * self.chunk_values:(c + 1) * self.chunk_values])
        return [values, np.array([self.marks[s.key] for s in self.plan[c]], dtype=np.float32)]


def answer_chunk(folder: Path, round_id: tuple, c: int, make: Callable[[], ChunkedUpdate]) -> list[np.ndarray]:
    """What a site sends for chunk c of a secure round: chunk 0 makes the update (`make`: train and save it in
    `folder`), later chunks read that round's update from `folder`, and the last chunk removes it."""
    if c == 0:
        update = make()
    elif (update := ChunkedUpdate.load(folder, round_id)) is None:
        raise RuntimeError(f"SecAgg+ chunk {c} of round {round_id} asked, but {folder} holds no update of that "
                           "round (chunk 0 failed here?): the site drops out of this round")
    out = update.chunk(c)
    if c == len(update.plan) - 1:
        update.discard()
    return out


def fold_chunk(weights: dict[str, np.ndarray], segments: list[Segment], mean: list[np.ndarray], sites: int,
               mark: float) -> dict[str, int]:
    """Apply one chunk's unmasked mean over its `sites` sites to `weights`, in place: per key part, k of them
    trained it (mean mark = mark * k / sites) and the part moves by mean(update) * sites / k, the uniform
    task-aware average; a part nobody trained stays. -> per key in the chunk, k."""
    values, marks = mean
    trained: dict[str, int] = {}
    for s, m in zip(segments, marks):
        k = int(round(float(m) / mark * sites))
        trained[s.key] = min(k, trained.get(s.key, k))
        if k:
            part = weights[s.key].reshape(-1)[s.start:s.stop]
            part += (values[s.at:s.at + s.stop - s.start].astype(np.float64) * sites / k).astype(part.dtype)
    return trained
