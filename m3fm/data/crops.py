"""Task crops: cut an organ box out of the HU volume and resize it to a model scale, with its true voxel size.

Like the public code, a box smaller than the target is widened symmetrically
to the target's voxel count and a larger one is cut exactly, then resized
trilinearly. Unlike it, the voxel size is recomputed after the resize
(extent in mm / target voxels): the public `crop_resize` passes the original
spacing on, so its voxel-size embedding describes a volume the model never saw.

Regions and the scale each is cut at:
  lung_right, lung_left   one lung (cancer risk), scale 'lung'
  heart                   scale 'heart'
  lungs                   both lungs (other chest findings), scale 'chest'
  slab_right, slab_left   one lung at the nodule scale's in-plane size but every native slice kept,
                          so a dataset can cut the 16-slice slab around a nodule (or anywhere, without one)
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3fm.data.localize import Box
from m3fm.model.configs import M3FMConfig
from m3fm.tasks import HUWindow

AIR_HU = -1024.0
REGION_SCALE = {"lung_right": "lung", "lung_left": "lung", "heart": "heart", "lungs": "chest",
                "slab_right": "nodule", "slab_left": "nodule"}
REGION_BOX = {"lung_right": "lung_right", "lung_left": "lung_left", "heart": "heart", "lungs": "lungs",
              "slab_right": "lung_right", "slab_left": "lung_left"}
MARGIN_MM = 5.0  # around each organ box: the boxes wrap organs, they need not trace them


def widen(box: Box, spacing, target: tuple[int, int, int], margin_mm: float = MARGIN_MM) -> list[tuple[int, int]]:
    """Per axis (start, stop): the box plus a margin, widened symmetrically up to the target's voxel count."""
    out = []
    for a in range(3):
        lo, hi = box[2 * a], box[2 * a + 1]
        m = int(round(margin_mm / spacing[a]))
        lo, hi = lo - m, hi + m
        if target[a] and hi - lo < target[a]:
            extra = target[a] - (hi - lo)
            lo, hi = lo - extra // 2, hi + extra - extra // 2
        out.append((lo, hi))
    return out


