"""What we read from a DICOM header: parse (never the pixels), validate UIDs, extract index fields.

The stored bytes are never decoded into a data set we write back; pydicom reads only up to the
Pixel Data element to fill the index.
"""

from __future__ import annotations

import functools
import io
import re
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from pacsd import __version__
from pacsd.errors import InvalidDataset, SOPClassMismatch

# Our Implementation Class UID (PS3.7 D.3.3.2): a 2.25 UID derived from a fixed UUID, which
# needs no registered root.
IMPLEMENTATION_UID = "2.25.181125364826283573498157214712146718209"
IMPLEMENTATION_VERSION = f"PACSD_{__version__}"[:16]
PREAMBLE = b"\x00" * 128 + b"DICM"
PIXEL_DATA = 0x7FE00010

# PS3.5 9.1: components of digits without leading zeros, separated by periods, at most 64 chars.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


@functools.lru_cache(maxsize=256)
def _meta_template(sop_class: str, uid_length: int, transfer_syntax: str,
                   source_aet: str) -> tuple[bytes, bytes]:
    """The File Meta group around a SOP Instance UID of a given length, split at that UID: the
    group is the same for every instance of a (class, syntax, sender) but for those bytes, and
    pydicom's encoder costs more per image than the rest of the header handling."""
    placeholder = "9" * uid_length   # same length: the group length and padding hold
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(placeholder)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_aet:
        meta.SourceApplicationEntityTitle = source_aet
    buf = DicomBytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(buf, meta, enforce_standard=True)
    data = buf.getvalue()
    # Split at the value of (0002,0003) UI, found by its tag and VR (explicit VR LE, PS3.10 7.1)
    start = data.index(b"\x02\x00\x03\x00UI") + 8
    return data[:start], data[start + uid_length:]


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str,
                    source_aet: str = "") -> bytes:
    """Preamble, 'DICM' and an encoded File Meta group (PS3.10 7.1) for stored bytes."""
    # The peer's AE title, as far as it is a valid AE value (PS3.5 6.2): it is only a record.
    source_aet = "".join(c for c in source_aet if " " <= c <= "~" and c != "\\").strip()[:16]
    head, tail = _meta_template(sop_class, len(sop_instance), transfer_syntax, source_aet)
    return head + sop_instance.encode() + tail


_ERRORS = (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError,
           NotImplementedError, LookupError, AttributeError, zlib.error)


def _touch(ds: Dataset) -> Dataset:
    # Touch the elements we index now, so a truncated or garbled header fails here, not later.
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds.get(kw)
    return ds


def read_header(fileobj: Any) -> Dataset:
    """Parse a Part 10 file up to Pixel Data. Raises InvalidDataset."""
    try:
        return _touch(dcmread(fileobj, stop_before_pixels=True, defer_size=4096))
    except _ERRORS as e:
        raise InvalidDataset(f"cannot parse the data set: {type(e).__name__}: {e}") from None


def read_dataset_header(dataset: bytes, transfer_syntax: str) -> Dataset:
    """Parse an encoded data set (no File Meta group) up to Pixel Data. Raises InvalidDataset."""
    ts = UID(transfer_syntax)
    try:
        if ts.is_deflated:
            # PS3.5 A.5: raw deflate, without zlib header
            dataset = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
        ds = read_dataset(io.BytesIO(dataset), ts.is_implicit_VR, ts.is_little_endian,
                          stop_when=lambda tag, vr, length: tag == PIXEL_DATA, defer_size=4096)
        return _touch(ds)
    except _ERRORS as e:
        raise InvalidDataset(f"cannot parse the data set: {type(e).__name__}: {e}") from None


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str:
    try:
        value = ds.get(keyword)
    except Exception:   # an undecodable value must not refuse an image; index it empty
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("\x00", "").strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:
        return None


@dataclass
class Record:
    """The index row(s) for one instance, flat; index.py splits it into its four levels."""

    values: dict[str, Any]

    @property
    def sop_instance_uid(self) -> str:
        return self.values["sop_instance_uid"]


def check_and_extract(ds: Dataset, *, sop_class: str | None = None,
                      sop_instance: str | None = None) -> Record:
    """Validate the identifying UIDs (and that they agree with the C-STORE request) and return
    the values the index keeps. Raises InvalidDataset / SOPClassMismatch."""
    uids = {kw: _text(ds, kw, 1000) for kw in
            ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    for kw, value in uids.items():
        if not value:
            raise InvalidDataset(f"{kw} is missing")
        if not is_valid_uid(value):
            raise InvalidDataset(f"{kw} {value[:80]!r} is not a valid UID (PS3.5 9.1)")
    if sop_class is not None and uids["SOPClassUID"] != sop_class:
        raise SOPClassMismatch(f"data set SOP Class {uids['SOPClassUID']} does not match the "
                               f"request's {sop_class}")
    if sop_instance is not None and uids["SOPInstanceUID"] != sop_instance:
        raise InvalidDataset(f"data set SOP Instance {uids['SOPInstanceUID']} does not match "
                             f"the request's {sop_instance}")
    charset = _text(ds, "SpecificCharacterSet", 200)
    name = _text(ds, "PatientName", 324)
    values: dict[str, Any] = {
        # patient
        "patient_id": _text(ds, "PatientID", 64),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
        "patient_name": name,
        "patient_birth_date": _text(ds, "PatientBirthDate", 18),
        "patient_sex": _text(ds, "PatientSex", 16),
        # study
        "study_instance_uid": uids["StudyInstanceUID"],
        "study_date": _text(ds, "StudyDate", 18),
        "study_time": _text(ds, "StudyTime", 28),
        "accession_number": _text(ds, "AccessionNumber", 64),
        "study_id": _text(ds, "StudyID", 16),
        "study_description": _text(ds, "StudyDescription", 64),
        "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
        "institution_name": _text(ds, "InstitutionName", 64),
        "patient_age": _text(ds, "PatientAge", 4),
        "specific_character_set": charset,
        # series
        "series_instance_uid": uids["SeriesInstanceUID"],
        "modality": _text(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription", 64),
        "series_date": _text(ds, "SeriesDate", 18),
        "series_time": _text(ds, "SeriesTime", 28),
        "body_part_examined": _text(ds, "BodyPartExamined", 16),
        "protocol_name": _text(ds, "ProtocolName", 64),
        "station_name": _text(ds, "StationName", 16),
        # instance
        "sop_instance_uid": uids["SOPInstanceUID"],
        "sop_class_uid": uids["SOPClassUID"],
        "instance_number": _int(ds, "InstanceNumber"),
        "content_date": _text(ds, "ContentDate", 18),
        "content_time": _text(ds, "ContentTime", 28),
        "acquisition_number": _int(ds, "AcquisitionNumber"),
        "number_of_frames": _int(ds, "NumberOfFrames"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
    }
    return Record(values)
