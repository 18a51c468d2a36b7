"""A CT volume in known patient geometry, written as axial, sagittal and coronal series of one
study (one Frame of Reference), for the viewer's slice order, orientation letters, reference
lines and linked scrolling.

Patient coordinates are DICOM's LPS (PS3.3 C.7.6.2.1.1): +x towards the patient's left, +y
posterior, +z head. Voxel [k, j, i] of the volume lies at x = X0 + i*XY, y = Y0 + j*XY,
z = Z_TOP - k*Z; k = 0 is the most superior axial slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from data import chest, uid

SIZE = 96            # voxels across x and y
SLICES = 40          # axial slices
XY = 2.0             # mm between voxels in x and y
Z = 2.5              # mm between axial slices
X0, Y0, Z_TOP = -96.0, -96.0, 50.0
SEED = 19


@dataclass
class Volume:
    study: str
    frame_of_reference: str
    hu: np.ndarray                       # [k, j, i] in HU (what the stored values rescale to)
    series: dict[str, str] = field(default_factory=dict)     # name -> Series Instance UID
    files: list[Path] = field(default_factory=list)
    stored: dict[str, list[Dataset]] = field(default_factory=dict)   # name -> datasets


def _dataset(vol: Volume, name: str, number: int, series_number: int, pixels_hu: np.ndarray,
             iop: list[float], ipp: list[float], spacing: list[float],
             slope: float = 1.0, intercept: float = -1024.0) -> Dataset:
    stored = np.rint((pixels_hu - intercept) / slope).clip(0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = uid(SEED, name, number, "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = "20250301"
    ds.StudyTime = "090000"
    ds.AccessionNumber = "GEO19"
    ds.Modality = "CT"
    ds.StudyDescription = "CT CHEST GEOMETRY"
    ds.SeriesDescription = name.upper()
    ds.PatientName = "Geometry^Gina"
    ds.PatientID = "GEO19"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = vol.study
    ds.SeriesInstanceUID = vol.series[name]
    ds.FrameOfReferenceUID = vol.frame_of_reference
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = "2.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.PixelData = stored.tobytes()
    return ds


def write_volume(folder: Path) -> Volume:
    """Write the series and return what a test needs to know about them:
    axial     every slice, InstanceNumber 1 the most superior (as scanners number a head-first CT)
    thick     every other axial slice (5 mm), the same Frame of Reference: linked scrolling
    sagittal  every 6th column, from the patient's right; InstanceNumber 1 the LEFTmost, so that
              only the geometry puts the right-most slice first
    coronal   every 6th row, from anterior; stored with RescaleSlope 2 and Intercept -2048
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    hu = np.stack([chest(SIZE, k / (SLICES - 1), rng) for k in range(SLICES)])
    hu = np.rint(hu).clip(-1024, 3071)
    vol = Volume(study=uid(SEED, "study"), frame_of_reference=uid(SEED, "for"), hu=hu)
    for name in ("axial", "thick", "sagittal", "coronal"):
        vol.series[name] = uid(SEED, name, "series")
        vol.stored[name] = []
    axial = [1, 0, 0, 0, 1, 0]
    for k in range(SLICES):
        ds = _dataset(vol, "axial", k + 1, 2, hu[k], axial, [X0, Y0, Z_TOP - k * Z], [XY, XY])
        vol.stored["axial"].append(ds)
    for n, k in enumerate(range(0, SLICES, 2)):
        ds = _dataset(vol, "thick", n + 1, 3, hu[k], axial, [X0, Y0, Z_TOP - k * Z], [XY, XY])
        vol.stored["thick"].append(ds)
    columns = list(range(0, SIZE, 6))
    for n, i in enumerate(columns):
        # Rows run down the body (-z), columns posterior (+y): row spacing is the slice gap.
        ds = _dataset(vol, "sagittal", len(columns) - n, 4, hu[:, :, i], [0, 1, 0, 0, 0, -1],
                      [X0 + i * XY, Y0, Z_TOP], [Z, XY])
        vol.stored["sagittal"].append(ds)
    for n, j in enumerate(range(0, SIZE, 6)):
        ds = _dataset(vol, "coronal", n + 1, 5, hu[:, j, :], [1, 0, 0, 0, 0, -1],
                      [X0, Y0 + j * XY, Z_TOP], [Z, XY], slope=2.0, intercept=-2048.0)
        vol.stored["coronal"].append(ds)
    for name, datasets in vol.stored.items():
        for ds in datasets:
            path = folder / f"{name}-{int(ds.InstanceNumber):03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            vol.files.append(path)
    return vol
