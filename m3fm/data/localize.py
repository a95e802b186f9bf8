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
from scipy.spatial import ConvexHull, Delaunay

Box = tuple[int, int, int, int, int, int]


class LocalizationError(ValueError):
    pass


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: largest connected region above -500 HU (drops the table), holes filled slice by slice."""
    body = _largest(hu > -500)
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def lung_masks(hu: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, left, body) masks. Lungs: air inside the body, airways cut away, split at the midline."""
    body = body_mask(hu)
    air = (hu < -400) & body
    pixel_area = spacing[1] * spacing[2]
    # the trachea and oesophageal air are small in every axial slice; lungs are not (apices excepted, briefly)
    small = np.zeros_like(air)
    for k in range(air.shape[0]):
        labels, n = ndimage.label(air[k])
        if n:
            sizes = ndimage.sum(air[k], labels, range(1, n + 1)) * pixel_area
            small[k] = np.isin(labels, 1 + np.flatnonzero(sizes < 400.0))  # < 4 cm^2
    air &= ~small
    labels, n = ndimage.label(air)
    if n == 0:
        raise LocalizationError("no air inside the body: not a chest CT, or not in Hounsfield units")
    sizes = ndimage.sum(air, labels, range(1, n + 1))
    lungs = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))  # drops bowel gas and the like
    lungs = np.stack([ndimage.binary_fill_holes(s) for s in lungs])  # vessels and nodules belong to the lung
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
    """Filled convex hull of a 2D mask (the region the lungs wrap around in one axial slice)."""
    pts = np.argwhere(mask2d)
    if len(pts) < 4 or np.linalg.matrix_rank(pts - pts.mean(0)) < 2:
        return mask2d.copy()
    hull = Delaunay(pts[ConvexHull(pts).vertices])
    grid = np.indices(mask2d.shape).reshape(2, -1).T
    return (hull.find_simplex(grid) >= 0).reshape(mask2d.shape)


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
    bone = hu > 250
    tissue = (hu > -150) & (hu < 250) & body & region & ~lungs & ~ndimage.binary_dilation(bone, iterations=2)
    # drop the spine and what lies behind its front edge (aorta, oesophagus). The vertebral bodies are the
    # bulk of the bone in the middle columns; coronary calcifications are specks and must not count
    w = hu.shape[2]
    per_row = (bone & region)[:, :, int(0.4 * w):int(0.6 * w)].sum(axis=(0, 2))
    if per_row.max() > 0:
        rows = np.flatnonzero(per_row >= 0.3 * per_row.max())
        back_half = rows[rows >= np.flatnonzero(body.any(axis=(0, 2))).mean()]
        if len(back_half):
            tissue[:, int(back_half[0]):, :] = False
    # peel away thin connections (vessels, pleural rims), then keep the biggest blob
    r = max(1, int(round(6.0 / spacing[1])))
    tissue = ndimage.binary_opening(tissue, structure=np.ones((1, 2 * r + 1, 2 * r + 1)))
    if not tissue.any():
        raise LocalizationError("no soft tissue between the lungs")
    return _largest(tissue)


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
