"""DICOM worker processes behind one port, and the supervisor that keeps them (`[dicom] workers`).

Python runs one thread at a time per process: one process serving every association uses one
core. With workers, the server's own process (the supervisor: HTTP, routing, housekeeping, the
pidfile, systemd and pacsd-watchdog) binds the DICOM port and starts N processes
(pacsd.daemon.worker) that all accept on that socket, the way gunicorn's arbiter keeps its
workers: whichever worker is free first takes the next connection, each serves its own
associations on its own core, and each writes the index through its own group-committing writer
(SQLite in WAL mode lets one process write at a time; PostgreSQL does it natively).

The supervisor, over one pipe per direction with each worker:
- counts every worker's associations, so that `max_associations` and
  `max_associations_per_host` hold for the server as a whole (a worker asks before it accepts);
- re-logs their records, so that there is one log, one logbook and one writer of the log file;
- adds up their counters for /metrics and /status;
- restarts a worker that dies (backing off if it keeps dying at start-up), and marks the run
  unclean from when that worker began: the next start then checks the files it may have been
  writing (pacsd.storage.archive.recover), as after a crash of the whole server;
- on stop, tells each worker to finish its associations within the bound, and waits.
A worker ignores SIGINT and SIGTERM (a terminal's Ctrl-C and systemd signal the whole group): it
stops when told, or at once when its supervisor is gone (its pipe closes). Each worker holds the
data folder's lock too, so a new server cannot start while a killed one's workers still write.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pacsd import logbook
from pacsd.config import Config
from pacsd.daemon import worker   # loaded before the zygote is forked: shared by every worker
from pacsd.errors import PortInUse, WorkerFailed

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0   # a worker imports, opens the index and the store, then says ready
STATS_TIMEOUT_S = 2.0
BACKLOG = 128
# A worker that dies within this long of its start is started again only after a pause that
# doubles each time (up to MAX_PAUSE_S): a worker that cannot run must not spin the machine.
EARLY_DEATH_S = 10.0
MAX_PAUSE_S = 30.0


def cores() -> int:
    """The cores this process may run on (taskset, cgroups), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS
        return os.cpu_count() or 1


def worker_count(cfg: Config) -> int:
    """How many DICOM workers `[dicom] workers` asks for (1: none, the server's own process)."""
    return cfg.dicom_workers or cores()


