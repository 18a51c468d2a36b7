"""Corrections (pacsd.storage.corrections) against a real server, from the command line and the
JSON API: patient update and merge, study update and move, series move; DCMTK's findscu,
pynetdicom's C-FIND and C-GET and QIDO-RS see the new values at once, in the files too; the
previous versions wait in the recycle bin and `pacsd undo` brings them back byte for byte; a
kill in the middle of a correction leaves each instance in one version, never both nor neither."""

from __future__ import annotations

import hashlib
import io
import random
import re
import signal
import sqlite3
import subprocess
import time
import xmlrpc.client
import zipfile
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PatientRootFind

from conftest import (LOCAL, c_find, c_get, dcmtk, pacsd_cmd, run_peer, store_files,
                      write_config)
from data import write_series
from pacsd.web.auth import hash_password
from reliability.storm import kill_command_midway, start
from test_retrieve import dest, move  # noqa: F401 - dest is a fixture

H = {"X-Requested-With": "pacsd"}
BOSS = ("boss", "boss-password")
USERS = [{"name": "boss", "password_hash": hash_password("boss-password"), "admin": True},
         {"name": "reader", "password_hash": hash_password("reader-password")}]


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd(*args, "--config", str(config)), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def live_files(storage: Path) -> dict[str, str]:
    return {p.relative_to(storage).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in storage.rglob("*.dcm")
            if not {".trash", ".tmp"} & set(p.relative_to(storage).parts)}


def dcmtk_names(port: int, patient_id: str) -> list[str]:
    """The Patient's Name values DCMTK's findscu gets for a Patient ID (PATIENT level)."""
    proc = run_peer([dcmtk("findscu"), "-v", "-P", "-aec", "PACSD",
                     "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={patient_id}",
                     "-k", "PatientName", LOCAL, str(port)])
    text = proc.stdout + proc.stderr
    return [m.group(1).strip() for m in re.finditer(r"\(0010,0010\) PN \[([^\]]*)\]", text)]


def test_patient_update_is_seen_everywhere_and_undone_byte_for_byte(make_server, tmp_path,
                                                                    dest):
    server = make_server(users=USERS, nodes=[{"name": "viewer", "aet": "DEST", "host": LOCAL,
                                              "port": dest.port}])
    files = write_series(tmp_path / "in", seed=61, studies=2, series=2, images=2, size=16)
    assert store_files(server.dicom_port, files) == [0] * 8
    first = dcmread(files[0])
    pid, old_name = str(first.PatientID), str(first.PatientName)
    storage, config = server.cfg.storage_path, Path(server.cfg.source)
    before = live_files(storage)
    assert dcmtk_names(server.dicom_port, pid) == [old_name]

    out = cli(config, "patient", "update", pid, "--name", "Müller^Anna", "--birth-date",
              "19700102", "--sex", "F")
    assert out.returncode == 0 and "8 instance(s) rewritten" in out.stdout, out.stderr
    # At once, for every client: DCMTK, pynetdicom, QIDO-RS, and the files themselves.
    assert dcmtk_names(server.dicom_port, pid) == ["Müller^Anna"]
    status, [match] = c_find(server.dicom_port, "STUDY", StudyInstanceUID=str(
        first.StudyInstanceUID), PatientName="", PatientBirthDate="", PatientSex="")
    assert (str(match.PatientName), match.PatientBirthDate, match.PatientSex) == \
        ("Müller^Anna", "19700102", "F")
    qido = requests.get(f"{server.http_url}/dicom-web/studies", params={"PatientID": pid},
                        auth=BOSS, timeout=30).json()
    assert len(qido) == 2 and all(s["00100010"]["Value"][0]["Alphabetic"] == "Müller^Anna"
                                  for s in qido)
    final, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "STUDY",
                                           "StudyInstanceUID": str(first.StudyInstanceUID)},
                       CTImageStorage, ExplicitVRLittleEndian)
    assert final == 0 and len(got) == 4
    # C-MOVE sends the corrected files.
    statuses = move(server.dicom_port, "DEST", "STUDY",
                    StudyInstanceUID=str(first.StudyInstanceUID))
    assert statuses[-1].Status == 0 and len(dest.received) == 4
    assert all("Müller^Anna".encode("utf-8") in body for _, body in dest.received.values())
    rpc = xmlrpc.client.ServerProxy(server.http_url.replace("://", "://boss:boss-password@")
                                    + "/RPC2")
    answer = rpc.DBWindowFind({"request": f"patientID == '{pid}'", "table": "Study",
                               "execute": "Select"})
    assert {e["name"] for e in answer["elements"]} == {"Müller Anna"}   # OsiriX's spelling
    zipped = requests.get(f"{server.http_url}/api/studies/{first.StudyInstanceUID}/zip",
                          auth=BOSS, timeout=30)
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as z:
        names = {str(dcmread(io.BytesIO(z.read(n))).PatientName) for n in z.namelist()
                 if not n.endswith("DICOMDIR") and n.upper().startswith(("DICOM", "IM"))
                 or n.endswith(".dcm")}
    assert names == {"Müller^Anna"}
    now = live_files(storage)
    assert len(now) == 8 and not set(now) & set(before)   # new versions, new files
    for rel in now:
        ds = dcmread(storage / rel)
        assert (str(ds.PatientName), ds.PatientBirthDate, ds.SOPInstanceUID in {
            str(dcmread(f).SOPInstanceUID) for f in files}) == ("Müller^Anna", "19700102", True)
    # The counts did not move; the previous versions are in the bin, as one change.
    assert server.index.counts()["instances"] == 8
    [entry] = server.index.bin_entries()
    assert (entry.action, entry.instances) == ("patient update", 8)
    [change] = server.index.history(pid)
    assert change.detail["before"]["PatientName"] == old_name
    assert change.detail["after"]["PatientName"] == "Müller^Anna"

    # Undo: the very files of before, at their paths.
    out = cli(config, "undo", pid)
    assert out.returncode == 0 and "8 instance(s) rewritten" in out.stdout, out.stderr
    assert live_files(storage) == before
    assert dcmtk_names(server.dicom_port, pid) == [old_name]
    assert [e.action for e in server.index.bin_entries()] == ["undo"]
    # Nothing more to undo; the history tells it all.
    out = cli(config, "undo", pid)
    assert out.returncode == 1 and "nothing to undo" in out.stderr
    assert [h.action for h in server.index.history(pid)] == ["undo", "patient update"]


