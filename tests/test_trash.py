"""The recycle bin (pacsd.storage.trash) and the history, against a real server: a deletion
from the pages' API, XML-RPC or a rule goes to the bin, invisible to C-FIND (DCMTK and
pynetdicom), QIDO-RS, WADO and C-GET; `pacsd trash restore` puts it back byte for byte, as it
was; the bin is emptied by age and before the disk floor, a log line each; a kill between a
deletion's two steps loses and duplicates nothing; only administrators, and only with the
CSRF proof, may list, restore or empty it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from conftest import (LOCAL, c_find, c_get, dcmtk, pacsd_cmd, run_peer, store_files,
                      write_config)
from data import write_series
from pacsd.web.auth import hash_password
from reliability.storm import indexed_rows, kill_tree, start

H = {"X-Requested-With": "pacsd"}
BOSS = ("boss", "boss-password")
READER = ("reader", "reader-password")
USERS = [{"name": "boss", "password_hash": hash_password("boss-password"), "admin": True},
         {"name": "reader", "password_hash": hash_password("reader-password")}]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def live_files(storage: Path) -> dict[str, str]:
    """Stored (not binned) file path -> its SHA-256."""
    return {p.relative_to(storage).as_posix(): sha(p) for p in storage.rglob("*.dcm")
            if not {".trash", ".tmp"} & set(p.relative_to(storage).parts)}


def binned_files(storage: Path) -> dict[str, str]:
    """Binned file path (relative to the bin) -> its SHA-256."""
    trash = storage / ".trash"
    return {p.relative_to(trash).as_posix(): sha(p) for p in trash.rglob("*.dcm")}


def rows(data: Path, sql: str, *params) -> list[tuple]:
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return list(db.execute(sql, params))
    finally:
        db.close()


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd(*args, "--config", str(config)), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def dcmtk_study_matches(port: int, study: str) -> int:
    """How many studies DCMTK's findscu finds under this Study Instance UID."""
    proc = run_peer([dcmtk("findscu"), "-v", "-S", "-aec", "PACSD",
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                     LOCAL, str(port)])
    text = proc.stdout + proc.stderr
    assert "Final Find Response" in text and "(Success)" in text, text[-2000:]
    return len(re.findall(r"Find Response:? \d+ \(Pending\)", text))


