"""Find the lungs (left, right) and the heart in a chest CT with classical image processing.

No segmentation model is downloaded. As the paper says, the boxes only need
to wrap the organs, not to trace them: lungs are the large air regions inside
the body; the heart is the soft tissue between the lungs, above the
diaphragm and in front of the spine. Work is done on a copy downsampled to
about 3 mm in-plane, and boxes are mapped back to the full volume.

Boxes are voxel index ranges [s0, s1, h0, h1, w0, w1) of the canonical
volume (S toward the head, H toward the back, W toward the patient's left).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

Box = tuple[int, int, int, int, int, int]


class LocalizationError(ValueError):
    pass


# 4-connected within an axial slice and never across slices: one ndimage call labels (or fills) every slice as
# the 2D call would slice by slice, without a Python loop over slices
IN_PLANE = np.stack([np.zeros((3, 3), bool), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3), bool)])


def _label_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels per label 1..n (index 0 holds the background's count)."""
    return np.bincount(labels.ravel(), minlength=n + 1)


def _keep(labels: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """labels in ids, through a lookup table (np.isin sorts the whole volume)."""
    table = np.zeros(n + 1, dtype=bool)
    table[ids] = True
    return table[labels]


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    return labels == 1 + int(np.argmax(_label_sizes(labels, n)[1:]))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Each axial slice's holes filled, as ndimage.binary_fill_holes does one 2D slice at a time: background not
    4-connected to the slice's edge is a hole."""
    labels, n = ndimage.label(~mask, structure=IN_PLANE)
    edge = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.zeros(n + 1, dtype=bool)
    outside[edge] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[labels]


def small_in_plane(mask: np.ndarray, pixel_area: float, max_area: float) -> np.ndarray:
    """The regions of each axial slice (4-connected) whose area is under max_area (pixel_area a pixel)."""
    labels, n = ndimage.label(mask, structure=IN_PLANE)
    return _keep(labels, 1 + np.flatnonzero(_label_sizes(labels, n)[1:] * pixel_area < max_area), n)


def open_in_plane(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary opening of each axial slice by the (2r+1) x (2r+1) square, as a row then a column segment: the same
    result as the square's, with 2(2r+1) tests a voxel instead of (2r+1)^2."""
    along_h, along_w = np.ones((1, 2 * r + 1, 1), dtype=bool), np.ones((1, 1, 2 * r + 1), dtype=bool)
    mask = ndimage.binary_erosion(ndimage.binary_erosion(mask, along_h), along_w)
    return ndimage.binary_dilation(ndimage.binary_dilation(mask, along_h), along_w)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: largest connected region above -500 HU (drops the table), holes filled slice by slice."""
    return fill_holes_per_slice(_largest(hu > -500))


def lung_masks(hu: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, left, body) masks. Lungs: air inside the body, airways cut away, split at the midline."""
    body = body_mask(hu)
    air = (hu < -400) & body
    pixel_area = spacing[1] * spacing[2]
    # the trachea and oesophageal air are small in every axial slice; lungs are not (apices excepted, briefly)
    air &= ~small_in_plane(air, pixel_area, 400.0)  # < 4 cm^2
    labels, n = ndimage.label(air)
    if n == 0:
        raise LocalizationError("no air inside the body: not a chest CT, or not in Hounsfield units")
    sizes = _label_sizes(labels, n)[1:]
    lungs = _keep(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()), n)  # drops bowel gas and the like
    lungs = fill_holes_per_slice(lungs)  # vessels and nodules belong to the lung
    # the mid-sagittal plane: centre of the body's extent in W, over the lung slices
    cols = np.flatnonzero(body[lungs.any(axis=(1, 2))].any(axis=(0, 1)))
    mid = (cols[0] + cols[-1] + 1) / 2
    w = np.arange(hu.shape[2])[None, None, :]
    return lungs & (w < mid), lungs & (w >= mid), body


def _box(mask: np.ndarray, min_fraction: float = 0.02, trim: float = 0.0) -> Box:
    """Bounding box of a mask, ignoring slices whose area is a sliver of the largest (airway stubs, noise).

    trim > 0 drops that fraction of voxels at each end of H and W, so a small appendage (a pleural
    consolidation touching the mediastinum) does not stretch the box.
    """
    area = mask.sum(axis=(1, 2))
    if area.max() == 0:
        raise LocalizationError("empty region")
    keep = np.flatnonzero(area >= min_fraction * area.max())
    s0, s1 = int(keep[0]), int(keep[-1]) + 1
    _, h, w = np.nonzero(mask[s0:s1])
    q = (100 * trim, 100 * (1 - trim))
    (h0, h1), (w0, w1) = np.percentile(h, q), np.percentile(w, q)
    return s0, s1, int(np.floor(h0)), int(np.ceil(h1)) + 1, int(np.floor(w0)), int(np.ceil(w1)) + 1


def _hull(mask2d: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2D mask (the region the lungs wrap around in one axial slice), boundary included.

    A pixel is inside when it lies on the inner side of every hull edge, tested in exact integer arithmetic over
    the hull's bounding box only (what Delaunay(hull).find_simplex(grid) >= 0 gives, without the triangulation)."""
    pts = np.argwhere(mask2d)
    if len(pts) < 4 or np.linalg.matrix_rank(pts - pts.mean(0)) < 2:
        return mask2d.copy()
    v = pts[ConvexHull(pts).vertices].astype(np.int64)  # counterclockwise in 2D
    (r0, c0), (r1, c1) = v.min(0), v.max(0) + 1
    a, d = v[:, :, None, None], (np.roll(v, -1, axis=0) - v)[:, :, None, None]  # edges a -> a + d: (E, 2, 1, 1)
    r, c = np.arange(r0, r1)[None, :, None], np.arange(c0, c1)[None, None, :]
    out = np.zeros_like(mask2d, dtype=bool)
    out[r0:r1, c0:c1] = (d[:, 0] * (c - a[:, 1]) - d[:, 1] * (r - a[:, 0]) >= 0).all(axis=0)
    return out


def heart_mask(hu: np.ndarray, right: np.ndarray, left: np.ndarray, body: np.ndarray, spacing) -> np.ndarray:
    """Soft tissue inside the lungs' convex hull, above the diaphragm, below the upper third, in front of the spine."""
    lungs = right | left
    rs, ls = _box(right), _box(left)
    s0, s1 = min(rs[0], ls[0]), max(rs[1], ls[1])
    top = s0 + int(0.65 * (s1 - s0))  # the heart sits in the lower two thirds of the lung height
    area = lungs.sum(axis=(1, 2))
    region = np.zeros_like(lungs)
    for k in range(s0, top):
        # below this the slice cuts the diaphragm's domes, whose tissue the thin lung bases wrap around
        if right[k].any() and left[k].any() and area[k] >= 0.35 * area.max():
            region[k] = _hull(lungs[k])
    # the region is empty outside slices s0..top: the rest of the work stays inside them (the bone's dilation by
    # two 6-connected steps reads two slices further on each side)
    z, lo, hi = slice(s0, top), max(s0 - 2, 0), min(top + 2, hu.shape[0])
    bone = hu[z] > 250
    near_bone = ndimage.binary_dilation(hu[lo:hi] > 250, iterations=2)[s0 - lo:top - lo]
    tissue = (hu[z] > -150) & (hu[z] < 250) & body[z] & region[z] & ~lungs[z] & ~near_bone
    # drop the spine and what lies behind its front edge (aorta, oesophagus). The vertebral bodies are the
    # bulk of the bone in the middle columns; coronary calcifications are specks and must not count
    w = hu.shape[2]
    per_row = (bone & region[z])[:, :, int(0.4 * w):int(0.6 * w)].sum(axis=(0, 2))
    if per_row.max(initial=0) > 0:
        rows = np.flatnonzero(per_row >= 0.3 * per_row.max())
        back_half = rows[rows >= np.flatnonzero(body.any(axis=(0, 2))).mean()]
        if len(back_half):
            tissue[:, int(back_half[0]):, :] = False
    # peel away thin connections (vessels, pleural rims), then keep the biggest blob
    tissue = open_in_plane(tissue, max(1, int(round(6.0 / spacing[1]))))
    if not tissue.any():
        raise LocalizationError("no soft tissue between the lungs")
    heart = np.zeros_like(lungs)
    heart[z] = _largest(tissue)
    return heart


def locate(hu: np.ndarray, spacing, target_mm: float = 3.0) -> dict[str, Box]:
    """Boxes for 'lung_right', 'lung_left', 'lungs' and 'heart' in the full volume's voxel indices."""
    f = max(1, int(round(target_mm / min(spacing[1], spacing[2]))))
    small = hu[:, ::f, ::f]
    sp = (spacing[0], spacing[1] * f, spacing[2] * f)
    right, left, body = lung_masks(small, sp)
    for name, m in (("right", right), ("left", left)):
        if m.sum() * np.prod(sp) < 100_000:  # 100 ml: far less than any lung
            raise LocalizationError(f"{name} lung not found (air volume {m.sum() * np.prod(sp) / 1000:.0f} ml)")
    heart = heart_mask(small, right, left, body, sp)
    boxes = {"lung_right": _box(right), "lung_left": _box(left), "lungs": _box(right | left),
             "heart": _box(heart, min_fraction=0.2, trim=0.01)}
    S, H, W = hu.shape
    return {k: (b[0], b[1], b[2] * f, min(b[3] * f, H), b[4] * f, min(b[5] * f, W)) for k, b in boxes.items()}
