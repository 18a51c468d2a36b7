"""Crash durability: `pacsd serve` SIGKILLed again and again under a concurrent C-STORE storm.

The promise under test: C-STORE answers Success only once the file and its index row are
durable. So whatever the moment of the kill, after a restart every acknowledged instance is
indexed, its file exists and holds exactly the bytes that were sent, and it can be retrieved;
the index is sound, rows and files match one to one (files written but not indexed before the
kill are recovered at start), and no temporary file is left behind.

Clients behave like a modality's store-and-forward queue: an instance not acknowledged (the
association aborted or was refused) is sent again once the server is back, so some resends
arrive as duplicates of instances that were stored but not acknowledged.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from conftest import LOCAL, Process, c_get, pacsd_cmd, write_config
from data import dataset_bytes, write_series

ROUNDS = 5            # SIGKILLs
CLIENTS = 4           # concurrent associations, one thread each
IMAGES = 48           # per client (one series each), 64x64 pixels
DEADLINE = 50.0       # seconds for the whole storm, restarts included
POLL = 0.01


class Storm:
    """State shared by the client threads and the killer: the live port, the acknowledgements."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.port = 0                      # 0: no server to talk to right now
        self.acked: dict[str, Path] = {}   # SOP Instance UID -> the file that was sent
        self.bad_status: list[tuple[str, int]] = []   # answered, but neither Success nor abort
        self.attempts = 0
        self.aborted = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + DEADLINE

    def ack_count(self) -> int:
        with self.lock:
            return len(self.acked)


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def client(storm: Storm, name: str, files: list[tuple[str, Path]]) -> None:
    """Send every file until it is acknowledged, surviving any number of server deaths."""
    try:
        ae = AE(ae_title=name)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        pending = list(files)
        while pending and not storm.stop.is_set() and time.monotonic() < storm.deadline:
            port = storm.port
            if not port:
                time.sleep(POLL)
                continue
            assoc = ae.associate(LOCAL, port, ae_title="PACSD")
            if not assoc.is_established:
                time.sleep(POLL)   # the server died or is not up yet: poll for the next one
                continue
            try:
                while pending and not storm.stop.is_set() and assoc.is_established:
                    sop, path = pending[0]
                    with storm.lock:
                        storm.attempts += 1
                    try:
                        rsp = assoc.send_c_store(path)   # raw bytes, by path
                    except Exception:  # noqa: BLE001 - the server vanished mid-message
                        rsp = None
                    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                    if status == 0x0000:
                        with storm.lock:
                            storm.acked[sop] = path
                        pending.pop(0)
                    elif status is None:
                        with storm.lock:
                            storm.aborted += 1
                        break   # not acknowledged: send it again on the next association
                    else:
                        with storm.lock:
                            storm.bad_status.append((sop, status))
                        pending.pop(0)
            finally:
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
        ae.shutdown()
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        storm.errors.append(e)


def start(config: Path, data: Path, log: Path) -> Process:
    with open(log, "ab") as out:
        proc = subprocess.Popen(pacsd_cmd("serve", "--config", str(config)), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Process(proc, data, log).wait_ready(timeout=20)


def wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(POLL)
    return cond()


def assert_indexed(data: Path, sops: set[str]) -> None:
    """Every SOP Instance in `sops` has a row whose file exists (read while pacsd runs: WAL)."""
    if not sops:
        return
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        rows = dict(db.execute("SELECT sop_instance_uid, path FROM instance"))
    finally:
        db.close()
    missing = sops - set(rows)
    assert not missing, f"{len(missing)} acknowledged instance(s) lost by the kill"
    assert all((data / "storage" / rows[s]).is_file() for s in sops)


def c_get_study(port: int, study_uid: str) -> tuple[int, dict[str, tuple[str, bytes]]]:
    return c_get(port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid},
                 CTImageStorage, ExplicitVRLittleEndian)