def test_a_deleted_study_is_gone_everywhere_and_comes_back_byte_for_byte(make_server, tmp_path):
    server = make_server(users=USERS)
    files = write_series(tmp_path / "in", seed=91, studies=2, series=2, images=3, size=16)
    assert store_files(server.dicom_port, files) == [0] * 12
    storage, data = server.cfg.storage_path, server.cfg.data
    first = dcmread(files[0])
    study, sop = str(first.StudyInstanceUID), str(first.SOPInstanceUID)
    before_files = live_files(storage)
    before_rows = rows(data, "SELECT sop_instance_uid, path, size, transfer_syntax_uid, "
                             "calling_aet, received, content_hash FROM instance ORDER BY 1")
    url = server.http_url
    assert dcmtk_study_matches(server.dicom_port, study) == 1

    r = requests.delete(f"{url}/api/studies/{study}", headers=H, auth=BOSS, timeout=30)
    assert r.status_code == 200 and r.json() == {"deleted": 6}

    # Gone from every way in: C-FIND (DCMTK and pynetdicom), QIDO-RS, WADO-URI, C-GET.
    assert dcmtk_study_matches(server.dicom_port, study) == 0
    assert c_find(server.dicom_port, "STUDY", StudyInstanceUID=study) == (0, [])
    qido = requests.get(f"{url}/dicom-web/studies", params={"StudyInstanceUID": study},
                        auth=BOSS, timeout=30)
    assert qido.status_code in (200, 204) and not (qido.content and qido.json())
    wado = requests.get(f"{url}/wado", params={"requestType": "WADO", "studyUID": study,
                                               "seriesUID": str(first.SeriesInstanceUID),
                                               "objectUID": sop,
                                               "contentType": "application/dicom"},
                        auth=BOSS, timeout=30)
    assert wado.status_code == 404
    status, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "STUDY",
                                            "StudyInstanceUID": study},
                        CTImageStorage, ExplicitVRLittleEndian)
    assert got == {}
    # In the bin, byte for byte; counted apart from the archive.
    assert len(live_files(storage)) == 6
    in_bin = binned_files(storage)
    assert in_bin == {p: h for p, h in before_files.items() if p not in live_files(storage)}
    health = requests.get(f"{url}/status", timeout=30).json()
    assert health["trash"]["instances"] == 6 and health["index"]["instances"] == 6
    listed = requests.get(f"{url}/api/trash", auth=BOSS, timeout=30).json()
    [entry] = listed["entries"]
    assert (entry["level"], entry["uid"], entry["instances"], listed["days"]) == \
        ("STUDY", study, 6, 30)
    assert entry["who"] == "boss (web, 127.0.0.1)"

    # The command line lists it, and restores it (the server running).
    config = Path(server.cfg.source)
    out = cli(config, "trash", "list")
    assert out.returncode == 0 and f"study {study}" in out.stdout and "6 instance(s)" in \
        out.stdout, out.stdout + out.stderr
    out = cli(config, "trash", "restore", study)
    assert out.returncode == 0 and "restored 6 instance(s)" in out.stdout, out.stderr

    # Back as it was: same files at the same paths, same rows (received, sender, hash).
    assert live_files(storage) == before_files
    assert binned_files(storage) == {}
    assert rows(data, "SELECT sop_instance_uid, path, size, transfer_syntax_uid, calling_aet, "
                      "received, content_hash FROM instance ORDER BY 1") == before_rows
    assert dcmtk_study_matches(server.dicom_port, study) == 1
    [match] = c_find(server.dicom_port, "STUDY", StudyInstanceUID=study,
                     NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")[1]
    assert (match.NumberOfStudyRelatedSeries, match.NumberOfStudyRelatedInstances) == (2, 6)
    status, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "STUDY",
                                            "StudyInstanceUID": study},
                        CTImageStorage, ExplicitVRLittleEndian)
    assert status == 0 and len(got) == 6
    counts = requests.get(f"{url}/status", timeout=30).json()
    assert counts["index"]["instances"] == 12 and counts["trash"]["instances"] == 0

    # The history: who deleted it, who restored it.
    out = cli(config, "history", study, "--json")
    assert out.returncode == 0, out.stderr
    history = json.loads(out.stdout)
    assert [(h["action"], h["instances"]) for h in history] == [("restore", 6), ("delete", 6)]
    assert history[1]["who"] == "boss (web, 127.0.0.1)"
    assert history[0]["who"].endswith("(command line)")
    assert history[1]["detail"]["patient_id"] == str(first.PatientID)


def test_restore_leaves_what_was_stored_again_in_the_bin(make_server, tmp_path):
    """An instance sent again after its deletion is the stored one now: a restore puts back
    the others and leaves that one in the bin, saying so."""
    server = make_server(users=USERS)
    files = write_series(tmp_path / "in", seed=92, images=4, size=16)
    assert store_files(server.dicom_port, files) == [0] * 4
    series = str(dcmread(files[0]).SeriesInstanceUID)
    again = str(dcmread(files[1]).SOPInstanceUID)
    url = server.http_url
    assert requests.delete(f"{url}/api/series/{series}", headers=H, auth=BOSS,
                           timeout=30).json() == {"deleted": 4}
    assert store_files(server.dicom_port, [files[1]]) == [0]
    r = requests.post(f"{url}/api/trash/restore", json={"uid": series}, headers=H, auth=BOSS,
                      timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"restored": 3, "already_stored": [again], "missing": []}
    assert server.index.counts()["instances"] == 4
    assert server.index.bin_totals()[0] == 1
    assert len(live_files(server.cfg.storage_path)) == 4
    # Nothing more to restore of it: 200 with nothing restored, the one named again.
    r = requests.post(f"{url}/api/trash/restore", json={"uid": series}, headers=H, auth=BOSS,
                      timeout=30)
    assert r.json()["restored"] == 0 and r.json()["already_stored"] == [again]


