"""A chest CT phantom in Hounsfield units, drawn in patient coordinates (DICOM LPS, mm).

Array axes are (z, y, x): z grows toward the head, y toward the patient's back,
x toward the patient's left, so row/column/slice map straight onto
ImagePositionPatient with orientation [1,0,0, 0,1,0]. Anatomy: body with
subcutaneous fat, muscle, left/right lungs with lobes (oblique and horizontal
fissures) and vessels, trachea and main bronchi, mediastinum, heart with
pericardial fat, aorta, spine, ribs and sternum. Findings are drawn into it;
small objects get partial-volume edges so they survive coarse voxels. The
reconstruction kernel blurs and quantum noise is added last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sim.cohort.patients import ExamFindings, Patient

AIR, FAT, SOFT, LUNG, BLOOD, BONE, CORTEX = -1000.0, -100.0, 40.0, -860.0, 45.0, 250.0, 700.0


@dataclass
class Grid:
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    z: np.ndarray  # slice positions, ascending
    y: np.ndarray  # row positions
    x: np.ndarray  # column positions

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.z), len(self.y), len(self.x)

    def box(self, center, half) -> tuple[slice, slice, slice]:
        """Index ranges covering center +- half (mm) on each axis, clipped to the grid."""
        out = []
        for axis, c, h in zip((self.z, self.y, self.x), center, half):
            lo, hi = np.searchsorted(axis, c - h), np.searchsorted(axis, c + h, side="right")
            out.append(slice(int(lo), int(max(lo, hi))))
        return tuple(out)

    def coords(self, sl):
        return self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :]


@dataclass
class Body:
    """Patient-specific anatomy sizes (mm)."""

    half_width: float
    half_depth: float
    fat: float
    lung_height: float
    z_base: float

    @property
    def inner_w(self) -> float:
        return self.half_width - self.fat - 14

    @property
    def inner_d(self) -> float:
        return self.half_depth - self.fat - 14


def body_for(p: Patient) -> Body:
    bmi = p.weight_true * 703.0 / p.height_true ** 2
    half_width = float(np.clip(150 + 4.0 * (bmi - 27), 125, 210))
    lung_height = float(np.clip(235 + 4.0 * (p.height_true - 67), 200, 280))
    return Body(half_width, 0.72 * half_width, float(np.clip(8 + 1.6 * (bmi - 20), 5, 40)), lung_height,
                -lung_height / 2)


def make_grid(body: Body, matrix: int, pixel: float, thickness: float) -> Grid:
    length = body.lung_height + 50
    nz = int(math.ceil(length / thickness))
    z = body.z_base - 28 + thickness * np.arange(nz)
    xy = pixel * (np.arange(matrix) - (matrix - 1) / 2)
    return Grid((thickness, pixel, pixel), z.astype(np.float64), xy.copy(), xy.copy())


def soft_step(distance: np.ndarray, width: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a partial-volume ramp of the given width (mm)."""
    return np.clip(0.5 - distance / max(width, 1e-3), 0.0, 1.0)


def rim(mask: np.ndarray, voxels: int) -> np.ndarray:
    """The outer shell of a mask, `voxels` thick: where findings that reach the pleura sit."""
    return mask & ~ndimage.binary_erosion(mask, iterations=voxels)


def paint(vol: np.ndarray, grid: Grid, center, radii, value: float, width: float | None = None,
          within: np.ndarray | None = None) -> None:
    """Blend `value` into an ellipsoid; `within` restricts it to a mask (e.g. the lungs)."""
    width = width if width is not None else 0.7 * min(grid.spacing)
    sl = grid.box(center, [r + 2 * width for r in radii])
    Z, Y, X = grid.coords(sl)
    r = np.sqrt(((Z - center[0]) / radii[0]) ** 2 + ((Y - center[1]) / radii[1]) ** 2 + ((X - center[2]) / radii[2]) ** 2)
    w = soft_step((r - 1.0) * min(radii), width)
    if within is not None:
        w = w * within[sl]
    vol[sl] = vol[sl] * (1 - w) + value * w


