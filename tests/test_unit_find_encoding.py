"""pacsd.dimse.find.Match: a C-FIND match written by pacsd is, byte for byte, what pydicom
writes for the same response Dataset, in both little endian syntaxes; where pacsd does not write
it (another character set, a binary VR, big endian, deflate), it says so and pydicom does."""

from __future__ import annotations

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from pacsd.dimse.find import Match

pytestmark = pytest.mark.unit


def requested(*elements: tuple[str, str]) -> list[DataElement]:
    ds = Dataset()
    for keyword, vr in elements:
        ds.add_new(keyword, vr, None)
    ds.QueryRetrieveLevel = "STUDY"
    return [e for e in ds]


STUDY_KEYS = requested(("PatientName", "PN"), ("PatientID", "LO"), ("StudyInstanceUID", "UI"),
                       ("StudyDate", "DA"), ("StudyTime", "TM"), ("AccessionNumber", "SH"),
                       ("ModalitiesInStudy", "CS"), ("NumberOfStudyRelatedInstances", "IS"),
                       ("StudyDescription", "LO"), ("ReferencedStudySequence", "SQ"),
                       ("InstitutionName", "LO"), ("PatientSex", "CS"))
CASES = [
    {"PatientName": "DOE^JOHN", "PatientID": "P1", "StudyInstanceUID": "1.2.3.4",
     "StudyDate": "20240102", "StudyTime": "101500", "AccessionNumber": "A7",
     "ModalitiesInStudy": "CT\\SR", "NumberOfStudyRelatedInstances": 120,
     "StudyDescription": "CHEST", "PatientSex": "M"},
    {"PatientName": "Müller^Jürgen", "PatientID": "P2", "StudyInstanceUID": "1.2.34",
     "StudyDate": "", "ModalitiesInStudy": "MR"},                        # UTF-8, odd UID
    {"PatientName": "山田^太郎", "PatientID": "odd", "StudyInstanceUID": "1.2.3"},
    {},                                                                   # nothing known
]


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("match", CASES)
def test_the_same_bytes_as_pydicom(match, implicit):
    m = Match(STUDY_KEYS, dict(match), "STUDY", "PACSD", [])
    ours = m.pacsd_encoded(implicit, True, False)
    assert ours is not None
    assert ours == encode(m.dataset(), implicit, True, False)


def test_an_int_vr_and_the_charset_asked_for():
    keys = requested(("PatientName", "PN"), ("NumberOfFrames", "IS"), ("Rows", "US"))
    m = Match(keys, {"PatientName": "Ñandú", "Rows": 512}, "IMAGE", "PACSD", ["ISO_IR 192"])
    assert m.pacsd_encoded(False, True, False) == encode(m.dataset(), False, True, False)


@pytest.mark.parametrize("match, asked, syntax", [
    ({"PatientName": "Müller"}, ["ISO_IR 100"], (False, True, False)),   # Latin-1 asked: pydicom
    ({"PatientName": "DOE"}, [], (False, False, False)),                 # big endian
    ({"PatientName": "DOE"}, [], (False, True, True)),                   # deflated
])
def test_what_pacsd_leaves_to_pydicom(match, asked, syntax):
    m = Match(requested(("PatientName", "PN")), match, "PATIENT", "PACSD", asked)
    assert m.pacsd_encoded(*syntax) is None
    assert m.dataset().PatientName == match["PatientName"]


def test_an_ambiguous_vr_is_left_to_pydicom():
    ds = Dataset()
    ds.add_new(0x00281101, "US or SS", None)   # Red Palette Color Lookup Table Descriptor
    m = Match([e for e in ds], {}, "IMAGE", "PACSD", [])
    assert m.pacsd_encoded(False, True, False) is None


def test_a_binary_value_is_left_to_pydicom():
    m = Match(requested(("PixelSpacing", "DS"), ("WindowCenter", "DS"),
                        ("RealWorldValueLastValueMapped", "FD")),
              {"RealWorldValueLastValueMapped": 4.5}, "IMAGE", "PACSD", [])
    assert m.pacsd_encoded(True, True, False) is None
