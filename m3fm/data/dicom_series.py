"""DICOM CT series: read headers, check a series, load it as a Hounsfield-unit volume.

Files are grouped into series by SeriesInstanceUID, never by folder. A header
read defers the pixel data (cheap), so a whole tree can be indexed before any
image is decoded. Classic CT (one file per slice) and enhanced multi-frame CT
(one file, many frames, geometry in functional groups) give the same frames.

Canonical volume: (S, H, W) with S ascending toward the head (+z), H toward
the patient's back (+y) and W toward the patient's left (+x), the DICOM LPS
axes; spacing (s, h, w) in mm, s measured along the slice normal. So the
left lung is always at the larger W, whatever the scanner's orientation.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


class InputRejected(Exception):
    """A file or series that cannot be used.

    category: a short key for summaries ("truncated", "missing_slice", ...); path: the file (relative to
    the site folder) to blame, when one is.
    """

    def __init__(self, category: str, reason: str, path: str | None = None):
        super().__init__(reason)
        self.category = category
        self.reason = reason
        self.path = path


@dataclass
class InstanceHeader:
    """What grouping and checking need from one DICOM file, read without its pixel data."""

    path: str  # relative to the site folder
    sop_uid: str
    series_uid: str
    study_uid: str
    accession: str
    patient_id: str
    study_date: str
    modality: str
    sop_class: str
    image_type: list[str]
    description: str
    rows: int
    cols: int
    frames: int
    positions: list[list[float]]  # ImagePositionPatient per frame
    orientation: list[float] | None  # ImageOrientationPatient (row direction, column direction)
    pixel_spacing: list[float] | None  # (between rows, between columns) mm
    thickness: float | None
    rescale: list[list[float]] | None  # (slope, intercept) per frame
    manufacturer: str = ""
    model: str = ""
    kernel: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceHeader":
        return cls(**d)


def _floats(v) -> list[float] | None:
    return None if v is None else [float(x) for x in v]


def _group(ds, frame_item, seq: str, attr: str):
    """An attribute from the frame's functional group, else the shared one (enhanced CT)."""
    for groups in (frame_item, *(ds.get("SharedFunctionalGroupsSequence") or [])):
        if groups is not None and seq in groups and len(groups[seq].value):
            item = groups[seq].value[0]
            if attr in item:
                return item[attr].value
    return None


def read_header(path: Path, rel: str) -> InstanceHeader:
    """Read one file's header; raise InputRejected with the reason when it is not a usable DICOM image file."""
    try:
        ds = pydicom.dcmread(path, defer_size="64 KB")
    except InvalidDicomError:
        raise InputRejected("not_dicom", "not a DICOM file (no DICM preamble)", rel) from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a property of this file
        raise InputRejected("unreadable", f"unreadable DICOM: {type(e).__name__}: {e}", rel) from None
    if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
        raise InputRejected("not_image", "no SeriesInstanceUID or SOPInstanceUID (not an image instance)", rel)
    if "PixelData" not in ds:
        raise InputRejected("not_image", f"no pixel data (SOP class {ds.get('SOPClassUID', '?')})", rel)
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    raw = ds.get_item(0x7FE00010, keep_deferred=True)  # a RawDataElement: where the pixels lie, not read
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    extra = {"transfer_syntax": syntax}
    if syntax in NATIVE_SYNTAXES and hasattr(raw, "value_tell") and raw.length != 0xFFFFFFFF:
        size = os.path.getsize(path)
        if raw.value_tell + raw.length > size:
            raise InputRejected("truncated", f"truncated file: pixel data needs {raw.length} bytes, "
                                f"only {max(size - raw.value_tell, 0)} present", rel)
        extra.update(native_pixels(ds, raw, frames, size, syntax))
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if per_frame:  # enhanced multi-frame: geometry and rescale live in functional groups
        positions = [_floats(_group(ds, f, "PlanePositionSequence", "ImagePositionPatient")) for f in per_frame]
        orientation = _floats(_group(ds, per_frame[0], "PlaneOrientationSequence", "ImageOrientationPatient"))
        spacing = _floats(_group(ds, per_frame[0], "PixelMeasuresSequence", "PixelSpacing"))
        thickness = _group(ds, per_frame[0], "PixelMeasuresSequence", "SliceThickness")
        slopes = [_group(ds, f, "PixelValueTransformationSequence", "RescaleSlope") for f in per_frame]
        intercepts = [_group(ds, f, "PixelValueTransformationSequence", "RescaleIntercept") for f in per_frame]
        image_type = list(ds.get("ImageType", [])) + list(_group(ds, per_frame[0], "CTImageFrameTypeSequence",
                                                                   "FrameType") or [])
    else:
        positions = [_floats(ds.get("ImagePositionPatient"))] * frames
        orientation = _floats(ds.get("ImageOrientationPatient"))
        spacing = _floats(ds.get("PixelSpacing"))
        thickness = ds.get("SliceThickness")
        slopes = [ds.get("RescaleSlope")] * frames
        intercepts = [ds.get("RescaleIntercept")] * frames
        image_type = list(ds.get("ImageType", []))
    rescale = None
    if all(s is not None for s in slopes) and all(i is not None for i in intercepts):
        rescale = [[float(s), float(i)] for s, i in zip(slopes, intercepts)]
    return InstanceHeader(
        path=rel, sop_uid=str(ds.SOPInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "")), accession=str(ds.get("AccessionNumber", "")),
        patient_id=str(ds.get("PatientID", "")), study_date=str(ds.get("StudyDate", "")),
        modality=str(ds.get("Modality", "")), sop_class=str(ds.get("SOPClassUID", "")),
        image_type=[str(t).upper() for t in image_type], description=str(ds.get("SeriesDescription", "")),
        rows=int(ds.get("Rows", 0)), cols=int(ds.get("Columns", 0)), frames=frames,
        positions=positions if all(p is not None for p in positions) else [],
        orientation=orientation, pixel_spacing=spacing,
        thickness=None if thickness in (None, "") else float(thickness), rescale=rescale,
        manufacturer=str(ds.get("Manufacturer", "")), model=str(ds.get("ManufacturerModelName", "")),
        kernel=str(ds.get("ConvolutionKernel", "")), extra=extra)