def paint_tube(vol: np.ndarray, grid: Grid, p0, p1, radius: float, value: float, within: np.ndarray | None = None,
               width: float | None = None) -> None:
    """Blend `value` into a capsule from p0 to p1 (mm, z/y/x)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    width = width if width is not None else 0.7 * min(grid.spacing)
    lo, hi = np.minimum(p0, p1), np.maximum(p0, p1)
    sl = grid.box((lo + hi) / 2, (hi - lo) / 2 + radius + 2 * width)
    Z, Y, X = grid.coords(sl)
    d = p1 - p0
    t = np.clip(((Z - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (X - p0[2]) * d[2]) / max(d @ d, 1e-9), 0, 1)
    dist = np.sqrt((Z - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (X - p0[2] - t * d[2]) ** 2)
    w = soft_step(dist - radius, width)
    if within is not None:
        w = w * within[sl]
    vol[sl] = vol[sl] * (1 - w) + value * w


class Chest:
    """Anatomy masks of one patient on one grid, and the HU volume drawn from them."""

    def __init__(self, p: Patient, grid: Grid, rng: np.random.Generator):
        self.p, self.grid, self.rng, self.body = p, grid, rng, body_for(p)
        b = self.body
        Z, Y, X = grid.z[:, None, None], grid.y[None, :, None], grid.x[None, None, :]
        self.zn = (Z - (b.z_base + b.lung_height / 2)) / (b.lung_height / 2)  # -1 at the lung base, +1 apex
        body2d = (X / b.half_width) ** 2 + (Y / b.half_depth) ** 2 <= 1
        inner2d = (X / (b.half_width - b.fat)) ** 2 + (Y / (b.half_depth - b.fat)) ** 2 <= 1
        self.vol = np.where(inner2d, SOFT, np.where(body2d, FAT, AIR)).astype(np.float32)
        self.vol = np.broadcast_to(self.vol, grid.shape).copy()
        self.heart_center = (b.z_base + 0.27 * b.lung_height, -0.3 * b.inner_d, 0.16 * b.inner_w)
        scale = 1.22 if p.cardiomegaly else 1.0
        self.heart_radii = (52 * scale, 44 * scale, 58 * scale)
        self.lungs = {side: self._lung(side, Z, Y, X) for side in ("right", "left")}
        self.lung = self.lungs["right"] | self.lungs["left"]
        self.lobes = self._lobes(Y, Z)

    def _lung(self, side: str, Z, Y, X) -> np.ndarray:
        b = self.body
        sign = -1 if side == "right" else 1  # patient right is -x in LPS
        xc, yc = sign * 0.5 * b.inner_w, 0.08 * b.inner_d
        ax, ay = 0.44 * b.inner_w, 0.86 * b.inner_d
        taper = np.sqrt(np.clip(1 - np.clip(self.zn, 0, None) ** 2.2, 0, 1))  # narrows toward the apex
        r2 = ((X - xc) / ax) ** 2 + ((Y - yc) / ay) ** 2
        inside = r2 <= taper ** 2
        dome = (32 if side == "right" else 24) * (1 - np.clip(r2, 0, 1))  # diaphragm, higher on the liver side
        inside &= (Z >= b.z_base + dome) & (self.zn <= 1.0)
        hc, hr = self.heart_center, self.heart_radii
        heart = (((Z - hc[0]) / (hr[0] + 6)) ** 2 + ((Y - hc[1]) / (hr[1] + 6)) ** 2 + ((X - hc[2]) / (hr[2] + 6)) ** 2) <= 1
        return inside & ~heart & (np.abs(X) > 14)

    def _lobes(self, Y, Z) -> dict[str, np.ndarray]:
        b = self.body
        zb, h = b.z_base, b.lung_height
        oblique = Z < zb + 0.42 * h + 0.5 * (Y - 0.08 * b.inner_d)  # below the oblique fissure: lower lobe
        right, left = self.lungs["right"], self.lungs["left"]
        horizontal = Z < zb + 0.58 * h
        return {
            "Right lower lobe": right & oblique,
            "Right middle lobe": right & ~oblique & horizontal & (Y < 0.08 * b.inner_d),
            "Right upper lobe": right & ~oblique & ~(horizontal & (Y < 0.08 * b.inner_d)),
            "Left lower lobe": left & oblique,
            "Left upper lobe": left & ~oblique,
        }

    def point_in(self, mask: np.ndarray, margin_mm: float = 0.0) -> tuple[float, float, float]:
        """A random point (mm) inside a mask, at least margin_mm from its edge when possible."""
        while margin_mm > 0:  # shrink the margin until some point fits (thin lobes, big findings)
            steps = [max(1, int(round(margin_mm / s))) for s in self.grid.spacing]
            eroded = ndimage.binary_erosion(mask, structure=np.ones((2 * steps[0] + 1, 3, 3)), iterations=1)
            eroded = ndimage.binary_erosion(eroded, iterations=max(steps[1], 1))
            if eroded.any():
                mask = eroded
                break
            margin_mm -= 2
        return self.pick(np.argwhere(mask))

    def pick(self, voxels: np.ndarray) -> tuple[float, float, float]:
        """A random one of the given voxel indices (N, 3), as a point in mm."""
        k, j, i = voxels[self.rng.integers(len(voxels))]
        return float(self.grid.z[k]), float(self.grid.y[j]), float(self.grid.x[i])

    def draw_anatomy(self) -> None:
        g, b, v, rng = self.grid, self.body, self.vol, self.rng
        v[self.lung] = LUNG + ndimage.gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), 1.0)[self.lung] * 25
        hc, hr = self.heart_center, self.heart_radii
        paint(v, g, hc, [r + 4 for r in hr], FAT)  # pericardial fat
        paint(v, g, hc, hr, SOFT)
        top, zb, h = b.z_base + b.lung_height, b.z_base, b.lung_height
        arch_z = zb + 0.78 * h
        asc = (hc[0] + 20, -0.2 * b.inner_d, 0.05 * b.inner_w)
        desc_x, desc_y = 0.2 * b.inner_w, 0.5 * b.inner_d
        paint_tube(v, g, asc, (arch_z, -0.1 * b.inner_d, 0.05 * b.inner_w), 15, BLOOD)
        paint_tube(v, g, (arch_z, -0.1 * b.inner_d, 0.05 * b.inner_w), (arch_z, desc_y, desc_x), 13, BLOOD)
        paint_tube(v, g, (arch_z, desc_y, desc_x), (zb - 30, desc_y, desc_x), 12, BLOOD)
        # airways: trachea to the carina, then the main bronchi
        carina = (zb + 0.62 * h, -0.05 * b.inner_d, 0.0)
        paint_tube(v, g, (top + 40, -0.12 * b.inner_d, 0), carina, 11, SOFT)
        paint_tube(v, g, (top + 40, -0.12 * b.inner_d, 0), carina, 9, AIR)
        hila = {}
        for side, sign in (("right", -1), ("left", 1)):
            # the hilum sits on the lung's mediastinal surface: vessels and bronchi enter from the mediastinum
            hilum = (carina[0] - 25, 0.0, sign * 18.0)
            hila[side] = hilum
            paint_tube(v, g, carina, (hilum[0] - 10, 0.0, sign * 0.22 * b.inner_w), 6, AIR)
            lung_voxels = np.argwhere(self.lungs[side])
            for _ in range(7):  # pulmonary vessels fanning out from the hilum, inside the lung only
                end = self.pick(lung_voxels)
                mid = tuple((np.asarray(hilum) + np.asarray(end)) / 2)
                paint_tube(v, g, hilum, mid, 2.6, BLOOD, within=self.lungs[side])
                paint_tube(v, g, mid, end, 1.4, BLOOD, within=self.lungs[side])
        self.hila = hila
        # spine: vertebral bodies with discs, cortical rim
        sy = b.half_depth - b.fat - 34
        for z0 in np.arange(zb - 40, top + 40, 28.0):
            paint_tube(v, g, (z0, sy, 0), (z0 + 22, sy, 0), 19, CORTEX)
            paint_tube(v, g, (z0 + 1.5, sy, 0), (z0 + 20.5, sy, 0), 16, BONE)
        # ribs: arcs just inside the body wall, sloping down toward the front
        ra, rb = b.half_width - b.fat - 6, b.half_depth - b.fat - 6
        for z0 in np.arange(zb + 10, top + 20, 24.0):
            for sign in (-1, 1):
                angles = np.linspace(0.5 * math.pi, -0.35 * math.pi, 9)  # from the back round to the front
                pts = [(z0 - 30 * (1 - (a + 0.35 * math.pi) / (0.85 * math.pi)), rb * math.sin(a),
                        sign * ra * math.cos(a)) for a in angles]
                for p0, p1 in zip(pts[:-1], pts[1:]):
                    paint_tube(v, g, p0, p1, 4.5, 550)
        sternum_y = -(b.half_depth - b.fat - 8)
        paint_tube(v, g, (zb + 0.2 * h, sternum_y, 0), (zb + 0.85 * h, sternum_y, 0), 9, 320)

    def draw_findings(self, f: ExamFindings) -> dict:
        """Draw findings; returns where they were put (mm), for tests and inspection."""
        g, b, v, rng, zn = self.grid, self.body, self.vol, self.rng, self.zn
        where: dict = {}
        if f.emphysema > 0:
            field = ndimage.gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), [6 / s for s in g.spacing])
            field = field / (field[self.lung].std() + 1e-6) + 0.8 * zn  # upper-lobe predominant
            cut = np.quantile(field[self.lung], 1 - f.emphysema)
            holes = self.lung & (field > cut)
            v[holes] = -975 + 8 * rng.standard_normal(int(holes.sum()))
        if f.fibrosis:
            Z, Y, X = g.z[:, None, None], g.y[None, :, None], g.x[None, None, :]
            net = (np.abs(np.sin(X / 3.0) * np.sin(Y / 3.0)) > 0.55) | (np.abs(np.sin(Z / 3.5)) > 0.9)
            v[rim(self.lung, 3) & (zn < 0.1) & net] = -250
        if f.consolidation:
            lobe = str(rng.choice(["Right lower lobe", "Left lower lobe", "Right middle lobe"]))
            # lobar/segmental consolidation reaches the pleura: centre it in the lobe's outer rim
            c = self.point_in(rim(self.lobes[lobe], 3))
            paint(v, g, c, [rng.uniform(18, 32)] * 3, 35, width=4, within=self.lung)
            where["consolidation"] = c
        if f.atelectasis:
            side = str(rng.choice(["right", "left"]))
            z_a = b.z_base + rng.uniform(0.12, 0.3) * b.lung_height
            Z, Y = g.z[:, None, None], g.y[None, :, None]
            band = self.lungs[side] & (np.abs(Z - z_a - 0.4 * Y) < 4.5) & (Y > 0)
            v[band] = -60
        if f.pleural:
            side = str(rng.choice(["right", "left"]))
            Z, Y = g.z[:, None, None], g.y[None, :, None]
            if rng.random() < 0.6:  # effusion: dependent fluid at the base
                level = 0.35 * b.inner_d
                fluid = self.lungs[side] & (Y > level) & (Z < b.z_base + 0.4 * b.lung_height)
                v[fluid] = 12
            else:  # thickening: a rind along the wall
                v[rim(self.lungs[side], 2) & (np.abs(zn) < 0.6)] = 40
        if f.hilar_mass:
            side = str(rng.choice(["right", "left"]))
            c = self.hila[side]
            paint(v, g, c, [rng.uniform(15, 24)] * 3, 42)
            where["hilar_mass"] = c
        if f.chest_wall:
            sign = float(rng.choice([-1, 1]))
            a = rng.uniform(-0.3, 0.3) * math.pi
            c = (b.z_base + rng.uniform(0.3, 0.8) * b.lung_height, (b.half_depth - b.fat - 6) * math.sin(a),
                 sign * (b.half_width - b.fat - 6) * math.cos(a))
            paint(v, g, c, [rng.uniform(16, 24)] * 3, 30)  # soft-tissue mass replacing rib and fat
            where["chest_wall"] = c
        if f.covid:
            for _ in range(int(rng.integers(3, 7))):
                lobe = str(rng.choice(["Right lower lobe", "Left lower lobe", "Right upper lobe", "Left upper lobe"],
                                      p=[0.35, 0.35, 0.15, 0.15]))
                c = self.point_in(rim(self.lobes[lobe], 4))
                paint(v, g, c, [rng.uniform(12, 28)] * 3, -600, width=6, within=self.lung)
        if f.cac_spots:
            hc, hr = self.heart_center, self.heart_radii
            for i in range(f.cac_spots):  # along the LAD (anterior) and RCA (right) grooves
                t = rng.uniform(0.1, 0.9)
                if i % 2 == 0:
                    c = (hc[0] + hr[0] * (0.7 - t), hc[1] - hr[1] * 0.95, hc[2] + hr[2] * 0.2)
                else:
                    c = (hc[0] + hr[0] * (0.6 - t), hc[1] - hr[1] * 0.3, hc[2] - hr[2] * 0.95)
                paint(v, g, c, [rng.uniform(1.5, 3.0)] * 3, float(rng.uniform(450, 900)))
        if f.nodule is not None:
            n = f.nodule
            r = n.diameter_mm / 2
            c = self.point_in(self.lobes[n.lobe], margin_mm=r + 3)  # wholly inside the lobe, off the pleura
            width = {"smooth": 0.4, "unable": 0.4, "poorly_defined": 0.35 * r + 1, "spiculated": 0.5}[n.margin]
            core = -620 if n.attenuation in ("ground_glass", "part_solid") else 35
            paint(v, g, c, [r] * 3, core, width=width, within=self.lung)
            if n.attenuation == "part_solid":
                paint(v, g, c, [max(n.solid_mm / 2, 1.0)] * 3, 35, width=0.4)
            if n.margin == "spiculated":
                for _ in range(9):
                    u = rng.standard_normal(3)
                    u /= np.linalg.norm(u)
                    tip = np.asarray(c) + u * r * rng.uniform(1.6, 2.4)
                    paint_tube(v, g, c, tip, 0.8, 0, within=self.lung)
            where["nodule"] = c
        return where

    def scan(self, blur_mm: float, noise_hu: float) -> np.ndarray:
        """Reconstruction kernel blur, then quantum noise (slightly correlated, as in CT)."""
        sigma = [blur_mm / s for s in self.grid.spacing]
        img = ndimage.gaussian_filter(self.vol, sigma)
        noise = ndimage.gaussian_filter(self.rng.standard_normal(self.grid.shape).astype(np.float32), [0, 0.6, 0.6])
        noise *= noise_hu / (noise.std() + 1e-6)
        return np.clip(img + noise, -1024, 3071).astype(np.float32)
