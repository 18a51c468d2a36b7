"""The values the index keeps, read from the bytes of a plain value (pacsd.imaging.header
_plain, the quick way) or through pydicom's conversion: the same Record, whatever the bytes.

Data sets are encoded here by hand (explicit and implicit VR little endian), so that values
pydicom would refuse to write (letters in an IS, backslashes, NULs, spaces anywhere, bytes of
other character sets) reach the reader as a modality could send them."""

from __future__ import annotations

import random
import struct

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword

from pacsd.errors import InvalidDataset
from pacsd.imaging import header

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
LONG_LENGTH = {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV"}

TEXT = ["PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
        "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
        "ReferringPhysicianName", "InstitutionName", "PatientAge", "Modality",
        "SeriesDescription", "SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName",
        "StationName", "ContentDate", "ContentTime"]
NUMBERS = ["SeriesNumber", "InstanceNumber", "AcquisitionNumber", "NumberOfFrames"]
CHARSETS = [b"", b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 6", b"\\ISO 2022 IR 87", b"GB18030"]
PIECES = [b"DOE", b"^", b"=", b" ", b"  ", b"\\", b"\x00", b"12", b"+7", b"-3", b"007", b"1.5",
          b"2024", b"0101", b"CT", b"abc", b"\xe9", b"\xc3\xa9", b"\x1b$B", b"~", b".", b"\t"]


def element(tag: int, vr: str, value: bytes, explicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG_LENGTH:
        return head + vr.encode() + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def dataset(rng: random.Random, explicit: bool) -> bytes:
    uid = f"1.2.826.0.1.3680043.9.7{rng.randrange(10**6)}"
    values: dict[str, tuple[str, bytes]] = {
        "SOPClassUID": ("UI", b"1.2.840.10008.5.1.4.1.1.2"),
        "SOPInstanceUID": ("UI", (uid + ".1").encode()),
        "StudyInstanceUID": ("UI", (uid + ".2").encode()),
        "SeriesInstanceUID": ("UI", (uid + ".3").encode()),
        "Rows": ("US", struct.pack("<H", rng.randrange(1, 600))),
        "Columns": ("US", struct.pack("<H", rng.randrange(1, 600))),
    }
    charset = rng.choice(CHARSETS)
    if charset:
        values["SpecificCharacterSet"] = ("CS", charset)
    for kw in rng.sample(TEXT + NUMBERS, rng.randrange(len(TEXT + NUMBERS) + 1)):
        vr = dictionary_VR(tag_for_keyword(kw))
        if explicit and rng.random() < 0.05:
            vr = rng.choice(["UN", "LO"])   # a VR other than the dictionary's
        value = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(5)))
        if kw in NUMBERS and rng.random() < 0.6:
            value = rng.choice([b"", b" ", b"0", b"12 ", b" 3", b"+4", b"-5", b"0010"])
        values[kw] = (vr, value[:64])
    return b"".join(element(tag_for_keyword(kw), vr, v, explicit)
                    for kw, (vr, v) in sorted(values.items(),
                                              key=lambda kv: tag_for_keyword(kv[0])))


def record(data: bytes, ts: str, quick: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        if not quick:
            m.setattr(header, "_plain", lambda ds, keyword: None)   # pydicom's way only
        try:
            return header.check_and_extract(header.read_dataset_header(data, ts)).values
        except InvalidDataset as e:
            return f"refused: {e}"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
def test_plain_values_read_from_their_bytes_are_pydicom_s(ts, monkeypatch):
    rng = random.Random(20261207 + len(ts))
    quick_taken = 0
    for _ in range(400):
        data = dataset(rng, ts == EXPLICIT)
        expected = record(data, ts, False, monkeypatch)
        assert record(data, ts, True, monkeypatch) == expected, data
        quick_taken += isinstance(expected, dict)
    assert quick_taken > 300   # most of them indexable, so the comparison is about values


def test_the_quick_way_is_taken_for_plain_values_only():
    ds = header.read_dataset_header(
        element(0x00100010, "PN", b"DOE^JOHN ", True)
        + element(0x00100020, "LO", b"A\\B", True)
        + element(0x00200011, "IS", b" 12", True), EXPLICIT)
    assert header._plain(ds, "PatientName") == "DOE^JOHN"
    assert header._plain(ds, "PatientID") is None          # two values: pydicom's way
    assert header._plain(ds, "SeriesNumber") == "12"
    assert header._plain(ds, "StudyDescription") == ""     # absent