LITTLE_ENDIAN_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit and explicit VR: read as they lie


def native_pixels(ds, raw, frames: int, size: int, syntax: str) -> dict:
    """Where an uncompressed file's pixels lie, for load_hu to read them without parsing the file again: {} when
    the layout is one it leaves to pydicom (deflated or big endian, colour, not 8/16/32 bits, a length that does
    not fit)."""
    bits, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if (syntax not in LITTLE_ENDIAN_NATIVE or int(ds.get("SamplesPerPixel", 1) or 1) != 1 or bits not in (8, 16, 32)
            or not 0 < stored <= bits or raw.length < frames * rows * cols * bits // 8):
        return {}
    kind = "i" if int(ds.get("PixelRepresentation", 0) or 0) else "u"
    return {"pixel_offset": int(raw.value_tell), "pixel_dtype": f"<{kind}{bits // 8}",
            "pixel_unused_bits": bits - stored, "file_size": size}


@dataclass
class SeriesGeometry:
    """A checked series: frames in order along the slice normal, and the volume's spacing."""

    series_uid: str
    frames: list[tuple[str, int]]  # (file, frame index) from inferior to superior
    rescale: list[tuple[float, float]]  # (slope, intercept) of each frame, from the headers
    spacing: tuple[float, float, float]  # (s, h, w) mm
    flip_h: bool  # column direction points anterior: flip so H runs toward the back
    flip_w: bool  # row direction points to the patient's right: flip so W runs toward the left
    shape: tuple[int, int, int]
    duplicates: list[tuple[str, str]]  # (file, the file it duplicates): same SOP instance stored twice
    pixels: dict[str, dict] = field(default_factory=dict)  # file -> where its uncompressed pixels lie (native_pixels)


def check_series(headers: list[InstanceHeader], min_slices: int, gap_tolerance: float = 1.5) -> SeriesGeometry:
    """Check one series' headers; raise InputRejected naming the problem (and the file, when one is to blame)."""
    first = headers[0]
    uid = first.series_uid
    modalities = sorted({h.modality for h in headers})
    if modalities != ["CT"]:
        raise InputRejected("not_ct", f"modality {'/'.join(m or '(none)' for m in modalities)}, not CT")
    for h in headers:
        if "LOCALIZER" in h.image_type or "SCOUT" in h.image_type:
            raise InputRejected("localizer", "localizer (scout) image, not a tomographic series", h.path)
        if h.sop_class not in (CT_IMAGE, ENHANCED_CT_IMAGE):
            raise InputRejected("not_ct", f"SOP class {h.sop_class} is not CT Image Storage", h.path)
    # the same SOP instance stored twice (a re-export): keep one, report the copy
    seen: dict[str, str] = {}
    duplicates, unique = [], []
    for h in sorted(headers, key=lambda h: h.path):
        if h.sop_uid in seen:
            duplicates.append((h.path, seen[h.sop_uid]))
        else:
            seen[h.sop_uid] = h.path
            unique.append(h)
    for h in unique:
        for name, value in (("ImageOrientationPatient", h.orientation), ("PixelSpacing", h.pixel_spacing),
                            ("ImagePositionPatient", h.positions or None),
                            ("RescaleSlope/RescaleIntercept (needed for Hounsfield units)", h.rescale)):
            if not value:
                raise InputRejected("missing_tag", f"missing {name}", h.path)
        if not np.allclose(h.orientation, first.orientation, atol=1e-3):
            raise InputRejected("inconsistent", f"orientation {h.orientation} differs from the series' {first.orientation}", h.path)
        if not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-3):
            raise InputRejected("inconsistent", f"pixel spacing {h.pixel_spacing} differs from the series' {first.pixel_spacing}", h.path)
        if (h.rows, h.cols) != (first.rows, first.cols):
            raise InputRejected("inconsistent", f"matrix {h.rows}x{h.cols} differs from the series' {first.rows}x{first.cols}", h.path)
    row, col = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = np.cross(row, col)
    if abs(normal[2]) < 0.9:
        raise InputRejected("not_axial", f"not an axial series (slice normal {np.round(normal, 3).tolist()})")
    frames = [(float(np.dot(p, normal)), h.path, k, tuple(h.rescale[k])) for h in unique for k, p in enumerate(h.positions)]
    frames.sort()
    if normal[2] < 0:
        frames.reverse()  # S runs toward the head
    where = np.array([f[0] for f in frames]) * math.copysign(1.0, normal[2])
    steps = np.diff(where)
    if len(steps):
        same = np.flatnonzero(steps < 1e-3)
        if len(same):
            i = same[0]
            raise InputRejected("duplicate_slice", f"two different instances at slice position {where[i]:.2f} mm "
                                f"({frames[i][1]} and {frames[i + 1][1]})", frames[i + 1][1])
    if len(frames) < min_slices:
        raise InputRejected("too_few_slices", f"{len(frames)} slice{'s' if len(frames) != 1 else ''}, fewer than the minimum {min_slices}")
    spacing_s = float(np.median(steps)) if len(steps) else float(first.thickness or 1.0)  # one slice: its thickness
    gaps = np.flatnonzero(steps > gap_tolerance * spacing_s)
    if len(gaps):
        i = gaps[0]
        missing = round(steps[i] / spacing_s) - 1
        raise InputRejected("missing_slice", f"missing slice{'s' if missing > 1 else ''}: {missing} between positions {where[i]:.2f} "
                            f"and {where[i + 1]:.2f} mm (gap {steps[i]:.2f} mm, spacing {spacing_s:.2f} mm)")
    if np.any(np.abs(steps - spacing_s) > 0.1 * spacing_s):
        raise InputRejected("irregular_spacing", f"irregular slice spacing ({steps.min():.2f} to {steps.max():.2f} mm)")
    return SeriesGeometry(uid, [(f[1], f[2]) for f in frames], [f[3] for f in frames],
                          (spacing_s, float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
                          flip_h=col[1] < 0, flip_w=row[0] < 0, shape=(len(frames), first.rows, first.cols),
                          duplicates=duplicates,
                          pixels={h.path: h.extra for h in unique if "pixel_offset" in h.extra})


def load_hu(site_dir: Path, geometry: SeriesGeometry, buffer: np.ndarray | None = None) -> np.ndarray:
    """Decode every frame (compressed syntaxes through pylibjpeg) and apply the rescale: (S, H, W) float32 HU.
    Each file is decoded once, straight into its slices of one preallocated volume (flips included): no stack of
    decoded frames, no second copy of the volume. With `buffer` (float32, at least S*H*W values) the volume is a
    view of it: a process reading series after series touches no fresh memory (on a VM, first-touch page faults
    cost more than the conversion itself)."""
    S, H, W = geometry.shape
    vol = (np.empty((S, H, W), dtype=np.float32) if buffer is None
           else buffer[:S * H * W].reshape(S, H, W))
    slices: dict[str, list[tuple[int, int]]] = {}
    for i, (path, k) in enumerate(geometry.frames):
        slices.setdefault(path, []).append((i, k))
    rows = slice(None, None, -1) if geometry.flip_h else slice(None)
    cols = slice(None, None, -1) if geometry.flip_w else slice(None)
    for path, where in slices.items():
        frames = _native_frames(site_dir / path, geometry.pixels.get(path), 1 + max(k for _, k in where), H, W)
        if frames is None:
            try:
                ds = pydicom.dcmread(site_dir / path)
                frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
            except Exception as e:  # noqa: BLE001 - a decoder failure is a property of this file
                raise InputRejected("undecodable", f"pixel data cannot be decoded: {type(e).__name__}: {e}",
                                    path) from None
        for i, k in where:
            slope, intercept = geometry.rescale[i]
            if slope == 1:  # one pass: stored * 1.0 is exact, so this is the same float32 sum
                np.add(frames[k][rows, cols], np.float32(intercept), out=vol[i], dtype=np.float32)
            else:
                np.multiply(frames[k][rows, cols], np.float32(slope), out=vol[i], dtype=np.float32)
                vol[i] += np.float32(intercept)
    return vol


def _native_frames(path: Path, layout: dict | None, frames: int, rows: int, cols: int) -> np.ndarray | None:
    """An uncompressed file's first `frames` frames (F, H, W) read straight from where its header said they lie,
    as pydicom's pixel_array gives them (unused high bits corrected: masked, or sign-extended when signed), but
    without parsing the file a second time (pydicom's read was 0.3 s of a 196-slice series). None when the header
    gave no layout or the file is no longer the size it had then: pydicom reads it instead."""
    if layout is None:
        return None
    try:
        if os.path.getsize(path) != layout["file_size"]:
            return None
        arr = np.fromfile(path, dtype=layout["pixel_dtype"], count=frames * rows * cols, offset=layout["pixel_offset"])
    except OSError:
        return None
    if arr.size != frames * rows * cols:
        return None
    shift = layout["pixel_unused_bits"]
    if shift:  # as pydicom does (its correct_unused_bits): shift the unused bits out and back
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr.reshape(frames, rows, cols)
