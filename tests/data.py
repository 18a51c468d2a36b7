"""Test data: pydicom's own test files, and generated CT series (deterministic from a seed)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

# (file name, what it exercises); all ship inside the pydicom wheel.
TEST_FILES = [
    ("CT_small.dcm", "explicit VR little endian"),
    ("MR_small_implicit.dcm", "implicit VR little endian"),
    ("MR_small_bigendian.dcm", "explicit VR big endian"),
    ("JPEG2000.dcm", "JPEG 2000"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline, RGB"),
    ("SC_rgb_rle_2frame.dcm", "RLE, multi-frame"),
    ("MR_small_RLE.dcm", "RLE"),
    ("rtplan.dcm", "RT Plan, no pixels"),
    ("test-SR.dcm", "structured report"),
    ("waveform_ecg.dcm", "waveform"),
]
CHARSET_FILES = ["chrFren.dcm", "chrX1.dcm", "chrH31.dcm", "chrGreek.dcm", "chrRuss.dcm"]


def sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        path = get_charset_files(name)[0]
    return Path(path)


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, the bytes after the File Meta group): what must survive unchanged."""
    from pynetdicom.dsutils import split_dataset
    meta, offset = split_dataset(path)
    return str(meta.TransferSyntaxUID), path.read_bytes()[offset:]


def uid(*parts: object) -> str:
    """A deterministic 2.25 UID (PS3.5 B.2) from the given parts."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def chest(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """A chest-like axial slice in Hounsfield units at height z (0..1): body, fat, lungs with
    vessels, heart, aorta, spine, sternum and ribs, so that pictures (the README's) and window
    presets have something to show."""
    v, u = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]

    def ellipse(cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
        return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 < 1

    grow = 0.55 + 0.45 * np.sin(np.pi * (0.15 + 0.7 * z))
    img = np.full((size, size), -1000.0)
    img[ellipse(0, 0.02, 0.9, 0.66)] = -100                       # subcutaneous fat
    img[ellipse(0, 0.02, 0.84, 0.6)] = 45                         # muscle, mediastinum
    for side in (-1, 1):
        lung = ellipse(side * 0.38, -0.02, 0.3 * grow, 0.45 * grow)
        img[lung] = -860 + rng.normal(0, 25, lung.sum())
        for _ in range(40):                                       # vessels
            cu, cv = side * 0.38 + rng.uniform(-0.25, 0.25) * grow, rng.uniform(-0.4, 0.4) * grow
            vessel = ellipse(cu, cv, 0.012, 0.012) & lung
            img[vessel] = 20
    heart = max(0.0, np.sin(np.pi * (z - 0.1) / 0.8))
    if heart > 0.05:
        img[ellipse(0.1, 0.08, 0.26 * heart, 0.22 * heart)] = 50
    img[ellipse(0.13, 0.38, 0.065, 0.065)] = 190                  # aorta with contrast
    img[ellipse(0, 0.5, 0.11, 0.1)] = 950                         # vertebral cortex
    img[ellipse(0, 0.5, 0.09, 0.08)] = 350                        # cancellous bone
    img[ellipse(0, 0.63, 0.04, 0.035)] = 15                       # spinal canal
    img[ellipse(0, -0.56, 0.07, 0.03)] = 600                      # sternum
    for angle in np.linspace(0.35, np.pi - 0.35, 7):              # ribs, front or back by z
        for side in (-1, 1):
            cu, cv = side * 0.8 * np.cos(angle), 0.58 * np.sin(angle)
            img[ellipse(cu, cv * np.sign(np.cos(angle * 2 + z * 3)), 0.035, 0.028)] = 800
    return img + rng.normal(0, 8, (size, size))


def ct_slice(*, seed: int, patient: int, study: int, series: int, number: int,
             size: int = 512, modality: str = "CT", study_date: str = "20240102",
             patient_name: str | None = None, accession: str | None = None,
             anatomy: int = 0) -> Dataset:
    """One realistic CT slice: 16-bit signed pixels, proper UIDs and patient/study/series keys.
    With `anatomy` (the number of slices of the series), a chest-like picture instead of a
    plain disc."""
    rng = np.random.default_rng([seed, patient, study, series, number])
    if anatomy:
        img = chest(size, (number - 1) / max(1, anatomy - 1), rng)
    else:
        yy, xx = np.mgrid[:size, :size]
        body = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size * 0.42) ** 2
        img = np.where(body, 40, -1000) + rng.normal(0, 12, (size, size))
    pixels = (img + 1024).clip(0, 4095).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = uid(seed, patient, study, series, number, "sop")
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.StudyTime = f"{8 + study % 10:02d}{series % 60:02d}00"
    ds.AccessionNumber = accession if accession is not None else f"ACC{seed}{patient:03d}{study:02d}"
    ds.Modality = modality
    ds.Manufacturer = "pacsd-tests"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDescription = f"CT CHEST {study}"
    ds.SeriesDescription = f"AXIAL {series}"
    ds.PatientName = patient_name or f"Test^Patient{patient:03d}"
    ds.PatientID = f"PID{seed}-{patient:03d}"
    ds.PatientBirthDate = f"19{50 + patient % 50:02d}0101"
    ds.PatientSex = "MF"[patient % 2]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.StudyInstanceUID = uid(seed, patient, study, "study")
    ds.SeriesInstanceUID = uid(seed, patient, study, series, "series")
    ds.StudyID = str(study)
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-250.0, -250.0, float(number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(folder: Path, *, seed: int = 1, patients: int = 1, studies: int = 1,
                 series: int = 1, images: int = 10, size: int = 512, **kw) -> list[Path]:
    """Write patients x studies x series x images slices as Part 10 files; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in range(1, patients + 1):
        for st in range(1, studies + 1):
            for se in range(1, series + 1):
                for n in range(1, images + 1):
                    ds = ct_slice(seed=seed, patient=p, study=st, series=se, number=n, size=size,
                                  **kw)
                    path = folder / f"p{p}s{st}r{se}i{n:04d}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    paths.append(path)
    return paths


def read(path: Path) -> Dataset:
    return dcmread(path)


@dataclass(frozen=True)
class Sent:
    """What a test sent: one file and the UIDs it carries."""

    sop: str
    series: str
    study: str
    patient: str
    path: Path


def describe(paths: list[Path]) -> dict[str, Sent]:
    """SOP Instance UID -> Sent, for files about to be sent."""
    out = {}
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = Sent(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                           str(ds.StudyInstanceUID), str(ds.PatientID), p)
    return out