@pytest.mark.timeout(120)
def test_sigkill_during_store_storm_loses_nothing_acknowledged(tmp_path: Path):
    _config.STORE_SEND_CHUNKED_DATASET = True   # send the files' bytes as they are
    seed = int(os.environ.get("PACSD_STORM_SEED", time.time_ns() % 1_000_000))
    print(f"PACSD_STORM_SEED={seed}")   # shown on failure: rerun with the same kill points
    rng = random.Random(seed)
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data)
    log = tmp_path / "serve.log"

    # One patient/study/series per client, so that a C-GET per study checks each client.
    sent: dict[int, list[tuple[str, Path]]] = {}
    for c in range(CLIENTS):
        paths = write_series(tmp_path / f"src{c}", seed=100 + c, images=IMAGES, size=64)
        sent[c] = [(sop_of(p), p) for p in paths]
    by_sop = {sop: p for files in sent.values() for sop, p in files}
    assert len(by_sop) == CLIENTS * IMAGES

    storm = Storm()
    threads = [threading.Thread(target=client, args=(storm, f"STORM{c}", sent[c]),
                                name=f"storm-{c}", daemon=True) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    proc: Process | None = None
    kills = []
    try:
        acked_at_kill: set[str] = set()
        for rnd in range(ROUNDS):
            proc = start(config, data, log)
            # Recovery is done once the server is ready: what the killed run acknowledged is
            # indexed and on disk before anyone sends again.
            assert_indexed(data, acked_at_kill)
            storm.port = proc.port
            before = storm.ack_count()
            target = before + rng.randint(8, 30)
            assert wait_for(lambda: storm.ack_count() >= target
                            or not any(t.is_alive() for t in threads),
                            storm.deadline - time.monotonic()), "storm made no progress"
            time.sleep(rng.uniform(0, 0.1))   # a random moment, stores in flight
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
            storm.port = 0
            with storm.lock:
                acked_at_kill = set(storm.acked)
            kills.append(len(acked_at_kill) - before)
            # An unclean stop leaves pacsd.json behind: the next start recovers.
            assert (data / "pacsd.json").exists()

        # The last life: let every client finish.
        proc = start(config, data, log)
        assert_indexed(data, acked_at_kill)
        storm.port = proc.port
        for t in threads:
            t.join(max(0.0, storm.deadline - time.monotonic()))
        storm.stop.set()
        assert not any(t.is_alive() for t in threads), "clients did not finish in time"
        assert not storm.errors, storm.errors
        assert storm.bad_status == [], f"unexpected C-STORE statuses: {storm.bad_status[:5]}"
        assert storm.aborted >= 1, "no store was interrupted: the kills hit nothing in flight"
        acked = dict(storm.acked)
        assert set(acked) == set(by_sop), "the surviving server did not store everything"

        # Retrievable, byte for byte, through the server that survived.
        port = proc.port
        for c in range(CLIENTS):
            study = str(dcmread(sent[c][0][1], stop_before_pixels=True).StudyInstanceUID)
            status, received = c_get_study(port, study)
            assert status == 0x0000, f"C-GET of client {c}'s study: 0x{status:04X}"
            assert set(received) == {sop for sop, _ in sent[c]}
            for sop, path in sent[c]:
                assert received[sop] == dataset_bytes(path), f"C-GET of {sop} differs"

        # A clean stop now: exit 0 and the run files gone.
        assert proc.stop() == 0, proc.output()
        assert not (data / "pacsd.json").exists()
        proc = None
    finally:
        storm.stop.set()
        if proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)

    text = log.read_text()
    assert text.count("did not stop cleanly") == ROUNDS, text[-3000:]

    # The files and the index, read directly.
    storage = data / "storage"
    db = sqlite3.connect(data / "index.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = {sop: (path, size, ts) for sop, path, size, ts in db.execute(
            "SELECT sop_instance_uid, path, size, transfer_syntax_uid FROM instance")}
        # Counters kept on write agree with the rows, whatever the kills interrupted.
        for table, parent in (("series", "series_id"),):
            mismatched = db.execute(
                f"SELECT s.id FROM {table} s WHERE s.number_of_instances != "
                f"(SELECT COUNT(*) FROM instance i WHERE i.{parent} = s.id)").fetchall()
            assert mismatched == [], f"{table} counters disagree with the rows"
        assert db.execute("SELECT SUM(number_of_instances) FROM study").fetchone()[0] == len(rows)
        assert db.execute("SELECT SUM(number_of_instances) FROM patient").fetchone()[0] == len(rows)
    finally:
        db.close()

    assert set(rows) == set(by_sop)
    for sop, sent_path in acked.items():
        rel, size, ts = rows[sop]
        stored = storage / rel
        assert stored.is_file(), f"acknowledged {sop}: {rel} is missing"
        assert stored.stat().st_size == size
        assert dataset_bytes(stored) == dataset_bytes(sent_path) == (ts, dataset_bytes(stored)[1])
    on_disk = {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")
               if ".tmp" not in p.relative_to(storage).parts}
    indexed = {rel for rel, _, _ in rows.values()}
    assert len(indexed) == len(rows)
    assert indexed - on_disk == set(), "index rows pointing at no file"
    assert on_disk - indexed == set(), "stored files without an index row"
    assert list((storage / ".tmp").iterdir()) == [], "temporary files left behind"
    recovered = sum(int(m) for m in re.findall(r"recovered (\d+) stored file", text))
    tmp_removed = sum(int(m) for m in re.findall(r"removed (\d+) unfinished", text))
    print(f"storm: {storm.attempts} C-STOREs, {storm.aborted} interrupted, acks per life "
          f"before the kill: {kills}; recovered {recovered} unindexed file(s), removed "
          f"{tmp_removed} temporary file(s), {text.count('duplicate SOP Instance')} duplicate(s)")


@pytest.mark.timeout(60)
def test_second_copy_left_by_a_kill_is_settled_at_restart(tmp_path: Path):
    """A kill between writing a duplicate's file and deleting it (Archive.put: the index said
    "already stored") leaves a second copy of an indexed instance. The next start must not keep
    a file that no row points at: the indexed copy stays, the stray one goes."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data)
    log = tmp_path / "serve.log"
    paths = write_series(tmp_path / "src", seed=9, images=3, size=32)
    from conftest import store_files
    proc = start(config, data, log)
    try:
        assert store_files(proc.port, paths) == [0, 0, 0]
    finally:
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
    storage = data / "storage"
    first = sorted(storage.rglob("*.dcm"))[0]
    stray = first.with_name("0" * 32 + ".dcm")   # what the killed server would have left
    stray.write_bytes(first.read_bytes())

    proc = start(config, data, log)
    try:
        on_disk = {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")}
    finally:
        assert proc.stop() == 0
    db = sqlite3.connect(data / "index.sqlite3")
    try:
        indexed = {p for (p,) in db.execute("SELECT path FROM instance")}
    finally:
        db.close()
    assert len(indexed) == 3
    assert on_disk == indexed, f"files without a row: {on_disk - indexed}"
    assert first.is_file()
