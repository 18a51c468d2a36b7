"""Patient safety on ingest, against a real `pacsd serve` with pynetdicom and DCMTK's storescu.

- An image of patient C that carries patient A's Study Instance UID (or A's Series Instance
  UID) is never filed under A with a silent Success: refused (0xC40A) by default, with one
  WARNING that names both sides (the study, the patient of record by index row; the Patient IDs
  only at DEBUG); `[storage] patient_mismatch = "accept"` files it with warning 0xB000.
- An image that reuses a stored SOP Instance UID with other content is refused (0x0111), its
  bytes kept aside in STORAGE/.conflicts (nothing handed over is lost), one WARNING names both
  copies, and storage commitment reports that instance as failed (0x0110); an identical re-send
  is a Success (a duplicate) and is committed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from conftest import LOCAL, c_find, dcmtk, run_peer, serve, store_files, wait_for, write_config
from data import ct_slice
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from reliability.storm import indexed_rows
from test_commitment import Modality, action_info, items_of, request
from test_dicomweb import multipart_body

MISMATCH = 0xC40A
CONFLICT = 0x0111


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def patient_c_in_study_of_a(a: Dataset, number: int, same_series: bool) -> Dataset:
    """Patient C's image, carrying A's Study Instance UID (and A's series UID if asked)."""
    c = ct_slice(seed=61, patient=3, study=1, series=1, number=number, size=32)
    c.StudyInstanceUID = a.StudyInstanceUID
    if same_series:
        c.SeriesInstanceUID = a.SeriesInstanceUID
    return c


def storescu(port: int, path: Path) -> str:
    proc = run_peer([dcmtk("storescu"), "-v", "-nh", "-aet", "MODALITY", "-aec", "PACSD", LOCAL,
                     str(port), str(path)], check=False)
    return proc.stdout + proc.stderr


def stow(url: str, paths: list[Path]) -> requests.Response:
    body, ctype = multipart_body([p.read_bytes() for p in paths])
    return requests.post(url + "/dicom-web/studies", data=body, timeout=30,
                         headers={"Content-Type": ctype})


def reasons(r: requests.Response, seq: str, key: str) -> list[int]:
    return [int(i[key].value) for i in Dataset.from_json(r.json()).get(seq, []) if key in i]


def warnings_naming(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text().splitlines()
            if text in line and "WARNING" in line]


@pytest.mark.timeout(120)
def test_an_image_of_another_patient_is_never_filed_silently_under_a_known_study(tmp_path):
    a = ct_slice(seed=61, patient=1, study=1, series=1, number=1, size=32)
    a_file = save(a, tmp_path / "a.dcm")
    c_new_series = save(patient_c_in_study_of_a(a, 1, same_series=False), tmp_path / "c1.dcm")
    c_same_series = save(patient_c_in_study_of_a(a, 2, same_series=True), tmp_path / "c2.dcm")
    c_by_dcmtk = save(patient_c_in_study_of_a(a, 3, same_series=False), tmp_path / "c3.dcm")
    c_by_stow = save(patient_c_in_study_of_a(a, 4, same_series=True), tmp_path / "c4.dcm")
    data = tmp_path / "pacsd"
    with serve(write_config(tmp_path / "pacsd.toml", data, log={"file": "-", "level": "INFO"}),
               data) as proc:
        assert store_files(proc.port, [a_file]) == [0x0000]
        # A new series of C in A's study, and C in A's very series (the writer's cached path).
        assert store_files(proc.port, [c_new_series, c_same_series]) == [MISMATCH, MISMATCH]
        out = storescu(proc.port, c_by_dcmtk)
        assert "Received Store Response (Error: CannotUnderstand)" in out, out   # Cxxx
        r = stow(proc.http_url, [c_by_stow])
        assert r.status_code == 409, r.text
        assert reasons(r, "FailedSOPSequence", "FailureReason") == [MISMATCH]

        # Nothing of C was filed under A: the study still holds A's one image.
        status, found = c_find(proc.port, "STUDY", StudyInstanceUID=a.StudyInstanceUID,
                               NumberOfStudyRelatedInstances="", PatientID="")
        assert [(str(d.PatientID), int(d.NumberOfStudyRelatedInstances)) for d in found] == \
            [(a.PatientID, 1)]
        assert set(indexed_rows(data)) == {a.SOPInstanceUID}
        # One WARNING per refused image, naming the study and the patient of record (by its
        # index row); no Patient ID at WARNING.
        text = proc.log.read_text()
        for c in (c_new_series, c_same_series, c_by_dcmtk, c_by_stow):
            uid = str(dcmread(c).SOPInstanceUID)
            lines = warnings_naming(proc.log, uid)
            assert len(lines) == 1, lines
            assert "filed under patient #" in lines[0] and str(a.StudyInstanceUID) in lines[0]
        assert str(a.PatientID) not in text and "PID61-003" not in text


@pytest.mark.timeout(120)
def test_accepting_a_patient_mismatch_is_a_warning_not_a_success(tmp_path):
    a = ct_slice(seed=62, patient=1, study=1, series=1, number=1, size=32)
    files = [save(a, tmp_path / "a.dcm"),
             save(patient_c_in_study_of_a(a, 1, same_series=False), tmp_path / "c1.dcm")]
    stow_file = save(patient_c_in_study_of_a(a, 2, same_series=True), tmp_path / "c2.dcm")
    data = tmp_path / "pacsd"
    with serve(write_config(tmp_path / "pacsd.toml", data,
                            storage={"patient_mismatch": "accept"}), data) as proc:
        assert store_files(proc.port, files) == [0x0000, 0xB000]
        r = stow(proc.http_url, [stow_file])
        assert r.status_code == 202, r.text
        assert reasons(r, "ReferencedSOPSequence", "WarningReason") == [0xB000]
        uid = str(dcmread(files[1]).SOPInstanceUID)
        [line] = warnings_naming(proc.log, uid)
        assert "0xB000" in line and "filed under patient #" in line


@pytest.mark.timeout(120)
def test_other_content_under_a_stored_uid_is_refused_kept_aside_and_never_committed(tmp_path):
    modality = Modality().start()
    try:
        x = ct_slice(seed=63, patient=1, study=1, series=1, number=1, size=32)
        y = ct_slice(seed=63, patient=1, study=1, series=1, number=2, size=32)
        x_file, y_file = save(x, tmp_path / "x.dcm"), save(y, tmp_path / "y.dcm")
        x.PixelData = bytes(len(x.PixelData))            # same UIDs, other pixels
        x_other = save(x, tmp_path / "x-other.dcm")
        x.PixelData = b"\x01" * len(x.PixelData)
        x_other_dcmtk = save(x, tmp_path / "x-other-dcmtk.dcm")
        x.PixelData = b"\x02" * len(x.PixelData)
        x_other_stow = save(x, tmp_path / "x-other-stow.dcm")
        data = tmp_path / "pacsd"
        with serve(write_config(tmp_path / "pacsd.toml", data, nodes=[modality.node()]),
                   data) as proc:
            assert store_files(proc.port, [x_file, y_file], aet="MODALITY") == [0, 0]
            kept = dict(indexed_rows(data))
            # Identical re-send (another association): a Success, stored once.
            assert store_files(proc.port, [y_file], aet="MODALITY") == [0x0000]
            # Other content under X's UID: not a Success, by pynetdicom, storescu and STOW.
            assert store_files(proc.port, [x_other], aet="MODALITY") == [CONFLICT]
            out = storescu(proc.port, x_other_dcmtk)
            assert "Received Store Response (Unknown Status: 0x111)" in out, out
            r = stow(proc.http_url, [x_other_stow])
            assert r.status_code == 409, r.text
            assert reasons(r, "FailedSOPSequence", "FailureReason") == [CONFLICT]
            # The stored copy is unchanged; each new copy is kept aside, not lost.
            assert dict(indexed_rows(data)) == kept
            storage = data / "storage"
            aside = sorted((storage / ".conflicts").rglob("*.dcm"))
            assert len(aside) == 3
            assert sorted(dcmread(p).PixelData for p in aside) == sorted(
                dcmread(p).PixelData for p in (x_other, x_other_dcmtk, x_other_stow))
            lines = warnings_naming(proc.log, str(x.SOPInstanceUID))
            assert len(lines) == 3, lines
            assert all("other content" in line and "kept aside as .conflicts/" in line
                       and kept[str(x.SOPInstanceUID)] in line for line in lines)

            # Storage commitment: X failed (0x0110), Y committed.
            cls = str(x.SOPClassUID)
            transaction = generate_uid()
            status, _ = request(proc.port, action_info(
                transaction, [(cls, str(x.SOPInstanceUID)), (cls, str(y.SOPInstanceUID))]))
            assert int(status.Status) == 0x0000
            report = modality.reports.get(timeout=15)
            assert report.info.TransactionUID == transaction
            assert report.event_type == 2
            assert items_of(report.info.ReferencedSOPSequence) == [(cls, str(y.SOPInstanceUID))]
            assert items_of(report.info.FailedSOPSequence) == [
                (cls, str(x.SOPInstanceUID), 0x0110)]
            wait_for(lambda: "content disputed" in proc.log.read_text(), 5, "the summary line")
    finally:
        modality.close()