def test_merge_and_moves_through_the_json_api(make_server, tmp_path):
    server = make_server(users=USERS)
    a = write_series(tmp_path / "a", seed=62, patients=1, studies=2, series=1, images=2,
                     size=16)
    b = write_series(tmp_path / "b", seed=63, patients=1, studies=1, series=2, images=2,
                     size=16)
    assert store_files(server.dicom_port, a + b) == [0] * 8
    da, db = dcmread(a[0]), dcmread(b[0])
    url = server.http_url

    def post(path: str, body: dict, auth=BOSS) -> requests.Response:
        return requests.post(url + path, json=body, headers=H, auth=auth, timeout=60)

    assert post(f"/api/patients/{da.PatientID}/update", {"changes": {"PatientName": "X"}},
                auth=("reader", "reader-password")).status_code == 403
    # Merge: every study of A filed under B, with B's demographics.
    r = post("/api/patients/merge", {"from": str(da.PatientID), "into": str(db.PatientID)})
    assert r.status_code == 200 and r.json()["instances"] == 4, r.text
    assert c_find(server.dicom_port, "STUDY", PatientID=str(da.PatientID))[1] == []
    studies = c_find(server.dicom_port, "STUDY", PatientID=str(db.PatientID), PatientName="")[1]
    assert len(studies) == 3 and {str(s.PatientName) for s in studies} == {str(db.PatientName)}
    assert server.index.counts()["patients"] == 1
    assert dcmtk_names(server.dicom_port, str(da.PatientID)) == []   # DCMTK sees it too
    assert dcmtk_names(server.dicom_port, str(db.PatientID)) == [str(db.PatientName)]

    # Study update, then move the study back under a new patient ID (a correction of A's ID).
    study = str(da.StudyInstanceUID)
    r = post(f"/api/studies/{study}/update", {"changes": {"AccessionNumber": "ACC-9",
                                                         "StudyDescription": "Fixed"}})
    assert r.status_code == 200, r.text
    [m] = c_find(server.dicom_port, "STUDY", StudyInstanceUID=study, AccessionNumber="",
                 StudyDescription="")[1]
    assert (m.AccessionNumber, m.StudyDescription) == ("ACC-9", "Fixed")
    proc = run_peer([dcmtk("findscu"), "-v", "-S", "-aec", "PACSD", "-k",
                     "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "-k",
                     "AccessionNumber", LOCAL, str(server.dicom_port)])
    assert re.search(r"\(0008,0050\) SH \[ACC-9 ?\]", proc.stdout + proc.stderr)
    # Series move: B's second series into A's first study; it takes that study's UID.
    series = {str(dcmread(f).SeriesInstanceUID) for f in b}
    moved = sorted(series)[0]
    r = post(f"/api/series/{moved}/move", {"to_study": study})
    assert r.status_code == 200 and r.json()["instances"] == 2, r.text
    found = c_find(server.dicom_port, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="")[1]
    assert moved in {str(s.SeriesInstanceUID) for s in found}
    [m] = c_find(server.dicom_port, "STUDY", StudyInstanceUID=study,
                 NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")[1]
    assert (m.NumberOfStudyRelatedSeries, m.NumberOfStudyRelatedInstances) == (2, 4)
    # Moving the study to a patient that is not stored: refused, nothing changed.
    r = post(f"/api/studies/{study}/move", {"to_patient": "NO-SUCH"})
    assert r.status_code == 404 and "no patient NO-SUCH" in r.json()["error"]
    # Bad values: a clear 400.
    for body in ({"changes": {"StudyDate": "2024-01-01"}}, {"changes": {"Modality": "CT"}},
                 {"changes": {"AccessionNumber": "x" * 17}}, {"changes": "all"}):
        r = post(f"/api/studies/{study}/update", body)
        assert r.status_code == 400, (body, r.text)
    assert server.index.counts()["instances"] == 8
    # Undo the series move through the API: back in its own study.
    r = post("/api/undo", {"uid": moved})
    assert r.status_code == 200 and r.json()["instances"] == 2, r.text
    found = c_find(server.dicom_port, "SERIES", StudyInstanceUID=str(db.StudyInstanceUID),
                   SeriesInstanceUID="")[1]
    assert moved in {str(s.SeriesInstanceUID) for s in found}
    # Split: the series into a new study of its own (same patient, the study's attributes).
    r = post(f"/api/series/{moved}/move", {"to_study": "new"})
    assert r.status_code == 200 and r.json()["instances"] == 2, r.text
    studies = c_find(server.dicom_port, "STUDY", PatientID=str(db.PatientID),
                     StudyInstanceUID="", NumberOfStudyRelatedSeries="", StudyDate="")[1]
    assert len(studies) == 4
    [new] = [s for s in studies if str(s.StudyInstanceUID) not in
             {str(da.StudyInstanceUID), str(db.StudyInstanceUID), str(dcmread(a[-1])
                                                                 .StudyInstanceUID)}]
    assert new.NumberOfStudyRelatedSeries == 1 and new.StudyDate == db.StudyDate
    assert str(new.StudyInstanceUID).startswith("2.25.")
    # A study's only series cannot be split off.
    r = post(f"/api/series/{moved}/move", {"to_study": "new"})
    assert r.status_code == 400 and "only one" in r.json()["error"]


def test_command_line_refuses_bad_corrections_clearly(make_server, tmp_path):
    server = make_server()
    files = write_series(tmp_path / "in", seed=64, images=1, size=16)
    assert store_files(server.dicom_port, files) == [0]
    config = Path(server.cfg.source)
    pid = str(dcmread(files[0]).PatientID)
    for args, words, code in (
            (("patient", "update", pid), "give at least one new value", 2),
            (("patient", "merge", "--from", "A"), "--from ID --into ID", 2),
            (("patient", "update", pid, "--birth-date", "1970-01-02"), "a date as YYYYMMDD", 1),
            (("patient", "update", "NOBODY", "--name", "X"), "no patient NOBODY", 1),
            (("study", "move", "1.2.3"), "--to-patient", 2)):
        out = cli(config, *args)
        assert out.returncode == code and words in out.stderr, (args, out.stderr)
    assert server.index.history() == []


def _consistent(data: Path, sops: set[str]) -> dict[str, str]:
    """Each instance's index row against its file: the file exists, holds this SOP Instance
    and the Patient's Name the row's patient has; and in one version only."""
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT instance.sop_instance_uid, instance.path, "
                          "patient.patient_name FROM instance JOIN series ON series.id = "
                          "instance.series_id JOIN study ON study.id = series.study_id JOIN "
                          "patient ON patient.id = study.patient_id").fetchall()
        binned = {p for (p,) in db.execute("SELECT path FROM pacsd_trash")}
    finally:
        db.close()
    storage = data / "storage"
    state = {}
    for sop, path, name in rows:
        f = storage / path
        if not f.is_file():
            state[sop] = "row without file"
            continue
        ds = dcmread(f, stop_before_pixels=True)
        state[sop] = "ok" if (str(ds.SOPInstanceUID), str(ds.PatientName)) == (sop, name) \
            else "row and file disagree"
    for sop in sops - set(state):
        state[sop] = "lost"
    live = {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")
            if not {".trash", ".tmp", ".conflicts"} & set(p.relative_to(storage).parts)}
    indexed = {path for _, path, _ in rows}
    strays = live - indexed - binned
    if strays:
        state["strays"] = f"{len(strays)} file(s) no row names"
    return state


