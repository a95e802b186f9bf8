"""Reading a site's DICOM back and two classical image features, to check the cohort carries signal.

Test helpers only: the model never sees these features.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage


def read_series(site_dir: Path) -> dict[str, list[pydicom.Dataset]]:
    """All instances under dicom/, grouped by SeriesInstanceUID and sorted along z."""
    series = defaultdict(list)
    for path in sorted((site_dir / "dicom").rglob("*")):
        if path.is_file():
            ds = pydicom.dcmread(path)
            series[ds.SeriesInstanceUID].append(ds)
    for uid in series:
        series[uid].sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dict(series)


def hu_volume(instances: list[pydicom.Dataset]) -> np.ndarray:
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in instances]).astype(np.float32)


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Air inside the body, holes (vessels, nodules) filled slice by slice; outside air and airways removed."""
    body = ndimage.binary_fill_holes(hu > -400, structure=np.ones((1, 3, 3)))
    air = (hu < -400) & body
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    sizes = ndimage.sum(air, labels, range(1, n + 1))
    keep = np.isin(labels, 1 + np.argsort(sizes)[-2:])  # the two lungs
    return np.stack([ndimage.binary_fill_holes(s) for s in keep])


def emphysema_index(hu: np.ndarray) -> float:
    """LAA-950: fraction of lung voxels below -950 HU, the standard quantitative emphysema index."""
    lungs = ndimage.binary_erosion(lung_mask(hu), iterations=1)
    return float((hu[lungs] < -950).mean())


def nodule_score(hu: np.ndarray, spacing: tuple[float, float, float], scales_mm=(2.0, 3.5, 6.0)) -> float:
    """Strongest blob in the lungs by the Hessian dot-enhancement filter of classical lung CAD.

    At scale s the scale-normalised Hessian of a bright blob has three negative eigenvalues of similar
    size, a vessel two (the third ~0) and the pleura one, so lambda_3^2 / |lambda_1| (eigenvalues sorted
    by magnitude, all negative) answers to nodules and little to vessels and walls.
    """
    lungs = ndimage.binary_erosion(lung_mask(hu), iterations=1)
    if not lungs.any():
        return 0.0
    # work inside the lungs' bounding box, with room for the widest filter
    pad = [int(np.ceil(3 * max(scales_mm) / d)) for d in spacing]
    box = tuple(slice(max(s.start - p, 0), s.stop + p) for s, p in zip(ndimage.find_objects(lungs.astype(int))[0], pad))
    img, lungs = np.clip(hu[box], -1000, 200).astype(np.float32), lungs[box]
    best = 0.0
    for s in scales_mm:
        sigma = [s / d for d in spacing]
        h = np.empty((int(lungs.sum()), 3, 3), dtype=np.float32)
        for a in range(3):
            for b in range(a, 3):
                order = [0, 0, 0]
                order[a] += 1
                order[b] += 1
                d = ndimage.gaussian_filter(img, sigma, order=order)[lungs] * s * s / (spacing[a] * spacing[b])
                h[:, a, b] = h[:, b, a] = d
        ev = np.linalg.eigvalsh(h)  # ascending: most negative first
        l1, l3 = ev[:, 0], ev[:, 2]
        dot = np.where(l3 < 0, l3 ** 2 / np.maximum(-l1, 1e-6), 0.0)
        best = max(best, float(dot.max()))
    return best
