"""C-FIND matching (PS3.4 C.2.2.2) against a real server, with pynetdicom as SCU; every test
on each index backend (SQLite, PostgreSQL)."""

from __future__ import annotations

import pytest
from conftest import c_find as find
from conftest import postgres_database, store_files, write_config
from data import ct_slice, sample, uid
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend_url(request, tmp_path_factory):
    """Each index backend in turn, for the whole module (conftest's `index_url` is per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('find-index') / 'index.sqlite3'}"
        return
    with postgres_database(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture(scope="module")
def archive(tmp_path_factory, backend_url):
    """A server holding: 3 patients; patient 1 has a CT+MR study in January 2024 and a CT study in
    2023; patient 2 a CT study in February 2024; patient 3 (Japanese name, ISO 2022 IR 87)."""
    from pacsd import config
    from pacsd.daemon.server import Server

    tmp = tmp_path_factory.mktemp("find")
    cfg = write_config(tmp / "c.toml", tmp / "data", index={"url": backend_url})
    server = Server(config.load(cfg, env={})).start()
    assert server.index is not None and server.index.url == backend_url
    files = []
    specs = [  # patient, study, series, images, modality, date
        (1, 1, 1, 3, "CT", "20240115"), (1, 1, 2, 2, "MR", "20240115"),
        (1, 2, 1, 4, "CT", "20230610"), (2, 1, 1, 5, "CT", "20240203")]
    for p, st, se, n, mod, date in specs:
        for i in range(1, n + 1):
            ds = ct_slice(seed=7, patient=p, study=st, series=se, number=i, size=8,
                          modality=mod, study_date=date)
            path = tmp / f"{p}-{st}-{se}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    files.append(sample("chrH31.dcm"))
    files.append(sample("chrX1.dcm"))
    assert store_files(server.dicom_port, files) == [0] * len(files)
    yield server
    server.stop()


def test_study_level_returns_one_response_per_study_with_counts(archive):
    status, ms = find(archive.dicom_port, "STUDY", StudyInstanceUID="", PatientID="PID7-001",
                      NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="",
                      ModalitiesInStudy="", StudyDate="")
    assert status == 0
    by_date = {m.StudyDate: m for m in ms}
    assert sorted(by_date) == ["20230610", "20240115"]
    jan = by_date["20240115"]
    assert (jan.NumberOfStudyRelatedInstances, jan.NumberOfStudyRelatedSeries) == (5, 2)
    assert list(jan.ModalitiesInStudy) == ["CT", "MR"]
    assert by_date["20230610"].ModalitiesInStudy == "CT"
    assert all(m.QueryRetrieveLevel == "STUDY" and m.RetrieveAETitle == "PACSD" for m in ms)
    # Every value returned is ASCII: no Specific Character Set (PS3.4 C.4.1.1.3.2).
    assert not any("SpecificCharacterSet" in m for m in ms)


@pytest.mark.parametrize("pattern,expected", [
    ("test^patient00*", {"PID7-001", "PID7-002"}),     # case-insensitive, wildcard
    ("TEST^PATIENT002", {"PID7-002"}),                 # single value, other case
    ("?est^Patient001", {"PID7-001"}),
    ("*002", {"PID7-002"}),
    ("Nobody*", set()),
])
def test_person_name_matching(archive, pattern, expected):
    _, ms = find(archive.dicom_port, "STUDY", PatientName=pattern, PatientID="")
    assert {m.PatientID for m in ms} == expected


@pytest.mark.parametrize("dates,expected", [
    ("20240101-20240131", {"20240115"}),
    ("-20231231", {"20230610"}),
    ("20240201-", {"20240203"}),
    ("20240115", {"20240115"}),
    ("2024.01.01-2024.12.31", {"20240115", "20240203"}),   # ACR-NEMA style dates
])
def test_date_range_matching(archive, dates, expected):
    _, ms = find(archive.dicom_port, "STUDY", StudyDate=dates, PatientID="PID7*")
    assert {m.StudyDate for m in ms} == expected


def test_uid_list_and_modalities_in_study(archive):
    a, b = uid(7, 1, 1, "study"), uid(7, 2, 1, "study")
    _, ms = find(archive.dicom_port, "STUDY", StudyInstanceUID=f"{a}\\{b}")
    assert {m.StudyInstanceUID for m in ms} == {a, b}
    _, ms = find(archive.dicom_port, "STUDY", ModalitiesInStudy="MR", StudyInstanceUID="")
    assert [m.StudyInstanceUID for m in ms] == [a]
    _, ms = find(archive.dicom_port, "STUDY", ModalitiesInStudy=["MR", "CT"], PatientID="PID7*")
    assert len(ms) == 3


def test_series_and_image_levels(archive):
    study = uid(7, 1, 1, "study")
    _, series = find(archive.dicom_port, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="",
                     Modality="", NumberOfSeriesRelatedInstances="", SeriesNumber="")
    assert sorted((s.Modality, s.NumberOfSeriesRelatedInstances) for s in series) == [
        ("CT", 3), ("MR", 2)]
    mr = next(s for s in series if s.Modality == "MR")
    _, images = find(archive.dicom_port, "IMAGE", StudyInstanceUID=study,
                     SeriesInstanceUID=mr.SeriesInstanceUID, SOPInstanceUID="",
                     InstanceNumber="", SOPClassUID="")
    assert sorted(i.InstanceNumber for i in images) == [1, 2]
    _, ct_only = find(archive.dicom_port, "SERIES", StudyInstanceUID=study, Modality="CT")
    assert len(ct_only) == 1


def test_patient_root_patient_level(archive):
    _, ms = find(archive.dicom_port, "PATIENT", PATIENT_ROOT, PatientID="PID7-001",
                 PatientName="", NumberOfPatientRelatedStudies="",
                 NumberOfPatientRelatedInstances="")
    assert len(ms) == 1
    assert (ms[0].NumberOfPatientRelatedStudies, ms[0].NumberOfPatientRelatedInstances) == (2, 9)
    assert str(ms[0].PatientName) == "Test^Patient001"


def test_patient_level_is_refused_in_study_root(archive):
    status, ms = find(archive.dicom_port, "PATIENT", STUDY_ROOT, PatientID="")
    assert (status, ms) == (0xA900, [])


def test_unknown_keys_come_back_empty(archive):
    _, ms = find(archive.dicom_port, "STUDY", PatientID="PID7-002", OperatorsName="",
                 StudyDescription="")
    assert len(ms) == 1
    assert "OperatorsName" in ms[0] and ms[0].OperatorsName == ""
    assert ms[0].StudyDescription == "CT CHEST 1"


@pytest.mark.parametrize("name,pattern", [
    ("chrH31.dcm", "Yamada*"), ("chrX1.dcm", "wang*"),
    ("chrH31.dcm", "YAMADA^TAROU"),        # the alphabetic group alone, exactly
    ("chrX1.dcm", "*^xiaodong")])
def test_non_ascii_names_come_back_intact(archive, name, pattern):
    from pydicom import dcmread
    original = dcmread(sample(name))
    # A query that names no character set gets non-ASCII values in UTF-8 (C.4.1.1.3.2) ...
    _, ms = find(archive.dicom_port, "STUDY", PatientName=pattern)
    assert len(ms) == 1
    assert ms[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(ms[0].PatientName) == str(original.PatientName)
    # ... and one that asks for the stored character set gets them in it.
    _, ms = find(archive.dicom_port, "STUDY", PatientName=pattern,
                 SpecificCharacterSet=original.SpecificCharacterSet)
    assert len(ms) == 1
    assert ms[0].SpecificCharacterSet == original.SpecificCharacterSet
    assert str(ms[0].PatientName) == str(original.PatientName)
