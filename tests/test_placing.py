"""A stored image's row is committed while its file is synced and renamed into place
(pacsd.storage.archive.Archive.put, overlapped for speed). What that must never cost: Success
before both are durable, a reader or a re-send that trusts a row whose file is not there yet,
a row left behind by a file that failed or by a crash in between.

The file's fsync is held open here (a gate on pacsd.storage.store.fsync_fd) so that the window
between the row and the file, a millisecond or two on a healthy disk, stays open as long as
each test needs."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import c_find, serve, store_files, terminate, wait_for, write_config
from data import write_series
from pydicom import dcmread

from pacsd.storage import store as store_mod

OUT_OF_RESOURCES = 0xA700


class Gate:
    """Holds the fsync of the first stored file (not of folders, nor of later files) until
    `open` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.held = 0
        real = store_mod.fsync_fd
        lock = threading.Lock()

        def fsync_fd(fd: int) -> None:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                with lock:
                    self.held += 1
                    first = self.held == 1
                if first:
                    self.open.wait(60)
            real(fd)
        monkeypatch.setattr(store_mod, "fsync_fd", fsync_fd)


def rows(data: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT sop_instance_uid, path FROM instance").fetchall()
    finally:
        db.close()


def stored_files(storage: Path) -> list[Path]:
    return [p for p in storage.rglob("*.dcm") if not {".tmp", ".trash"} & set(p.parts)]


def held(make_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> tuple:
    """A server whose first stored file's fsync is held (the gate), its data and storage
    folders, and one image to send it."""
    server = make_server()
    gate = Gate(monkeypatch)
    path = write_series(tmp_path / "in", seed=seed, images=1, size=32)[0]
    return server, server.cfg.data, Path(server.cfg.storage_path), gate, path


def test_success_waits_for_the_file_and_a_reader_waits_for_it_too(make_server, tmp_path,
                                                                    monkeypatch):
    server, data, storage, gate, path = held(make_server, tmp_path, monkeypatch, 71)
    ds = dcmread(path)
    with ThreadPoolExecutor(2) as pool:
        sent = pool.submit(store_files, server.dicom_port, [path])
        (uid, rel), = wait_for(lambda: rows(data), 20, "the row, committed while the fsync waits")
        assert uid == ds.SOPInstanceUID
        time.sleep(0.3)
        assert not (storage / rel).exists() and not sent.done(), "Success before the file"
        # Listed already; a read of it waits for the file rather than failing.
        status, matches = c_find(server.dicom_port, "IMAGE", StudyInstanceUID=ds.StudyInstanceUID,
                                 SeriesInstanceUID=ds.SeriesInstanceUID, SOPInstanceUID="")
        assert status == 0 and len(matches) == 1
        read = pool.submit(requests.get, server.http_url + "/wado", timeout=30, params={
            "requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": uid,
            "contentType": "application/dicom"})
        time.sleep(0.3)
        assert not read.done()
        gate.open.set()
        assert sent.result(30) == [0]
        r = read.result(30)
    assert r.status_code == 200 and r.content == (storage / rel).read_bytes()
    assert dcmread(storage / rel).SOPInstanceUID == uid


def test_a_resend_is_answered_once_the_first_copy_is_in_place(make_server, tmp_path,
                                                               monkeypatch):
    server, data, storage, gate, path = held(make_server, tmp_path, monkeypatch, 72)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(store_files, server.dicom_port, [path])
        wait_for(lambda: rows(data), 20, "the first copy's row")
        again = pool.submit(store_files, server.dicom_port, [path])   # another association
        # The re-sent copy is in place (its fsync is not held): it now waits for the first.
        wait_for(lambda: len(stored_files(storage)) == 1, 20, "the re-sent copy in place")
        time.sleep(0.2)
        assert not again.done(), "a duplicate acknowledged on a file not yet in place"
        gate.open.set()
        assert first.result(30) == [0] and again.result(30) == [0]
    (_, rel), = rows(data)
    assert stored_files(storage) == [storage / rel]


def test_a_resend_is_refused_for_a_retry_when_the_first_copy_takes_too_long(
        make_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_mod, "PLACE_WAIT_S", 0.5)
    server, data, _, gate, path = held(make_server, tmp_path, monkeypatch, 73)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(store_files, server.dicom_port, [path])
        wait_for(lambda: rows(data), 20, "the first copy's row")
        with caplog.at_level(logging.WARNING):
            assert store_files(server.dicom_port, [path]) == [OUT_OF_RESOURCES]
        assert any("still being written" in r.getMessage() for r in caplog.records)
        gate.open.set()
        assert first.result(30) == [0]
    assert len(rows(data)) == 1


def test_a_file_that_cannot_be_synced_takes_its_row_back(make_server, tmp_path, monkeypatch):
    server = make_server()
    data, storage = server.cfg.data, Path(server.cfg.storage_path)
    real = store_mod.fsync_fd

    def failing(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(store_mod, "fsync_fd", failing)
    paths = write_series(tmp_path / "in", seed=74, images=2, size=32)
    assert store_files(server.dicom_port, paths) == [OUT_OF_RESOURCES] * 2
    assert rows(data) == [] and stored_files(storage) == []
    assert server.index.counts()["instances"] == 0
    monkeypatch.setattr(store_mod, "fsync_fd", real)
    assert store_files(server.dicom_port, paths) == [0, 0]   # and the disk is back
    assert len(rows(data)) == 2 and server.index.counts()["instances"] == 2


def test_a_stored_copy_gone_missing_is_replaced_by_a_resend(make_server, tmp_path, caplog):
    server = make_server()
    data, storage = server.cfg.data, Path(server.cfg.storage_path)
    path = write_series(tmp_path / "in", seed=75, images=1, size=32)[0]
    assert store_files(server.dicom_port, [path]) == [0]
    (uid, rel), = rows(data)
    (storage / rel).unlink()
    with caplog.at_level(logging.WARNING):
        assert store_files(server.dicom_port, [path]) == [0]
    (uid2, rel2), = rows(data)
    assert uid2 == uid and rel2 != rel and (storage / rel2).is_file()
    assert dcmread(storage / rel2).SOPInstanceUID == uid
    assert any("was missing from storage" in r.getMessage() for r in caplog.records)
    assert server.index.counts()["instances"] == 1


# A server whose stored files never finish their fsync, killed once a row is committed: the
# crash this overlap makes possible, at the very point where it can happen.
HELD_SERVER = """
import os, stat, sys, threading
from pacsd.config import load
from pacsd.daemon.server import Server
from pacsd.storage import store
real = store.fsync_fd
def fsync_fd(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode):
        threading.Event().wait(120)
    real(fd)
store.fsync_fd = fsync_fd
Server(load(sys.argv[1], env={})).catch_signals().start().serve_forever()
"""


@pytest.mark.timeout(120)
def test_a_row_whose_file_a_crash_cut_off_is_removed_at_the_next_start(tmp_path):
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data, dicom={"workers": 1})
    first = write_series(tmp_path / "a", seed=76, images=2, size=32)
    held = write_series(tmp_path / "b", seed=77, images=1, size=32)
    with serve(config, data) as p:
        assert store_files(p.port, first) == [0, 0]
    log = tmp_path / "held.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", HELD_SERVER, str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: (data / "pacsd.json").exists() and str(proc.pid) in
                 (data / "pacsd.json").read_text(), 30, "the held server")
        port = int(json.loads((data / "pacsd.json").read_text())["dicom_port"])
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(store_files, port, held)
            wait_for(lambda: len(rows(data)) == 3, 30, "the held image's row")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            try:
                got = sending.result(30)
            except Exception:   # noqa: BLE001 - the association ended without an answer
                got = None
            assert got != [0], "Success for an image whose file never landed"
    finally:
        terminate(proc)
    held_uid = dcmread(held[0]).SOPInstanceUID
    assert held_uid in {u for u, _ in rows(data)}   # the row without its file
    with serve(config, data) as p:
        assert {u for u, _ in rows(data)} == {dcmread(f).SOPInstanceUID for f in first}
        status, matches = c_find(p.port, "IMAGE", StudyInstanceUID=dcmread(held[0]).StudyInstanceUID,
                                 SeriesInstanceUID=dcmread(held[0]).SeriesInstanceUID,
                                 SOPInstanceUID="")
        assert status == 0 and matches == []
        assert store_files(p.port, held) == [0]   # sent again, stored for good
    assert "removed 1 index row(s) whose file an interrupted run had not finished" in \
        p.output()
    storage = data / "storage"
    assert {storage / r for _, r in rows(data)} == set(stored_files(storage))


def test_a_temporary_file_left_by_a_dead_writer_is_not_waited_for(tmp_path):
    """A write in flight is one whose writer holds its temporary file's lock: while the
    writer (another process: a DICOM worker, or another node) lives, readers wait; once it is
    killed, at once not, though the file is fresh (no minute of 0xA700 for a re-send after a
    worker died)."""
    store = store_mod.Store(tmp_path / "storage", node="n1")
    store.open()
    rel = "2026/12/07/ab/" + "ab" * 16 + ".dcm"
    other = tmp_path / "storage" / ".tmp" / "n2"   # another writer's folder on the volume
    other.mkdir(parents=True)
    part = other / (rel.rsplit("/", 1)[1] + store_mod.PART)
    assert not store.placing(rel)
    writer = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys
fd = os.open({str(part)!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, b"being synced")
print("held", flush=True)
sys.stdin.read()   # holds the lock until killed
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "held\n"
        assert store.placing(rel)
        began = time.monotonic()
        assert store.placed(rel, wait_s=0.3) == store.path(rel)   # waited, in vain
        assert time.monotonic() - began >= 0.3
        assert store.placing(rel)   # our look did not take its lock away
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    assert part.exists() and time.time() - part.stat().st_mtime < store_mod.PART_STALE_S
    assert not store.placing(rel)
    began = time.monotonic()
    store.placed(rel)
    assert time.monotonic() - began < 0.1
    # Our own writes hold their lock too, until placed.
    new = store.begin()
    new.add(b"x" * 10)
    assert store.placing(new.rel)
    new.drop()
    assert not store.placing(new.rel)


def test_where_files_cannot_be_locked_a_fresh_temporary_file_counts_as_written(
        tmp_path, monkeypatch):
    store = store_mod.Store(tmp_path / "storage", node="n1")
    store.open()
    rel = "2026/12/07/cd/" + "cd" * 16 + ".dcm"
    part = store.tmp / (rel.rsplit("/", 1)[1] + store_mod.PART)
    part.write_bytes(b"on a volume without locks")

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(store_mod.fcntl, "flock", no_locks)
    assert store.placing(rel)
    stale = time.time() - store_mod.PART_STALE_S - 1
    os.utime(part, (stale, stale))
    assert not store.placing(rel)