def cut(vol: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """vol[ranges], padding with air where the ranges leave the volume (a view of vol when they stay inside)."""
    src = tuple(slice(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(ranges, vol.shape))
    if all(lo >= 0 and hi <= n for (lo, hi), n in zip(ranges, vol.shape)):
        return vol[src]
    out = np.full([hi - lo for lo, hi in ranges], AIR_HU, dtype=np.float32)
    dst = tuple(slice(s.start - lo, s.stop - lo) for s, (lo, _) in zip(src, ranges))
    out[dst] = vol[src]
    return out


class PaddedCut:
    """vol[ranges] padded with air, as `cut` makes it, but handed out one slice (H, W) at a time and never whole.

    A crop widened past the volume's edge (a lung box shorter than the scale's slices, a box at the edge of the
    field of view) used to be materialised: one fresh volume-sized array filled with air, then copied into, 1.0 s
    of the 6 bench series' 9.9 s on one core, nearly all of it first-touch page faults. The resize reads its
    input slice by slice anyway, so each slice is padded in cache when it is read: the same values, so the same
    crop bytes."""

    def __init__(self, vol: np.ndarray, ranges: list[tuple[int, int]]):
        self.vol, self.ranges = vol, ranges
        self.shape = tuple(hi - lo for lo, hi in ranges)
        (_, _), (h0, h1), (w0, w1) = ranges
        self._src = (slice(max(h0, 0), min(h1, vol.shape[1])), slice(max(w0, 0), min(w1, vol.shape[2])))
        self._dst = tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(self._src, (h0, w0)))

    def __getitem__(self, i: int) -> np.ndarray:
        """Slice i (H, W) float32: a new array each time (the resize keeps two at once)."""
        out = np.full(self.shape[1:], AIR_HU, dtype=np.float32)
        k = self.ranges[0][0] + int(i)
        if 0 <= k < self.vol.shape[0]:
            out[self._dst] = self.vol[k][self._src]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = cut(self.vol, self.ranges)
        return whole if dtype is None else whole.astype(dtype)


def padded_cut(vol: np.ndarray, ranges: list[tuple[int, int]]):
    """vol[ranges]: a view of vol where the ranges stay inside it, else a PaddedCut (same values, made per slice)."""
    if all(lo >= 0 and hi <= n for (lo, hi), n in zip(ranges, vol.shape)):
        return cut(vol, ranges)
    return PaddedCut(vol, ranges)


def resize(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resize with voxel centres aligned as torch's interpolate(align_corners=False) does, edges
    extended (scipy's ndimage.zoom(order=1, mode="nearest", grid_mode=True), within float32 rounding): x: (S, H, W)
    -> (shape) float32. The whole volume of `resized_slices`; ingestion streams them to disk instead."""
    out = np.empty(shape, dtype=np.float32)
    for j, s in enumerate(resized_slices(x, shape)):
        out[j] = s
    return out


def resized_slices(x: np.ndarray, shape: tuple[int, int, int]):
    """Yield the resized volume one output slice (H', W') float32 at a time.

    Trilinear is linear along each axis in turn, so it runs as three 1D passes (an axis that keeps its size is
    skipped), the shrinking ones first so the later passes touch fewer voxels. The passes run slice by slice: the
    in-plane passes before the S pass on each input slice it reads (each once: the S pass reads its inputs in
    order), the S pass as a blend of two such slices, the in-plane passes after it on each output slice. Each
    voxel sees the same float32 operations as three whole-volume passes, so the output is bit-identical to them,
    but the work stays in cache and nothing volume-sized is allocated. numpy rather than torch: ingestion runs in
    worker processes, where a forked OpenMP pool can hang.
    """
    order = [int(a) for a in np.argsort([t / s for t, s in zip(shape, x.shape)], kind="stable")]
    before, after = order[:order.index(0)], order[order.index(0) + 1:]

    def in_plane(s: np.ndarray, axes: list[int]) -> np.ndarray:
        for a in axes:
            s = _linear_axis(s, shape[a], a - 1)
        return s

    if x.shape[0] == shape[0]:
        for i in range(shape[0]):
            yield in_plane(np.asarray(x[i], dtype=np.float32), before + after)
        return
    i0, i1, w = _linear_weights(x.shape[0], shape[0])
    ready: dict[int, np.ndarray] = {}  # input slices through the passes before S, while the S pass needs them
    for j in range(shape[0]):
        a, b = int(i0[j]), int(i1[j])
        for i in [i for i in ready if i < a]:
            del ready[i]
        for i in (a, b):
            if i not in ready:
                ready[i] = in_plane(np.asarray(x[i], dtype=np.float32), before)
        out = ready[b] - ready[a]
        out *= w[j]
        out += ready[a]
        yield in_plane(out, after)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output voxel centre: the two nearest input voxels and the weight of the second (float32)."""
    pos = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)


def _linear_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """x resized to n_out along one axis, linear between the two nearest input voxel centres."""
    if x.shape[axis] == n_out:
        return x
    i0, i1, w = _linear_weights(x.shape[axis], n_out)
    w = w.reshape([n_out if a == axis else 1 for a in range(x.ndim)])
    out = np.take(x, i0, axis=axis)
    step = np.take(x, i1, axis=axis)
    step -= out
    step *= w
    out += step
    return out


@dataclass(frozen=True)
class CropPlan:
    """One region's crop before it is computed: the cut of the volume (a view where it stays inside) and the
    shape it is resized to, with the voxel size that results and the index of its first slice in the volume."""

    region: str
    scale: str
    source: np.ndarray | PaddedCut  # (S, H, W) HU
    shape: tuple[int, int, int]
    voxel_size: np.ndarray  # (3,) mm
    first_slice: int


def crop_plan(vol: np.ndarray, spacing, box: Box, target: tuple[int, int, int], region: str = "", scale: str = "") -> CropPlan:
    """x: (S, H, W) HU -> the plan of a crop of `target` voxels (a target of 0 slices keeps every native slice)."""
    ranges = widen(box, spacing, target)
    source = padded_cut(vol, ranges)
    shape = (target[0] or source.shape[0], target[1], target[2])
    extent = np.array([hi - lo for lo, hi in ranges], dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    return CropPlan(region, scale, source, shape, (extent / np.asarray(shape)).astype(np.float32), ranges[0][0])


def crop_resize(vol: np.ndarray, spacing, box: Box, target: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """x: (S, H, W) HU -> (crop (target), voxel_size (3,) mm of the crop's voxels)."""
    p = crop_plan(vol, spacing, box, target)
    return resize(p.source, p.shape), p.voxel_size


def slab_stack(vol: np.ndarray, spacing, box: Box, in_plane: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """One lung at native slice spacing, resized in-plane: (N, H, W), voxel size, index of its first slice."""
    p = crop_plan(vol, spacing, box, (0, *in_plane))
    return resize(p.source, p.shape), p.voxel_size, p.first_slice


def crop_plans(vol: np.ndarray, spacing, boxes: dict[str, Box], cfg: M3FMConfig):
    """Yield the CropPlan of every region the configuration has a scale for."""
    for region, scale_name in REGION_SCALE.items():
        volume = cfg.scale(scale_name).volume
        target = (0, *volume[1:]) if region.startswith("slab_") else tuple(volume)
        yield crop_plan(vol, spacing, boxes[REGION_BOX[region]], target, region, scale_name)


def region_crops(vol: np.ndarray, spacing, boxes: dict[str, Box], cfg: M3FMConfig):
    """Yield (region, scale, array, voxel_size, first_slice) for every region the configuration has a scale for."""
    for p in crop_plans(vol, spacing, boxes, cfg):
        yield p.region, p.scale, resize(p.source, p.shape), p.voxel_size, p.first_slice


def write_crop(path: Path, plan: CropPlan, torch_cast: bool = False) -> None:
    """The plan's crop as a float16 .npy (read back as a memory map), resized and written slice by slice: each
    slice clipped and narrowed in cache, no volume-sized buffer. Written to a temporary name, then renamed: a crash
    never leaves half a crop behind. No fsync: forcing every crop to disk serialises the workers on I/O.
    torch_cast narrows through torch (HalfCast): the same bytes, faster, once torch is imported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f2", "fortran_order": False, "shape": plan.shape})
    half = np.empty(plan.shape[1:], dtype="<f2")
    narrow = (HalfCast if torch_cast else HalfBits)(half)
    with DirectFile(tmp) as f:
        f.write(head.getvalue())
        for s in resized_slices(plan.source, plan.shape):
            narrow(s)
            f.write(half.data)
    tmp.replace(path)


# A worker imports torch (about 2 s and 200 MB here) only when it has this many series or more to crop: the cast
# then saves more than the import costs (0.24 s of a base series' 0.43 s of cropping went to numpy's float16 cast).
TORCH_CAST_MIN_SERIES = 8


class HalfBits:
    """Clip a float32 slice to [-2048, 4095] (beyond float16's exact integers is metal) and narrow it into `half`
    (float16) by integer arithmetic on its bits: the bits numpy's cast gives, 2.4x faster.

    numpy's float32 -> float16 cast is a scalar loop here (its x86 baseline has no F16C): 0.58 ms a 448 x 320
    slice, most of a series' cropping without torch. Rounding to nearest even on the bits is a few whole-array
    integer passes: add 0xFFF plus the lowest kept mantissa bit, drop 13 bits, rebias the exponent (a carry out
    of the mantissa lands in the exponent, as it should). That covers float16's normal numbers, which is all but
    |x| < 2^-14 after the clip; those (zeros, and the rare tiny value a resize leaves) are float16 subnormals,
    whose bits are |x| * 2^24 rounded half to even (the scaling is exact). The input is finite: HU always is.
    tests/test_ingest_speed.py checks it against numpy's cast on every 997th float32 in the clip range (and on
    every 7th once, by hand: no difference)."""

    SUBNORMAL = 0x38800000  # |x| below 2^-14, as float32 bits
    ROUND_AND_REBIAS = np.uint32((0xFFF - ((127 - 15) << 23)) % 2**32)

    def __init__(self, half: np.ndarray):
        self.half = half.view(np.uint16)
        self.clipped = np.empty(half.shape, dtype=np.float32)
        self.magnitude, self.out = np.empty(half.shape, dtype=np.uint32), np.empty(half.shape, dtype=np.uint32)

    def __call__(self, s: np.ndarray) -> None:
        bits, mag, out = self.clipped.view(np.uint32), self.magnitude, self.out
        np.clip(s, -2048, 4095, out=self.clipped)
        np.bitwise_and(bits, 0x7FFFFFFF, out=mag)
        np.right_shift(mag, 13, out=out)
        np.bitwise_and(out, 1, out=out)  # the lowest mantissa bit kept: a tie rounds to even
        np.add(out, mag, out=out)
        np.add(out, self.ROUND_AND_REBIAS, out=out)
        np.right_shift(out, 13, out=out)
        if mag.min() < self.SUBNORMAL:
            tiny = mag < self.SUBNORMAL
            out[tiny] = np.rint(np.abs(self.clipped[tiny]) * np.float32(2**24))
        np.right_shift(bits, 16, out=mag)
        np.bitwise_and(mag, 0x8000, out=mag)  # the sign
        np.bitwise_or(out, mag, out=out)
        np.copyto(self.half, out, casting="unsafe")  # the low 16 bits


class HalfCast:
    """Clip a float32 slice to [-2048, 4095] and narrow it into `half` (float16) through torch, whose cast uses the
    CPU's F16C instructions: 9x numpy's on a base slice here, and the same IEEE round-to-nearest-even, so the same
    bits (tests/test_ingest_speed.py). It leaves torch's thread count alone (an ingestion worker sets 1)."""

    def __init__(self, half: np.ndarray):
        import torch  # here, not at the top: spawned ingestion workers do without it for short runs

        self.torch, self.half = torch, torch.from_numpy(half)
        self.clipped = torch.empty(half.shape, dtype=torch.float32)

    def __call__(self, s: np.ndarray) -> None:
        self.torch.clamp(self.torch.from_numpy(s), -2048, 4095, out=self.clipped)
        self.half.copy_(self.clipped)


class DirectFile:
    """A new file written past the page cache (O_DIRECT) in aligned chunks, where the OS and file system allow it.

    A base-size series' crops are ~230 MB. Through the page cache every byte lands in fresh kernel memory first,
    and on a VM that is the cost: 292 MB/s buffered with fdatasync against 1.4 GB/s direct (dd, this machine), and
    ~0.3 s of a worker's CPU a series. Where O_DIRECT is missing or refused (macOS, tmpfs) it writes as usual.
    Chunks go out from one background thread while the next one fills (two buffers, one write in flight), so the
    resize goes on while the disk takes the last chunk; the buffers are the process's, reused file after file.
    """

    ALIGN = 4096
    CHUNK = 8 << 20  # bytes a direct write carries
    _buffers: list[np.ndarray] = []
    _writer: ThreadPoolExecutor | None = None

    def __init__(self, path: Path):
        cls = type(self)
        if len(cls._buffers) != 2 or cls._buffers[0].size != self.CHUNK:
            cls._buffers = [self._aligned(self.CHUNK) for _ in range(2)]
        if cls._writer is None:
            cls._writer = ThreadPoolExecutor(1, thread_name_prefix="crop-writer")
        self.path, self.size, self.used, self.turn, self.pending = path, 0, 0, 0, None
        self.buf = cls._buffers[0]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o644), True
        except (AttributeError, OSError):
            self.fd, self.direct = os.open(path, flags, 0o644), False

    @classmethod
    def _aligned(cls, n: int) -> np.ndarray:
        raw = np.empty(n + cls.ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % cls.ALIGN
        return raw[start:start + n]

    def write(self, data) -> None:
        data = np.frombuffer(data, dtype=np.uint8)
        while len(data):
            n = min(len(data), self.CHUNK - self.used)
            self.buf[self.used:self.used + n] = data[:n]
            self.used, data = self.used + n, data[n:]
            if self.used == self.CHUNK:
                self._flush(self.CHUNK)

    def _flush(self, length: int) -> None:
        """Hand the filled buffer to the writer thread (after the write before it is done) and fill the other."""
        self._wait()
        self.pending = self._writer.submit(self._write, memoryview(self.buf[:length]))
        self.size += self.used
        self.used, self.turn = 0, 1 - self.turn
        self.buf = self._buffers[self.turn]

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed write raises here

    def _write(self, view: memoryview) -> None:
        try:
            written = os.write(self.fd, view)
        except OSError:
            if not self.direct:
                raise
            # the file system took the open but not the write: go on through the page cache from here
            offset = os.lseek(self.fd, 0, os.SEEK_CUR)
            os.close(self.fd)
            self.fd, self.direct = os.open(self.path, os.O_WRONLY), False
            os.lseek(self.fd, offset, os.SEEK_SET)
            written = os.write(self.fd, view)
        while written < len(view):  # a short write (buffered only: direct writes of whole blocks are not split)
            written += os.write(self.fd, view[written:])

    def close(self) -> None:
        try:
            if self.used:
                size = self.size + self.used
                self._wait()  # self.direct is settled once no write is in flight
                # a direct write carries whole blocks: pad the tail with zeros, then cut the file to its size
                padded = -(-self.used // self.ALIGN) * self.ALIGN if self.direct else self.used
                self.buf[self.used:padded] = 0
                self.used = padded
                self._flush(padded)
                self._wait()
                os.ftruncate(self.fd, size)
            self._wait()
        finally:
            if self.pending is not None:
                self.pending.exception()  # an error is already on its way out; let the write end first
            os.close(self.fd)

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_memmap(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def normalize_hu(x: np.ndarray, window: HUWindow) -> np.ndarray:
    """Clip HU to the task's window and scale it: lo..hi onto -1..1 (public code), or for a "below" window hi..lo
    onto 0..1 (what lies at or above hi is 0)."""
    lo, hi, encoding = window
    clipped = np.clip(np.asarray(x, dtype=np.float32), lo, hi)
    if encoding == "below":
        return ((hi - clipped) / (hi - lo)).astype(np.float32)
    if encoding != "signed":
        raise ValueError(f"HU window {tuple(window)}: unknown encoding {encoding!r} (signed or below)")
    return ((clipped - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)
