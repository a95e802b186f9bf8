"""Write damaged, compressed, re-oriented and enhanced multi-frame copies of a real series (test helpers)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid


def series_files(dicom_dir: Path) -> dict[str, list[Path]]:
    """SeriesInstanceUID -> files sorted along z."""
    found = defaultdict(list)
    for p in sorted(dicom_dir.rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            found[ds.SeriesInstanceUID].append((float(ds.ImagePositionPatient[2]), p))
    return {uid: [p for _, p in sorted(v)] for uid, v in found.items()}


def clone_series(files: list[Path], dest: Path, tag: str, edit=None) -> tuple[str, list[Path]]:
    """Copy a series under new Series/SOP UIDs; edit(ds, k) may change each dataset before it is saved."""
    dest.mkdir(parents=True, exist_ok=True)
    new_uid = generate_uid(entropy_srcs=[tag, "series"])
    out = []
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, str(k)])
        if edit:
            edit(ds, k)
        path = dest / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return new_uid, out


def break_pixel_data(ds: Dataset) -> None:
    """Claim JPEG 2000 and store bytes no decoder can read."""
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"


def flip_in_plane(ds: Dataset, k: int) -> None:
    """The same slice stored with rows running right-to-left and columns bottom-to-top."""
    arr = ds.pixel_array[::-1, ::-1].copy()
    x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
    dh, dw = (float(v) for v in ds.PixelSpacing)
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    ds.ImagePositionPatient = [x0 + (ds.Columns - 1) * dw, y0 + (ds.Rows - 1) * dh, z]
    ds.set_pixel_data(arr, "MONOCHROME2", 16, generate_instance_uid=False)


def enhanced_ct(files: list[Path], path: Path, tag: str) -> str:
    """One Enhanced CT Image Storage file holding the series as frames (stored head to feet), geometry and
    rescale in functional groups."""
    slices = [pydicom.dcmread(f) for f in files][::-1]
    first = slices[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[tag, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    for attr in ("StudyInstanceUID", "AccessionNumber", "PatientID", "PatientName", "StudyDate", "Manufacturer",
                 "ManufacturerModelName"):
        setattr(ds, attr, getattr(first, attr))
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[tag, "series"])
    ds.SeriesDescription = "ENHANCED AXIAL"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    ds.SharedFunctionalGroupsSequence = [item(
        PlaneOrientationSequence=[item(ImageOrientationPatient=first.ImageOrientationPatient)],
        PixelMeasuresSequence=[item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)],
        PixelValueTransformationSequence=[item(RescaleIntercept=first.RescaleIntercept,
                                               RescaleSlope=first.RescaleSlope, RescaleType="HU")])]
    ds.PerFrameFunctionalGroupsSequence = [item(PlanePositionSequence=[item(ImagePositionPatient=s.ImagePositionPatient)])
                                           for s in slices]
    ds.set_pixel_data(np.stack([s.pixel_array for s in slices]), "MONOCHROME2", 16, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return ds.SeriesInstanceUID
