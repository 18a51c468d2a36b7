"""Character sets in C-FIND responses (PS3.5 6.1): values come back as they were stored."""

from __future__ import annotations

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from conftest import associate, store_files
from data import ct_slice, sample


def test_values_that_the_study_charset_cannot_carry_come_back_in_utf8(make_server, tmp_path):
    server = make_server()
    chinese = dcmread(sample("chrX1.dcm"))   # ISO_IR 192, "Wang^XiaoDong=王^小東"
    # A later study of the same patient, sent in Latin-1: the patient's name (kept from the
    # first study) cannot be written in ISO_IR 100.
    later = ct_slice(seed=31, patient=1, study=1, series=1, number=1, size=4)
    later.PatientID = chinese.PatientID
    later.PatientName = "Wang^XiaoDong"
    later.SpecificCharacterSet = "ISO_IR 100"
    later.StudyDescription = "Épaule"
    path = tmp_path / "later.dcm"
    later.save_as(path, enforce_file_format=True)
    assert store_files(server.dicom_port, [sample("chrX1.dcm"), path]) == [0, 0]

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = later.StudyInstanceUID
    q.PatientName = ""
    q.StudyDescription = ""
    with associate(server.dicom_port, [build_context(FIND)]) as assoc:
        [(status, match), _] = list(assoc.send_c_find(q, FIND))
    assert status.Status == 0xFF00
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert str(match.PatientName) == str(chinese.PatientName)
    assert match.StudyDescription == "Épaule"
