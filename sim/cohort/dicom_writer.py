"""Write a HU volume as a CT series the way a scanner exports it (CT Image Storage, one file per slice).

UIDs come from pydicom's generate_uid with entropy taken from the seed, site,
exam and instance, so the same seed writes the same bytes. Files of a series
are spread over nested folders, interleaved with other series, as PACS exports
do: readers must group by SeriesInstanceUID, not by folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sim.cohort.presets import Scanner


def uid(*parts) -> str:
    # joined with a separator: pydicom concatenates sources, so ("1", "23") and ("12", "3") would collide
    return generate_uid(entropy_srcs=["|".join(str(p) for p in parts)])


@dataclass
class SeriesInfo:
    patient_id: str
    patient_sex: str
    patient_age: float
    study_uid: str
    series_uid: str
    frame_uid: str
    study_date: str  # YYYYMMDD
    accession: str  # = exam_id in clinical.csv and labels.csv
    series_number: int
    description: str
    institution: str


def to_stored(hu: np.ndarray, scanner: Scanner) -> np.ndarray:
    stored = np.round((hu - scanner.rescale_intercept) / scanner.rescale_slope)
    if scanner.signed:
        return np.clip(stored, -32768, 32767).astype(np.int16)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def slice_dataset(info: SeriesInfo, scanner: Scanner, pixels: np.ndarray, k: int, position, spacing,
                  thickness: float, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "M3FM_FED_SIM"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = info.study_date
    ds.StudyTime = ds.SeriesTime = "093000"
    ds.ContentTime = f"0930{k % 60:02d}"
    ds.AccessionNumber = info.accession
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = info.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST LOW DOSE SCREENING"
    ds.SeriesDescription = info.description
    ds.ManufacturerModelName = scanner.model
    ds.PatientName = f"SYNTHETIC^{info.patient_id}"
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "M" if info.patient_sex == "Male" else "F"
    ds.PatientAge = f"{int(info.patient_age):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = f"{scanner.kvp:g}"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{spacing[1] * pixels.shape[0]:.1f}"
    ds.ConvolutionKernel = scanner.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.StudyID = info.accession[-6:]
    ds.SeriesNumber = info.series_number
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = info.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{position[2]:.3f}"
    ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[2]:.6g}"]
    ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
    ds.RescaleSlope = f"{scanner.rescale_slope:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)  # keep our seeded UID
    return ds


def write_series(volume_hu: np.ndarray, z: np.ndarray, y0: float, x0: float, spacing, thickness: float,
                 scanner: Scanner, info: SeriesInfo, root: Path, folders: list[Path], seed_parts: tuple) -> list[Path]:
    """volume_hu: (S, H, W) ascending z. Slice k goes to folders[k % len(folders)] (interleaved export)."""
    stored = to_stored(volume_hu, scanner)
    paths = []
    for k in range(stored.shape[0]):
        sop = uid(*seed_parts, "sop", k)
        ds = slice_dataset(info, scanner, stored[k], k, (x0, y0, float(z[k])), spacing, thickness, sop)
        folder = root / folders[k % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"IM{info.series_number:02d}{k + 1:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