class Child:
    """A worker process as its supervisor sees it (its parent is the zygote, which reaps it
    and says how it ended): the little of subprocess.Popen that the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def wait(self, timeout: float) -> int:
        if not self._ended.wait(timeout):
            raise TimeoutError(f"worker pid {self.pid} still runs")
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Zygote:
    """A copy of the server's process made before it starts any thread, kept only to fork the
    workers from. A worker then shares the server's loaded code and libraries with it (pages
    copied only when written: measured, a worker started as a new interpreter cost 75 MiB of
    PSS, two of them more than the whole server), and fork() is safe only in a process with
    one thread, which the server is not once it runs. The zygote reaps the workers and tells
    the supervisor how each ended; it ignores SIGINT and SIGTERM, and exits when the
    supervisor closes its socket (or dies)."""

    _REPORT = struct.Struct("!cxxxii")   # b"S" pid 0: forked; b"X" pid code: ended; b"E" 0 errno

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:   # the zygote
            ours.close()
            code = 1
            try:
                code = _zygote(theirs)
            finally:
                os._exit(code)
        theirs.close()
        self.pid, self.sock = pid, ours
        self.children: dict[int, Child] = {}
        self._forked: queue.Queue[int | OSError] = queue.Queue()
        self._spawn_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="dicom-zygote", daemon=True)
        self._reader.start()

    def fork(self, fds: list[int], timeout: float = 10.0) -> Child:
        """A new worker running pacsd.daemon.worker.run on (a copy of) these descriptors."""
        with self._spawn_lock:
            socket.send_fds(self.sock, [b"F"], fds)
            try:
                got = self._forked.get(timeout=timeout)
            except queue.Empty:
                raise OSError("the zygote did not answer") from None
            if isinstance(got, OSError):
                raise got
            return self.children[got]

    def _read(self) -> None:
        size = self._REPORT.size
        while True:
            data = b""
            try:
                while len(data) < size:
                    more = self.sock.recv(size - len(data))
                    if not more:
                        raise EOFError
                    data += more
            except (OSError, EOFError):
                break
            kind, pid, value = self._REPORT.unpack(data)
            if kind == b"S":
                self.children[pid] = Child(pid)
                self._forked.put(pid)
            elif kind == b"E":
                self._forked.put(OSError(value, f"cannot fork a worker: {os.strerror(value)}"))
            elif kind == b"X" and pid in self.children:
                self.children.pop(pid).ended(value)
        # The zygote is gone (killed by hand, out of memory): its workers live on, reparented,
        # and their pipes still say when they end; only their exit codes are lost.
        self._forked.put(OSError("the zygote is gone"))

    @property
    def alive(self) -> bool:
        return self._reader.is_alive()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(5)
        for _ in range(50):   # it exits as soon as it sees its socket closed
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.1)
        log.error("the process that forks DICOM workers (pid %d) did not exit; killing it",
                  self.pid)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _zygote(sock: socket.socket) -> int:
    """The zygote's loop: fork a worker for each request, report each one that ends."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):   # the server's to act on
        signal.signal(signum, signal.SIG_IGN)
    gc.freeze()   # the collector never writes to (and so never copies) what the workers share
    report = Zygote._REPORT.pack
    while True:
        ready = select.select([sock], [], [], 0.2)[0]
        while True:   # reap
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            sock.sendall(report(b"X", pid, os.waitstatus_to_exitcode(status)))
        if not ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 8)
        except OSError:
            return 0
        if not msg:
            return 0   # the supervisor closed us, or died
        try:
            pid = os.fork()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            sock.sendall(report(b"E", 0, e.errno or 0))
            continue
        if pid == 0:   # the worker
            sock.close()
            code = 1
            try:
                code = worker.run(fds)
            except BaseException:   # noqa: BLE001 - whatever it was, said before we go
                traceback.print_exc()
            finally:
                logging.shutdown()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        sock.sendall(report(b"S", pid, 0))


class Spawned:
    """A worker started as a new interpreter (`python -m pacsd.daemon.worker`), the way back
    when the zygote is gone: the same face as Child."""

    def __init__(self, fds: list[int]) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "pacsd.daemon.worker",
                                       *map(str, fds)], pass_fds=fds, stdin=subprocess.DEVNULL)
        self.pid = self._proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"worker pid {self.pid} still runs") from None

    def kill(self) -> None:
        self._proc.kill()


class Worker:
    """The supervisor's view of one worker process. It lives as long as its pipe up: a worker
    never closes it, so its end is the worker's end, whoever its parent is."""

    def __init__(self, number: int, proc: Child | Spawned, up: Connection,
                 down: Connection) -> None:
        self.number, self.proc, self.up, self.down = number, proc, up, down
        self.started = time.time()
        self.gone = threading.Event()
        self.ready = threading.Event()
        self.failure = ""
        self.slots: dict[int, str] = {}   # association key -> peer address
        self.down_lock = threading.Lock()
        self.reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tell(self, message: tuple[Any, ...]) -> None:
        with self.down_lock:
            try:
                self.down.send(message)
            except OSError:
                pass   # it died: the watcher deals with that

    def ask(self, message: tuple[Any, ...], timeout: float) -> Any:
        with self.down_lock:
            try:
                self.down.send(message)
                if self.down.poll(timeout):
                    return self.down.recv()
            except (OSError, EOFError):
                pass
        return None


