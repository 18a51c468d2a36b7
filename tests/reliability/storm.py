"""A C-STORE storm against `pacsd serve` that may be SIGKILLed at any moment, and the checks of
what must survive it. Used by tests/reliability/test_kill_storm.py and tests/test_durability.py.

Clients behave like a modality's store-and-forward queue: an instance not acknowledged (the
association aborted or was refused) is sent again once the server is back, so some resends
arrive as duplicates of instances that were stored but not acknowledged.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import LOCAL, Process, c_get, pacsd_cmd, terminate
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
        self.go = threading.Event()        # cleared by hold(): clients send nothing more
        self.go.set()
        self.deadline = time.monotonic() + deadline

    def ack_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def hold(self) -> None:
        """Clients finish the C-STORE they are in, then wait (associations kept) until resume():
        a killer that must wait for its next moment does not use up the files meanwhile."""
        self.go.clear()

    def resume(self) -> None:
        self.go.set()

    def may_send(self) -> bool:
        """Wait while held; False once stopped or out of time."""
        while not self.go.wait(POLL):
            if self.stop.is_set() or time.monotonic() >= self.deadline:
                return False
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def start_clients(self, sent: dict[int, list[tuple[str, Path]]]) -> list[threading.Thread]:
        threads = [threading.Thread(target=client, args=(self, f"STORM{c}", files),
                                    name=f"storm-{c}", daemon=True) for c, files in sent.items()]
        for t in threads:
            t.start()
        return threads


def ended(storm: Storm, threads: list[threading.Thread], interrupted: bool = True
          ) -> dict[str, Path]:
    """The clients' end, each waited for until the storm's deadline: none still running, none
    failed, no status but those expected; with `interrupted`, a kill cut at least one store.
    What was acknowledged."""
    for t in threads:
        t.join(max(0.0, storm.deadline - time.monotonic()))
    storm.stop.set()
    assert not any(t.is_alive() for t in threads), "clients did not finish in time"
    assert not storm.errors, storm.errors
    assert storm.bad_status == [], f"unexpected C-STORE statuses: {storm.bad_status[:5]}"
    if interrupted:
        assert storm.aborted >= 1, "no store was interrupted: the kills hit nothing in flight"
    with storm.lock:
        return dict(storm.acked)


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def client(storm: Storm, name: str, files: list[tuple[str, Path]]) -> None:
    """Send every file until it is acknowledged, surviving any number of server deaths."""
    try:
        ae = AE(ae_title=name)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        pending = list(files)
        while pending and storm.may_send():
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
                while pending and assoc.is_established and storm.may_send():
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


def launch(config: Path, data: Path, log: Path) -> Process:
    """`pacsd serve`, its output appended to `log`; not waited for (Process.wait_ready)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(pacsd_cmd("serve", "--config", str(config)), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Process(proc, data, log)


def start(config: Path, data: Path, log: Path, timeout: float = 20) -> Process:
    """`pacsd serve` until ready; if it does not get there, it is stopped (never left behind)."""
    proc = launch(config, data, log)
    try:
        return proc.wait_ready(timeout=timeout)
    except BaseException:
        terminate(proc.proc, 10)
        raise


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


# --- processes, as Linux's /proc shows them (the DICOM workers of tests/reliability/
# test_kill_workers.py) --------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, holds nothing any more: not alive)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X", "x")


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _tree(pid: int) -> dict[int, int]:
    """Its live descendants (children, theirs, and so on), each with its parent."""
    parents: dict[int, list[int]] = {}
    for p in _pids():
        fields = _stat(p)
        if fields is not None and fields[0] not in ("Z", "X", "x"):
            parents.setdefault(int(fields[1]), []).append(p)
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child in parents.get(parent, []):
            if child not in out:
                out[child] = parent
                todo.append(child)
    return out


def descendants(pid: int) -> set[int]:
    """Its children, theirs, and so on (live ones only)."""
    return set(_tree(pid))


def age(pid: int) -> float:
    """Seconds since the process began (its fork), from /proc; 0.0 if gone."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    began = int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22: starttime, since boot
    return time.clock_gettime(time.CLOCK_BOOTTIME) - began


def open_files(pid: int) -> set[str]:
    """What its file descriptors point at (paths, "socket:[INODE]"); empty if gone."""
    folder = Path(f"/proc/{pid}/fd")
    out = set()
    try:
        fds = os.listdir(folder)
    except OSError:
        return out
    for fd in fds:
        try:
            out.add(os.readlink(folder / fd))
        except OSError:
            pass
    return out


def holders(target: str, among: set[int] | None = None) -> set[int]:
    """The live processes (all, or those `among`) with a descriptor on `target`."""
    return {p for p in (among if among is not None else _pids())
            if target in open_files(p) and alive(p)}


def listening_socket(port: int) -> str:
    """"socket:[INODE]" of the TCP socket listening on `port` (/proc/net/tcp, tcp6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rpartition(":")[2], 16) == port:   # 0A: LISTEN
                return f"socket:[{f[9]}]"
    raise AssertionError(f"nothing listens on port {port}")


def dicom_workers(server: int, port: int) -> set[int]:
    """The DICOM worker processes of the server `server`: its descendants that accept on its
    DICOM listening socket. Not their parent: the zygote that forks them (pacsd.daemon.workers)
    holds that socket too, for a moment, each time it is handed it for a new worker."""
    tree = _tree(server)
    parents = set(tree.values())
    return holders(listening_socket(port), {p for p in tree if p not in parents})


def kill_tree(proc: Process, timeout: float = 10) -> None:
    """SIGKILL the server and every process of its (the zygote, the DICOM workers) at once,
    as a crash or a power cut would; return once every one of them is gone."""
    tree = descendants(proc.proc.pid)
    for pid in [proc.proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.proc.wait(timeout)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in tree):
        assert time.monotonic() < deadline, f"still running after SIGKILL: {tree}"
        time.sleep(0.02)


def kill_command_midway(args: list[str], data: Path, delay: float) -> bool:
    """Run `pacsd ARGS...` and SIGKILL it `delay` seconds after it marked itself as changing
    the archive (DATA/.commands/PID, pacsd.storage.archive.command_started); whether it was
    still at work when killed (not ended by itself)."""
    job = subprocess.Popen(pacsd_cmd(*args), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    mark = data / ".commands" / str(job.pid)
    try:
        assert wait_for(lambda: mark.exists() or job.poll() is not None, 30)
        assert mark.exists() or job.returncode == 0, f"pacsd {args[0]} failed"
        time.sleep(delay)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(10)
    return job.returncode == -signal.SIGKILL
