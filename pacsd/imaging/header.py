"""What we read from a DICOM header: parse (never the pixels), validate UIDs, extract index fields.

The stored bytes are never decoded into a data set we write back; pydicom reads only up to the
Pixel Data element to fill the index. A deflated data set is inflated only as far as that, and
within the limits of pacsd.imaging.bounds (pydicom's own reader would inflate all of it first).
"""

from __future__ import annotations

import functools
import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from pacsd import __version__
from pacsd.imaging import bounds
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


# RecursionError: sequences nested deeper than Python's stack (pydicom reads them recursively).
_ERRORS = (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError,
           NotImplementedError, LookupError, AttributeError, zlib.error, RecursionError)


def _touch(ds: Dataset) -> Dataset:
    # Touch the elements we index now, so a truncated or garbled header fails here, not later.
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds.get(kw)
    return ds


def _at_pixels(tag: int, vr: Any, length: int) -> bool:
    return tag == PIXEL_DATA


def _not_meta(tag: Any, vr: Any, length: int) -> bool:
    return tag >> 16 != 0x0002


def _without_deferred(ds: Dataset, defer_size: int | None) -> Dataset:
    """Drop the values a deflated read skipped: pydicom would fetch a deferred value again from
    the file at its offset, which in a deflated file is not where it lies."""
    if defer_size is not None:
        for tag in list(ds.keys()):
            raw = ds.get_item(tag)
            if getattr(raw, "value", b"") is None and getattr(raw, "length", 0) > defer_size:
                del ds[tag]
    return ds


def _inflating(source: Any, max_read: int = bounds.MAX_HEADER_READ) -> bounds.Inflating:
    """A stream inflating the deflated data set that `source` is at, within [dicom]
    max_inflated_mb and, for an image, within what its header and declared pixel data need
    (a deflated data set's pixel data is native, PS3.5 A.5): a first look, up to the end of
    group 0028, reads what it declares."""
    start = source.tell()
    limit = bounds.limits().max_inflated
    probe = bounds.Inflating(source, limit)
    ds = read_dataset(cast(BinaryIO, probe), False, True, defer_size=4096,
                      stop_when=lambda tag, vr, length: tag > 0x0028FFFF)
    d = bounds.declared(ds)
    source.seek(start)
    if d is None:
        return bounds.Inflating(source, limit, max_read=max_read)
    need = probe.tell() + d.decoded_bytes + bounds.FULL_READ_SLACK
    if need >= limit:
        return bounds.Inflating(source, limit, max_read=max_read)
    return bounds.Inflating(source, need, max_read=min(max_read, need),
                            why=f"its header and {d.describe()} need no more")


def read_header(fileobj: Any, defer_size: int | None = 4096) -> Dataset:
    """Parse a Part 10 file up to Pixel Data (values over `defer_size` bytes are read only when
    used; None: all read). A deflated data set is inflated only that far, within limits, and
    its skipped values are left out. Raises InvalidDataset (DataSetTooLarge)."""
    try:
        start = fileobj.tell()
        preamble = read_preamble(fileobj, False)
        meta = FileMetaDataset(read_dataset(fileobj, False, True, stop_when=_not_meta))
        if UID(meta.get("TransferSyntaxUID", "")).is_deflated:
            name = getattr(fileobj, "name", "<deflated file>")
            stream = _inflating(fileobj)
            ds = read_dataset(cast(BinaryIO, stream), False, True, stop_when=_at_pixels,
                              defer_size=defer_size)
            out = FileDataset(name, _without_deferred(ds, defer_size), preamble, meta,
                              False, True)
            return _touch(out)
        fileobj.seek(start)
        return _touch(dcmread(fileobj, stop_before_pixels=True, defer_size=defer_size))
    except _ERRORS as e:
        raise InvalidDataset(f"cannot parse the data set: {type(e).__name__}: {e}") from None


def read_file_header(path: Path | str, defer_size: int | None = 4096) -> Dataset:
    """read_header of the file at `path`."""
    with open(path, "rb") as f:
        return read_header(f, defer_size)


