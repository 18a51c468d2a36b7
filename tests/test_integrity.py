"""Provable integrity (pacsd.storage.integrity) against a real server: a flipped byte and a
deleted file are found by `pacsd verify` and by the background check, logged at ERROR, shown
on /status, and never sent as if they were good (DCMTK's getscu and pynetdicom's C-GET count a
failed sub-operation, WADO-URI answers 500, WADO-RS leaves it out with a Warning); put back from
a copy, they are sound and sent again."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from conftest import c_get, pacsd_cmd, store_files
from data import write_series
from pacsd.storage.integrity import FRESH, PASS_ENDED, Scrubber
from test_dcmtk import getscu


def stored_by_sop(server) -> dict[str, Path]:
    with server.index.reading():
        from pacsd.index.models import Instance
        rows = list(Instance.select(Instance.sop_instance_uid, Instance.path).tuples())
    return {sop: server.cfg.storage_path / path for sop, path in rows}


def flip_a_byte(path: Path) -> bytes:
    """Change one byte near the end (pixel data, past the header); the original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def verify(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd("verify", "--config", str(server.cfg.source), *args),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_verify_finds_a_flipped_byte_and_a_missing_file_and_they_are_not_sent(
        make_server, tmp_path):
    server = make_server(storage={"scrub_days": 0})
    files = write_series(tmp_path / "in", seed=81, images=4, size=32)
    assert store_files(server.dicom_port, files) == [0] * 4
    first = dcmread(files[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    paths = stored_by_sop(server)
    sops = [str(dcmread(f).SOPInstanceUID) for f in files]
    changed, missing = sops[0], sops[1]
    original = flip_a_byte(paths[changed])
    kept = paths[missing].read_bytes()
    paths[missing].unlink()

    out = verify(server, "--study", study, "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["checked"] == 4
    assert {d["sop_instance_uid"]: d["problem"] for d in report["damaged"]} == \
        {changed: "changed", missing: "missing"}
    assert "integrity: SOP Instance" in out.stderr and "will not be sent" in out.stderr
    status = requests.get(f"{server.http_url}/status", timeout=30).json()
    assert status["integrity"]["damaged"] == 2
    metrics = requests.get(f"{server.http_url}/metrics", timeout=30).text
    assert "\npacsd_damaged_files 2\n" in metrics

    # Never sent as if good: C-GET by pynetdicom and by DCMTK's getscu, WADO-URI, WADO-RS.
    final, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "SERIES",
                                           "StudyInstanceUID": study,
                                           "SeriesInstanceUID": series},
                       CTImageStorage, ExplicitVRLittleEndian)
    assert set(got) == set(sops[2:]) and final == 0xB000   # sub-operations failed: a warning
    counts = getscu(server.dicom_port, tmp_path / "got",
                    ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                     f"SeriesInstanceUID={series}"])
    assert (counts["completed"], counts["failed"]) == (2, 2)
    wado = requests.get(f"{server.http_url}/wado", timeout=30, params={
        "requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": changed,
        "contentType": "application/dicom"})
    assert wado.status_code == 500 and "damaged" in wado.text
    rs = requests.get(f"{server.http_url}/dicom-web/studies/{study}/series/{series}",
                      headers={"Accept": 'multipart/related; type="application/dicom"'},
                      timeout=30)
    assert rs.status_code == 200 and "2 instance(s) left out" in rs.headers["Warning"]
    assert rs.content.count(b"Content-Type: application/dicom") == 2
    one = requests.get(f"{server.http_url}/dicom-web/studies/{study}/series/{series}/"
                       f"instances/{missing}", timeout=30,
                       headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert one.status_code == 500

    # Put back from a copy: `pacsd verify` (what is on record) finds them sound again.
    paths[changed].write_bytes(original)
    paths[missing].write_bytes(kept)
    out = verify(server)
    assert out.returncode == 0 and "checked 2 file(s): all sound" in out.stdout, out.stdout
    final, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "SERIES",
                                           "StudyInstanceUID": study,
                                           "SeriesInstanceUID": series},
                       CTImageStorage, ExplicitVRLittleEndian)
    assert final == 0 and set(got) == set(sops)
    assert got[changed][1] == original[-len(got[changed][1]):]   # the very bytes stored
    assert requests.get(f"{server.http_url}/status", timeout=30).json()[
        "integrity"]["damaged"] == 0


def test_the_background_check_reads_new_files_back_then_passes_over_all(make_server, tmp_path,
                                                                         caplog):
    server = make_server(storage={"scrub_days": 0})
    older = write_series(tmp_path / "old", seed=82, images=3, size=32)
    assert store_files(server.dicom_port, older) == [0] * 3
    # A pass every 2 seconds' worth of the archive, read at up to 50 MiB/s.
    scrubber = Scrubber(server.store, server.index, days=2 / 86400, mb_per_s=50)
    caplog.set_level(logging.INFO, logger="pacsd")
    # The first look only notes where "new" begins: what was there is the passes' work.
    scrubber._fresh(until=float("inf"))
    assert server.index.cursor(FRESH) == server.index.last_instance_id() > 0
    newer = write_series(tmp_path / "new", seed=83, images=3, size=32)
    assert store_files(server.dicom_port, newer) == [0] * 3
    paths = stored_by_sop(server)
    fresh_bad = str(dcmread(newer[2]).SOPInstanceUID)
    old_bad = str(dcmread(older[0]).SOPInstanceUID)
    old_gone = str(dcmread(older[1]).SOPInstanceUID)
    flip_a_byte(paths[fresh_bad])
    flip_a_byte(paths[old_bad])
    paths[old_gone].unlink()

    assert scrubber._fresh(until=float("inf")) == 3   # the new files, read back once
    assert [d.sop_instance_uid for d in server.index.damage()] == [fresh_bad]
    assert server.index.cursor(FRESH) == server.index.last_instance_id()
    assert scrubber._pass(until=float("inf")) == 6    # then the whole archive
    assert {d.sop_instance_uid: d.problem for d in server.index.damage()} == \
        {fresh_bad: "changed", old_bad: "changed", old_gone: "missing"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR
              and "integrity: SOP Instance" in r.getMessage()]
    assert len(errors) == 3   # once per file, however often it is found again
    assert server.index.cursor(PASS_ENDED) is not None
    assert any("a pass over the archive is done" in r.getMessage() for r in caplog.records)
    # The next pass waits for its time (2 s after the last); found again, no new ERROR line.
    assert scrubber._pass(until=float("inf")) == 0
    server.index.set_cursor(PASS_ENDED, 0.0)
    assert scrubber._pass(until=float("inf")) == 6
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3
    # The rate bound: 6 files of ~2 KiB at 50 MiB/s is no wait; the budget is per second.
    assert scrubber.checked == 15
