"""Character sets in C-FIND responses (PS3.5 6.1): values come back as they were stored."""

from __future__ import annotations

import subprocess
import urllib.error

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from conftest import LOCAL, associate, dcmtk, free_port, peer_env, store_files
from data import ct_slice, sample
from orthanc import orthanc


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


# --- PS3.4 C.4.1.1.3.2: Specific Character Set only when a value needs one ------------------

H31 = "chrH31.dcm"   # stored as \ISO 2022 IR 87, "Yamada^Tarou=山田^太郎=やまだ^たろう"


def _study_find(port: int, charset: str | None = None, **keys: str) -> Dataset:
    q = Dataset()
    if charset is not None:
        q.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    q.QueryRetrieveLevel = "STUDY"
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(port, [build_context(FIND)]) as assoc:
        [(status, match), (final, _)] = list(assoc.send_c_find(q, FIND))
    assert status.Status == 0xFF00 and final.Status == 0x0000
    return match


def test_an_ascii_answer_carries_no_character_set(make_server):
    """A study stored as ISO 2022 IR 87, asked only for ASCII values: no (0008,0005) in the
    answer ("shall not be included otherwise"), whatever the query or the study said."""
    server = make_server()
    original = dcmread(sample(H31))
    assert store_files(server.dicom_port, [sample(H31)]) == [0]
    for charset in (None, "ISO_IR 100", "\\ISO 2022 IR 87", "ISO_IR 192"):
        match = _study_find(server.dicom_port, charset, PatientID=original.PatientID,
                            StudyInstanceUID="", StudyDate="")
        assert "SpecificCharacterSet" not in match, charset
        assert match.StudyInstanceUID == original.StudyInstanceUID


def test_non_ascii_answers_come_in_the_asked_character_set_else_utf8(make_server):
    server = make_server()
    original = dcmread(sample(H31))
    assert store_files(server.dicom_port, [sample(H31)]) == [0]
    for charset, expected in [("\\ISO 2022 IR 87", ["", "ISO 2022 IR 87"]),
                              ("ISO_IR 192", "ISO_IR 192"),
                              ("ISO_IR 100", "ISO_IR 192"),    # Latin-1 cannot carry kanji
                              (None, "ISO_IR 192"),            # nor the default repertoire
                              ("NOT A CHARSET", "ISO_IR 192")]:
        match = _study_find(server.dicom_port, charset, PatientID=original.PatientID,
                            PatientName="")
        assert match.SpecificCharacterSet == expected, charset
        assert str(match.PatientName) == str(original.PatientName), charset


def test_findscu_ascii_answer_from_an_iso2022_study(make_server, tmp_path):
    """DCMTK's findscu, the query naming no character set: an ASCII-only answer has none."""
    server = make_server()
    original = dcmread(sample(H31))
    assert store_files(server.dicom_port, [sample(H31)]) == [0]
    out = tmp_path / "rsp"
    out.mkdir()
    proc = subprocess.run(
        [dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-aec", "PACSD", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={original.PatientID}",
         "-k", "StudyInstanceUID", LOCAL, str(server.dicom_port)],
        env=peer_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [rsp] = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert rsp.StudyInstanceUID == original.StudyInstanceUID
    assert "SpecificCharacterSet" not in rsp


# --- Orthanc 1.10 as the C-FIND SCU ------------------------------------------------------------

def test_orthanc_queries_an_iso2022_study(make_server, tmp_path):
    """Orthanc 1.10 (its REST /modalities/{id}/query) rejected every answer that named
    \\ISO 2022 IR 87 while carrying ASCII only; the Japanese name itself comes back too."""
    dicom = free_port()
    server = make_server(nodes=[{"name": "orthanc", "aet": "ORTHANC", "host": LOCAL,
                                 "port": dicom}])
    original = dcmread(sample(H31))
    assert store_files(server.dicom_port, [sample(H31)]) == [0]
    # Its queries then ask for ISO_IR 192; with its default (Latin1) it asks for ISO_IR 100,
    # gets UTF-8 answers (Latin-1 cannot carry kanji) and keeps their Latin-1 part.
    with orthanc(tmp_path / "orthanc", dicom_port=dicom, DefaultEncoding="Utf8",
                 DicomModalities={"pacsd": {"AET": "PACSD", "Host": LOCAL,
                                            "Port": server.dicom_port}}) as peer:

        def answers(query: dict) -> list[dict]:
            try:
                job = peer.rest_json("/modalities/pacsd/query", {"Level": "Study",
                                                                 "Query": query})
            except urllib.error.HTTPError as e:
                raise AssertionError(f"Orthanc's query failed: {e.read()[:500]!r}") from None
            count = len(peer.rest_json(f"{job['Path']}/answers"))
            return [peer.rest_json(f"{job['Path']}/answers/{i}/content?simplify")
                    for i in range(count)]

        ascii_only = answers({"PatientID": original.PatientID, "StudyInstanceUID": "",
                              "StudyDate": ""})
        named = answers({"PatientID": original.PatientID, "PatientName": ""})
    assert [a["StudyInstanceUID"] for a in ascii_only] == [original.StudyInstanceUID]
    assert [a["PatientName"] for a in named] == [str(original.PatientName)]