def read_full(path: Path | str) -> Dataset:
    """A stored file read whole, its pixel budget checked first. A deflated one is inflated
    within [dicom] max_inflated_mb, and no further than its header and declared pixel data
    need (a deflated data set's pixel data is native: PS3.5 A.5)."""
    with open(path, "rb") as f:
        header = read_header(f)
        bounds.check_pixels(header)
        meta = header.file_meta
        if not UID(meta.get("TransferSyntaxUID", "")).is_deflated:
            f.seek(0)
            try:
                return dcmread(f)
            except _ERRORS as e:
                raise InvalidDataset(f"cannot read the data set: {type(e).__name__}: {e}"
                                     ) from None
        try:
            f.seek(0)
            preamble = read_preamble(f, False)
            read_dataset(f, False, True, stop_when=_not_meta)
            stream = _inflating(f, max_read=bounds.limits().max_inflated)
            ds = read_dataset(cast(BinaryIO, stream), False, True)
        except _ERRORS as e:
            raise InvalidDataset(f"cannot read the data set: {type(e).__name__}: {e}") from None
        return FileDataset(str(path), ds, preamble, meta, False, True)


def read_dataset_header(dataset: Any, transfer_syntax: str) -> Dataset:
    """Parse an encoded data set (no File Meta group; bytes, bytearray or memoryview, read
    without a copy) up to Pixel Data, and hold it against the limits of pacsd.imaging.bounds: a
    deflated one is inflated only to its header, then counted to its end (nothing kept) within
    [dicom] max_inflated_mb; the declared pixels within the budget, and native pixel data no
    shorter than declared. Raises InvalidDataset (DataSetTooLarge)."""
    ts = UID(transfer_syntax)
    pixels: list[int] = []   # the Pixel Data element's length, once met

    def at_pixels(tag: int, vr: Any, length: int) -> bool:
        if tag == PIXEL_DATA:
            pixels.append(length)
            return True
        return False

    # bytes (C-STORE): BytesIO shares them without a copy and reads in C; a view (STOW-RS,
    # part of a larger body) is read in place by ViewReader, which BytesIO would copy.
    reader: Any = (io.BytesIO(dataset) if isinstance(dataset, bytes)
                   else bounds.ViewReader(dataset))
    try:
        fp: Any = reader
        if ts.is_deflated:   # PS3.5 A.5: raw deflate, without zlib header
            fp = _inflating(reader)
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=at_pixels,
                          defer_size=4096)
        _touch(ds)
        carried = None
        if pixels:
            value_at = fp.tell() + (8 if ts.is_implicit_VR else 12)
            total = fp.size() if ts.is_deflated else memoryview(dataset).nbytes
            carried = max(0, total - value_at)
        elif ts.is_deflated:
            fp.size()   # the whole stream within the cap, though we need no more of it
    except _ERRORS as e:
        raise InvalidDataset(f"cannot parse the data set: {type(e).__name__}: {e}") from None
    finally:
        reader.close()
    bounds.check_pixels(ds, native=not ts.is_compressed, length=pixels[0] if pixels else None,
                        carried=carried)
    return ds


# What a plain value looks like (printable ASCII, no backslash: one value; NUL padding): its
# text is the same in every character set pydicom knows, and str() of pydicom's value for it,
# stripped as _text strips, is the bytes stripped (tests/test_unit_header_values.py checks that
# against pydicom). Anything else goes through pydicom.
_PLAIN = re.compile(rb"[\x00\x20-\x5b\x5d-\x7e]*\Z")
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UT"})


@functools.lru_cache(maxsize=None)
def _tag_vr(keyword: str) -> tuple[int, str]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag, dictionary_VR(tag)


def _plain(ds: Dataset, keyword: str) -> str | None:
    """The value's text read from its bytes, when it is a plain one of a text VR still
    unconverted (the common case, about 10x quicker than pydicom's conversion); None: ask
    pydicom."""
    tag, vr = _tag_vr(keyword)
    if vr not in _TEXT_VRS:
        return None
    try:
        raw = ds.get_item(tag, keep_deferred=True)
    except Exception:   # noqa: BLE001 - pydicom's way says what is wrong
        return None
    if raw is None:
        return ""   # absent: as _text and _int say
    if not isinstance(raw, RawDataElement) or raw.VR not in (None, vr):
        return None
    value = raw.value
    if not isinstance(value, bytes) or not _PLAIN.match(value):
        return None
    if vr == "PN" and b"=" in value:   # pydicom drops empty trailing component groups
        return None
    if vr == "IS" and b"\x00" in value:   # not a number to pydicom
        return None
    return value.replace(b"\x00", b"").decode("ascii").strip()


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str:
    text = _plain(ds, keyword)
    if text is not None:
        return text[:limit]
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
    text = _plain(ds, keyword)
    if text == "":
        return None
    if text is not None and text.lstrip("+-").isdigit():
        return int(text)
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