def test_the_bin_is_emptied_by_age_by_hand_and_before_the_floor(make_server, tmp_path,
                                                                 caplog):
    files = write_series(tmp_path / "in", seed=93, studies=3, images=2, size=16)
    studies = list(dict.fromkeys(str(dcmread(f).StudyInstanceUID) for f in files))
    server = make_server(users=USERS)
    assert store_files(server.dicom_port, files) == [0] * 6
    for study in studies:
        assert server.runtime.archive.delete("STUDY", [study], who="test") == 2
    storage, data = server.cfg.storage_path, server.cfg.data
    assert len(binned_files(storage)) == 6
    # The first deletion made 40 days ago ([storage] trash_days = 30 by default).
    db = sqlite3.connect(data / "index.sqlite3", timeout=10)
    with db:
        db.execute("UPDATE pacsd_trash SET deleted = deleted - 40 * 86400 "
                   "WHERE study_instance_uid = ?", (studies[0],))
    db.close()
    caplog.set_level(logging.INFO, logger="pacsd")
    assert server.housekeeping is not None
    assert "trash-expire" in server.housekeeping.run_once()
    assert len(binned_files(storage)) == 4
    assert [e.uid for e in server.index.bin_entries()] == studies[1:]
    assert any(f"study {studies[0]}" in r.getMessage() and "emptied: older than 30 day(s)"
               in r.getMessage() for r in caplog.records)
    # By hand: what is older than one day (nothing), then everything but by the API.
    r = requests.post(f"{server.http_url}/api/trash/empty", json={"older_than_days": 1},
                      headers=H, auth=BOSS, timeout=30)
    assert r.json() == {"deletions": 0, "instances": 0, "bytes": 0}
    server.stop()

    # Near the floor: free space within 1 GiB of [storage] min_free_mb empties the bin,
    # oldest deletion first, before any image would be refused.
    free_mb = os.statvfs(storage).f_bavail * os.statvfs(storage).f_frsize // 2**20
    assert free_mb > 2048, "the test needs 2 GiB free"
    caplog.clear()
    server = make_server(data=data, users=USERS, storage={"min_free_mb": free_mb - 512})
    assert server.housekeeping is not None
    assert "trash-room" in server.housekeeping.run_once()
    assert binned_files(storage) == {} and server.index.bin_entries() == []
    emptied = [r.getMessage() for r in caplog.records if "emptied: storage volume within"
               in r.getMessage()]
    assert len(emptied) == 2 and studies[1] in emptied[0] and studies[2] in emptied[1]
    purges = [h for h in server.index.history() if h.action == "purge"]
    assert len(purges) == 3 and all(h.who == "housekeeping" for h in purges)
    assert rows(data, "SELECT COUNT(*) FROM pacsd_trash") == [(0,)]


