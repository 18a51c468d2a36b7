"""A C-STORE storm against `pacsd serve` that may be SIGKILLed at any moment, and the checks of
what must survive it. Used by tests/reliability/test_kill_storm.py and tests/test_durability.py.

Clients behave like a modality's store-and-forward queue: an instance not acknowledged (the
association aborted or was refused) is sent again once the server is back, so some resends
arrive as duplicates of instances that were stored but not acknowledged.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import LOCAL, Process, c_get, pacsd_cmd
from data import dataset_bytes
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

POLL = 0.01


class Storm:
    """State shared by the client threads and the killer: the live port, the acknowledgements."""

    def __init__(self, deadline: float) -> None:
        self.lock = threading.Lock()
        self.port = 0                      # 0: no server to talk to right now
        self.acked: dict[str, Path] = {}   # SOP Instance UID -> the file that was sent
        self.bad_status: list[tuple[str, int]] = []   # answered, but neither Success nor abort
        self.attempts = 0
        self.aborted = 0
        self.associations = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + deadline

    def ack_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def start_clients(self, sent: dict[int, list[tuple[str, Path]]]) -> list[threading.Thread]:
        threads = [threading.Thread(target=client, args=(self, f"STORM{c}", files),
                                    name=f"storm-{c}", daemon=True) for c, files in sent.items()]
        for t in threads:
            t.start()
        return threads


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
            with storm.lock:
                storm.associations += 1
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


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(POLL)
    return cond()


def indexed_rows(data: Path) -> dict[str, str]:
    """SOP Instance UID -> stored path, read-only (safe while pacsd runs: WAL)."""
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instance"))
    finally:
        db.close()


def assert_indexed(data: Path, sops: set[str]) -> None:
    """Every SOP Instance in `sops` has a row whose file exists (read while pacsd runs: WAL)."""
    if not sops:
        return
    rows = indexed_rows(data)
    missing = sops - set(rows)
    assert not missing, f"{len(missing)} acknowledged instance(s) lost by the kill"
    no_file = {s for s in sops if not (data / "storage" / rows[s]).is_file()}
    assert not no_file, f"{len(no_file)} acknowledged instance(s) indexed without their file"


def c_get_study(port: int, study_uid: str) -> tuple[int, dict[str, tuple[str, bytes]]]:
    return c_get(port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid},
                 CTImageStorage, ExplicitVRLittleEndian)


def assert_retrievable(port: int, sent: dict[int, list[tuple[str, Path]]]) -> None:
    """A C-GET per client's study returns exactly what the client sent, byte for byte."""
    for c, files in sent.items():
        study = str(dcmread(files[0][1], stop_before_pixels=True).StudyInstanceUID)
        status, received = c_get_study(port, study)
        assert status == 0x0000, f"C-GET of client {c}'s study: 0x{status:04X}"
        assert set(received) == {sop for sop, _ in files}
        for sop, path in files:
            assert received[sop] == dataset_bytes(path), f"C-GET of {sop} differs"


def lost(data: Path, acked: dict[str, Path]) -> set[str]:
    """Acknowledged instances without a row, a file, or the very bytes that were sent (pacsd
    keeps the data set as received, under a File Meta group of its own)."""
    rows = indexed_rows(data)
    gone = set()
    for sop, sent_path in acked.items():
        stored = data / "storage" / rows[sop] if sop in rows else None
        if stored is None or not stored.is_file() \
                or dataset_bytes(stored) != dataset_bytes(sent_path):
            gone.add(sop)
    return gone


def assert_archive_sound(data: Path, acked: dict[str, Path], expected: set[str]) -> None:
    """Read with the server stopped: the index passes integrity_check, its counters agree with
    its rows, it holds exactly `expected`, every acknowledged instance is byte-identical, rows
    and files match one to one, and no temporary file is left."""
    storage = data / "storage"
    db = sqlite3.connect(data / "index.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = {sop: (path, size, ts) for sop, path, size, ts in db.execute(
            "SELECT sop_instance_uid, path, size, transfer_syntax_uid FROM instance")}
        # Counters kept on write agree with the rows, whatever the kills interrupted.
        mismatched = db.execute(
            "SELECT s.id FROM series s WHERE s.number_of_instances != "
            "(SELECT COUNT(*) FROM instance i WHERE i.series_id = s.id)").fetchall()
        assert mismatched == [], "series counters disagree with the rows"
        assert db.execute("SELECT SUM(number_of_instances) FROM study").fetchone()[0] == len(rows)
        assert db.execute("SELECT SUM(number_of_instances) FROM patient").fetchone()[0] == len(rows)
    finally:
        db.close()

    assert set(rows) == expected
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
    assert [p for p in (storage / ".tmp").rglob("*") if p.is_file()] == [], \
        "temporary files left behind"