@pytest.mark.timeout(240)
def test_kills_in_the_middle_of_corrections_leave_one_version_of_each(tmp_path):
    """`pacsd patient update` on 40 instances SIGKILLed at random moments, three times, with
    the server running; after the server's next start every instance is in one version (old or
    new), its row agreeing with its file, nothing lost, nothing left over."""
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data)
    log = tmp_path / "serve.log"
    files = write_series(tmp_path / "in", seed=65, studies=2, series=2, images=10, size=64)
    sops = {str(dcmread(f).SOPInstanceUID) for f in files}
    pid = str(dcmread(files[0]).PatientID)
    rnd = random.Random(65)
    proc = start(config, data, log)
    try:
        assert store_files(proc.port, files) == [0] * 40
        # How long the work takes once the command has marked itself as changing the archive.
        began = time.monotonic()
        assert cli(config, "patient", "update", pid, "--name", "WHOLE^RUN").returncode == 0
        whole = time.monotonic() - began
        for round_ in range(3):
            # Within its work: at most a third of a whole run, start-up included. A run that
            # ended before its kill (start-up weighed more in `whole`, on a busy machine) is
            # tried again sooner: the kill must land mid-work.
            delay = rnd.uniform(0, whole / 3)
            for _try in range(4):
                if kill_command_midway(["patient", "update", pid, "--name", f"ROUND^{round_}",
                                        "--config", str(config)], data, delay):
                    break
                delay /= 4
            else:
                raise AssertionError(f"round {round_}: the command always ended before its kill")
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(30) == 0
            proc = start(config, data, log)
            state = _consistent(data, sops)
            assert {s: v for s, v in state.items() if v != "ok"} == {}, f"round {round_}"
            names = c_find(proc.port, "PATIENT", model=PatientRootFind, PatientID=pid,
                           PatientName="")[1]
            assert len(names) == 1   # one patient, in one version
            # The killed command's mark was seen and settled by this start.
            assert list((data / ".commands").iterdir()) == []
    finally:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(30)
    assert "a command changing the archive" in log.read_text()