def test_the_bin_is_for_administrators_with_the_csrf_proof(make_server, tmp_path):
    server = make_server(users=USERS)
    files = write_series(tmp_path / "in", seed=94, images=2, size=16)
    assert store_files(server.dicom_port, files) == [0] * 2
    series = str(dcmread(files[0]).SeriesInstanceUID)
    url = server.http_url
    assert requests.delete(f"{url}/api/series/{series}", headers=H, auth=BOSS,
                           timeout=30).status_code == 200
    for method, path, body in (("GET", "/api/trash", None),
                               ("POST", "/api/trash/restore", {"uid": series}),
                               ("POST", "/api/trash/empty", {}),
                               ("GET", "/api/history", None)):
        r = requests.request(method, url + path, json=body, headers=H, auth=READER, timeout=30)
        assert r.status_code == 403, (path, r.status_code)
        r = requests.request(method, url + path, json=body, headers=H, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
    # A state change from another site's page (its form, or a no-cors fetch): refused.
    for path, body in (("/api/trash/restore", {"uid": series}), ("/api/trash/empty", {})):
        r = requests.post(url + path, data=json.dumps(body), auth=BOSS, timeout=30,
                          headers={"Content-Type": "text/plain"})
        assert r.status_code == 403, (path, r.status_code)
        r = requests.post(url + path, json=body, auth=BOSS, timeout=30,
                          headers={"Origin": "http://attacker.example", **H})
        assert r.status_code == 403, (path, r.status_code)
    # Bad input: a clear 400 or 404, nothing changed.
    bad = ((("/api/trash/restore"), {"uid": "1.2.x; DROP TABLE"}, 400),
           (("/api/trash/restore"), {"uid": "1.2.3"}, 404),
           (("/api/trash/empty"), {"older_than_days": "soon"}, 400),
           (("/api/trash/empty"), {"older_than_days": -1}, 400))
    for path, body, code in bad:
        r = requests.post(url + path, json=body, headers=H, auth=BOSS, timeout=30)
        assert r.status_code == code, (path, body, r.status_code, r.text)
    assert server.index.bin_totals()[0] == 2
    assert requests.get(f"{url}/api/history", params={"uid": "not a uid"}, auth=BOSS,
                        timeout=30).status_code == 400


def test_command_line_usage_errors_are_said_before_anything_is_done(tmp_path):
    config = write_config(tmp_path / "pacsd.toml", tmp_path / "data")
    for args, words in ((("trash", "restore"), "name the UID"),
                        (("trash", "list", "1.2.3"), "takes no UID"),
                        (("trash", "list", "--older-than", "3"), "goes with `empty`")):
        out = cli(config, *args)
        assert out.returncode == 2 and words in out.stderr, (args, out.stderr)
    assert not (tmp_path / "data").exists()


# --- crashes ---------------------------------------------------------------------------------

def _state(data: Path, sops: set[str]) -> dict[str, str]:
    """Where each instance is: "live" (row + file in place), "bin" (bin row + file in the
    bin), or what is wrong with it."""
    storage = data / "storage"
    live = indexed_rows(data)
    binned = dict(rows(data, "SELECT sop_instance_uid, path FROM pacsd_trash"))
    where = {}
    for sop in sops:
        if sop in live and sop in binned:
            where[sop] = "both"
        elif sop in live:
            where[sop] = "live" if (storage / live[sop]).is_file() else "row without file"
        elif sop in binned:
            where[sop] = "bin" if (storage / ".trash" / binned[sop]).is_file() \
                else "bin row without file"
        else:
            where[sop] = "lost"
    return where


@pytest.mark.timeout(240)
def test_kills_in_the_middle_of_deletions_lose_and_duplicate_nothing(tmp_path):
    """`pacsd serve` SIGKILLed while studies are being deleted (each deletion: rows into the
    bin, then files), three rounds; after each restart every instance is either live or in the
    bin, whole, never both nor neither. Then a kill right between the two steps, made exact;
    then everything restored, byte for byte."""
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data, users=USERS)
    log = tmp_path / "serve.log"
    files = write_series(tmp_path / "in", seed=95, studies=12, images=3, size=16)
    sent = {str(dcmread(f).SOPInstanceUID): sha(f) for f in files}
    studies = list(dict.fromkeys(str(dcmread(f).StudyInstanceUID) for f in files))
    proc = start(config, data, log)
    try:
        assert store_files(proc.port, files) == [0] * 36
        original = live_files(data / "storage")
        for round_, delay in enumerate((0.05, 0.15, 0.3)):
            url = proc.http_url
            todo = studies[round_ * 4:round_ * 4 + 4]

            def delete_all() -> None:
                for study in todo:
                    try:
                        requests.delete(f"{url}/api/studies/{study}", headers=H, auth=BOSS,
                                        timeout=10)
                    except requests.RequestException:
                        return   # killed
            deleter = threading.Thread(target=delete_all)
            deleter.start()
            time.sleep(delay)
            kill_tree(proc)
            deleter.join(30)
            proc = start(config, data, log)
            where = _state(data, set(sent))
            wrong = {s: w for s, w in where.items() if w not in ("live", "bin")}
            assert not wrong, f"round {round_}: {wrong}"
        # Exactly between the steps: the bin rows committed, the files not moved (as the kill
        # would leave them): the next start moves them, never indexes them again.
        kill_tree(proc)
        victim = rows(data, "SELECT study_instance_uid FROM study ORDER BY id")[0][0]
        proc = start(config, data, log)
        assert requests.delete(f"{proc.http_url}/api/studies/{victim}", headers=H, auth=BOSS,
                               timeout=30).json() == {"deleted": 3}
        kill_tree(proc)
        storage = data / "storage"
        moved = [p for p in (storage / ".trash").rglob("*.dcm")]
        for sop, path in rows(data, "SELECT sop_instance_uid, path FROM pacsd_trash WHERE "
                                    "study_instance_uid = ?", victim):
            (storage / path).parent.mkdir(parents=True, exist_ok=True)
            os.rename(storage / ".trash" / path, storage / path)
        assert len(moved) >= 3
        proc = start(config, data, log)
        where = _state(data, set(sent))
        assert {s: w for s, w in where.items() if w not in ("live", "bin")} == {}
        assert "recovered" not in log.read_text().split("did not stop cleanly")[-1]
        assert "whose deletion an interrupted run had not finished" in log.read_text()
        # Everything back, byte for byte.
        for study in studies:
            out = cli(config, "trash", "restore", study)
            assert out.returncode in (0, 1), out.stderr
        assert _state(data, set(sent)) == {s: "live" for s in sent}
        assert live_files(storage) == original
        assert binned_files(storage) == {}
    finally:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(30)