class DicomWorkers:
    """What pacsd.daemon.Server sees of the DICOM side when it runs in workers: the same
    `port`, `alive`, `active_associations`, `figures()` and `stop()` as pacsd.dimse.DicomServer."""

    def __init__(self, cfg: Config, count: int, zygote: Zygote, *, node: str,
                 lock_fd: int | None, on_routed: Callable[[], None] | None = None,
                 on_lost: Callable[[float], None] | None = None) -> None:
        self.cfg, self.count, self.node, self.lock_fd = cfg, count, node, lock_fd
        self.zygote = zygote
        self.on_routed, self.on_lost = on_routed, on_lost
        self.sock: socket.socket | None = None
        self.workers: list[Worker] = []
        self.clean = True   # False once a worker died or did not stop cleanly
        self.restarts = 0
        self._spawning = False   # the zygote is gone: workers are new interpreters
        self._lock = threading.Lock()   # the slots of every worker
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- start -----------------------------------------------------------------------------

    def start(self) -> None:
        self.sock = self._listen()
        try:
            self.workers = [self._spawn(n) for n in range(1, self.count + 1)]
            deadline = time.monotonic() + START_TIMEOUT_S
            for w in self.workers:
                if not w.ready.wait(max(0.0, deadline - time.monotonic())) or w.failure:
                    raise WorkerFailed(f"DICOM worker {w.number} did not start: "
                                       f"{w.failure or 'no sign of life in time'}")
        except BaseException:
            self.stop(timeout=0)
            raise
        self._watcher = threading.Thread(target=self._watch, name="dicom-workers", daemon=True)
        self._watcher.start()
        log.info("DICOM listener %s on %s:%d, %d worker processes (pids %s)", self.cfg.dicom_aet,
                 self.cfg.dicom_bind or "0.0.0.0", self.port, self.count,
                 ", ".join(str(w.pid) for w in self.workers))

    def _listen(self) -> socket.socket:
        host = self.cfg.dicom_bind or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.cfg.dicom_port))
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise PortInUse(f"cannot listen for DICOM on {host}:{self.cfg.dicom_port}: "
                                f"{e.strerror}") from None
            raise
        return sock

    def _spawn(self, number: int) -> Worker:
        assert self.sock is not None
        up_ours, up_theirs = socket.socketpair()
        down_ours, down_theirs = socket.socketpair()
        fds = [up_theirs.fileno(), down_theirs.fileno(), self.sock.fileno()]
        if self.lock_fd is not None:
            fds.append(self.lock_fd)
        try:
            if self.zygote.alive:
                proc: Child | Spawned = self.zygote.fork(fds)
            else:
                if not self._spawning:
                    log.error("the process that forks DICOM workers (pid %d) is gone; workers "
                              "are started as new interpreters from now on (more memory each)",
                              self.zygote.pid)
                    self._spawning = True
                proc = Spawned(fds)
        finally:
            up_theirs.close()
            down_theirs.close()
        w = Worker(number, proc, Connection(up_ours.detach()), Connection(down_ours.detach()))
        w.tell(("hello", {"cfg": self.cfg, "number": number, "node": self.node}))
        w.reader = threading.Thread(target=self._read, args=(w,), name=f"dicom-worker-{number}",
                                    daemon=True)
        w.reader.start()
        return w

    # --- what a worker says ----------------------------------------------------------------

    def _read(self, w: Worker) -> None:
        while True:
            try:
                message = w.up.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "take":
                answer = self._take(w, message[1], message[2])
                try:
                    w.up.send(answer)
                except OSError:
                    break
            elif kind == "spell":
                try:
                    w.up.send(logbook.SPELLS.change(message[1], message[2], holder=w))
                except OSError:
                    break
            elif kind == "give":
                with self._lock:
                    w.slots.pop(message[1], None)
            elif kind == "log":
                _relog(message[1])
            elif kind == "routed" and self.on_routed is not None:
                self.on_routed()
            elif kind == "ready":
                w.ready.set()
            elif kind == "failed":
                w.failure = message[1]
                w.ready.set()
        logbook.SPELLS.forget(w)
        with self._lock:
            w.slots.clear()   # its associations ended with it
        if not w.ready.is_set():
            w.failure = w.failure or "it ended before it was ready"
            w.ready.set()
        w.gone.set()

    def _take(self, w: Worker, key: int, address: str) -> str | None:
        most, per_host = self.cfg.dicom_max_associations, self.cfg.dicom_max_associations_per_host
        with self._lock:
            addresses = [a for x in self.workers for a in x.slots.values()]
            if len(addresses) >= most:
                return f"all {most} associations are in use ([dicom] max_associations)"
            if per_host and (n := addresses.count(address)) >= per_host:
                return (f"that host already has {n} association(s), the most [dicom] "
                        "max_associations_per_host allows")
            w.slots[key] = address
        return None

    # --- what the server asks ----------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    @property
    def alive(self) -> bool:
        """The port is open, the watcher runs, and at least one worker is serving."""
        return (self.sock is not None and self.sock.fileno() >= 0
                and self._watcher is not None and self._watcher.is_alive()
                and any(not w.gone.is_set() and w.ready.is_set() for w in self.workers))

    @property
    def active_associations(self) -> int:
        with self._lock:
            return sum(len(w.slots) for w in self.workers)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if not w.gone.is_set()]

    def figures(self) -> dict[str, Any]:
        """Every worker's counters, added up (a worker that does not answer in time, or was
        restarted, is missing from them), and the associations the supervisor counts."""
        total: dict[str, Any] = {}
        for w in list(self.workers):
            if not w.gone.is_set() and w.ready.is_set():
                part = w.ask(("stats",), STATS_TIMEOUT_S)
                if isinstance(part, dict):
                    _add(total, part)
        total["associations_active"] = self.active_associations
        total["workers"] = len(self.pids())
        total["worker_restarts"] = self.restarts
        return total

    # --- keeping them ------------------------------------------------------------------------

    def _watch(self) -> None:
        early = 0
        while not self._stopping.wait(0.25):
            for i, w in enumerate(list(self.workers)):
                if not w.gone.is_set() or self._stopping.is_set():
                    continue
                lived = time.time() - w.started
                try:
                    code = w.proc.wait(2.0)   # the zygote's word on how it ended
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                except TimeoutError:
                    how = "how, unknown: its parent is gone"
                log.error("DICOM worker %d (pid %d) ended unexpectedly (%s) after %.0f s: its "
                          "associations were cut (nothing they were not answered for is lost); "
                          "the next start checks the files it was writing; starting another",
                          w.number, w.pid, how, lived)
                self.clean = False
                if self.on_lost is not None:
                    self.on_lost(w.started)
                with self._lock:
                    w.slots.clear()
                early = early + 1 if lived < EARLY_DEATH_S else 0
                if early and self._stopping.wait(min(MAX_PAUSE_S, 2.0 ** (early - 1))):
                    return
                try:
                    self.workers[i] = self._spawn(w.number)
                    self.restarts += 1
                except OSError as e:
                    log.error("cannot start DICOM worker %d: %s; trying again", w.number, e)
                    w.started = time.time()

    # --- stop --------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Each worker finishes its associations within `timeout` (then aborts the rest: an
        aborted C-STORE was never answered), flushes its index writer and exits."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for w in self.workers:
            w.tell(("stop", timeout))
        deadline = time.monotonic() + timeout + 30   # + the index writer's flush bound
        for w in self.workers:
            if not w.gone.wait(max(0.0, deadline - time.monotonic())):
                log.error("DICOM worker %d (pid %d) did not stop in time; killing it",
                          w.number, w.pid)
                w.proc.kill()
                self.clean = False
                w.gone.wait(10)
            try:
                code: int | None = w.proc.wait(5)
            except TimeoutError:
                code = None   # not its parent's to say (the zygote died): its pipe closed
            if code not in (0, None):
                self.clean = False
            for conn in (w.up, w.down):
                conn.close()
            if w.reader is not None:
                w.reader.join(5)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.zygote.close()
        if self.workers:
            log.info("DICOM listener stopped (%d worker processes)", len(self.workers))


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Counters of one worker into the sum: numbers add up, dicts of numbers key by key."""
    for key, value in part.items():
        if isinstance(value, dict):
            _add(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


def _relog(fields: dict[str, Any]) -> None:
    """A worker's log record, handled here as if it were ours (one log, one logbook)."""
    record = logging.makeLogRecord(fields)
    logging.getLogger(record.name).handle(record)