def dcmtk_find(port: int, *keys: str) -> str:
    """findscu -v (Study Root) with these -k keys: its output, where the matches are."""
    args = [dcmtk("findscu"), "-v", "-S", "-aec", "PACSD"]
    for k in keys:
        args += ["-k", k]
    proc = run_peer(args + [LOCAL, str(port)])
    return proc.stdout + proc.stderr


def test_study_and_series_moves_from_the_command_line_seen_by_dcmtk_and_pynetdicom(
        make_server, tmp_path):
    a = write_series(tmp_path / "a", seed=66, patients=1, studies=1, series=2, images=2,
                     size=16)
    b = write_series(tmp_path / "b", seed=67, patients=1, studies=1, series=1, images=2,
                     size=16)
    server = make_server()
    assert store_files(server.dicom_port, a + b) == [0] * 6
    da, db = dcmread(a[0]), dcmread(b[0])
    config = Path(server.cfg.source)
    # A series of A's study into B's study: it takes B's study and patient.
    series = str(da.SeriesInstanceUID)
    out = cli(config, "series", "move", series, "--to-study", str(db.StudyInstanceUID))
    assert out.returncode == 0, out.stderr
    text = dcmtk_find(server.dicom_port, "QueryRetrieveLevel=SERIES",
                      f"StudyInstanceUID={db.StudyInstanceUID}", "SeriesInstanceUID")
    assert series in text
    found = c_find(server.dicom_port, "SERIES", StudyInstanceUID=str(db.StudyInstanceUID),
                   SeriesInstanceUID="")[1]
    assert series in {str(s.SeriesInstanceUID) for s in found} and len(found) == 2
    # A's study (its other series) moved under patient B.
    out = cli(config, "study", "move", str(da.StudyInstanceUID), "--to-patient",
              str(db.PatientID))
    assert out.returncode == 0, out.stderr
    text = dcmtk_find(server.dicom_port, "QueryRetrieveLevel=STUDY",
                      f"PatientID={db.PatientID}", "StudyInstanceUID")
    assert str(da.StudyInstanceUID) in text and str(db.StudyInstanceUID) in text
    studies = c_find(server.dicom_port, "STUDY", PatientID=str(db.PatientID),
                     StudyInstanceUID="", PatientName="")[1]
    assert {str(s.StudyInstanceUID) for s in studies} == {str(da.StudyInstanceUID),
                                                          str(db.StudyInstanceUID)}
    assert {str(s.PatientName) for s in studies} == {str(db.PatientName)}
    assert c_find(server.dicom_port, "STUDY", PatientID=str(da.PatientID))[1] == []
    # In the files too: the moved series carries B's Study Instance UID and Patient ID.
    final, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "SERIES",
                                           "StudyInstanceUID": str(db.StudyInstanceUID),
                                           "SeriesInstanceUID": series},
                       CTImageStorage, ExplicitVRLittleEndian)
    assert final == 0 and len(got) == 2
    for _, body in got.values():
        assert str(db.StudyInstanceUID).encode() in body and str(db.PatientID).encode() in body