def rejection_note(tmp_path: Path, rejected: list[Path], code: str = "113001") -> Path:
    """An IHE IOCM rejection note (Key Object Selection) naming these stored files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid
    first = dcmread(rejected[0])
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "KO"
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID"):
        setattr(ds, kw, getattr(first, kw, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 99, 1
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = code, "DCM"
    title.CodeMeaning = "Rejected for Quality Reasons"
    ds.ConceptNameCodeSequence = Sequence([title])
    by_series: dict[str, list] = {}
    for f in rejected:
        d = dcmread(f)
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = d.SOPClassUID, d.SOPInstanceUID
        by_series.setdefault(str(d.SeriesInstanceUID), []).append(ref)
    series_items = []
    for uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID, item.ReferencedSOPSequence = uid, Sequence(refs)
        series_items.append(item)
    study = Dataset()
    study.StudyInstanceUID = first.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"kos-{code}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("setting", ["ignore", "bin"])
def test_a_rejection_note_moves_what_it_names_to_the_bin_where_configured(make_server, tmp_path,
                                                                        setting):
    server = make_server(storage={"rejection_notes": setting})
    files = write_series(tmp_path / "in", seed=96, images=4, size=16)
    assert store_files(server.dicom_port, files) == [0] * 4
    note = rejection_note(tmp_path, files[:2])
    other = rejection_note(tmp_path, files[2:], code="121010")   # not a rejection title
    assert store_files(server.dicom_port, [note, other]) == [0, 0]
    counts = server.index.counts()
    if setting == "ignore":
        assert counts["instances"] == 6 and server.index.bin_totals()[0] == 0
        return
    # The two rejected instances in the bin; the notes themselves stored.
    assert counts["instances"] == 4 and server.index.bin_totals()[0] == 2
    gone = {str(dcmread(f).SOPInstanceUID) for f in files[:2]}
    left = {str(m.SOPInstanceUID) for m in c_find(
        server.dicom_port, "IMAGE", StudyInstanceUID=str(dcmread(files[0]).StudyInstanceUID),
        SeriesInstanceUID=str(dcmread(files[0]).SeriesInstanceUID), SOPInstanceUID="")[1]}
    assert not gone & left and len(left) == 2
    changes = [h for h in server.index.history() if h.action == "delete"]
    assert {h.uid for h in changes} == gone
    assert all(h.who.startswith("rejection note") and "Quality" in h.who for h in changes)
