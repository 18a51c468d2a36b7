"""Start and stop the server: lock, store, index, recovery, listeners, pidfile, signals.

Start: take an exclusive lock on the data folder (two servers on one SQLite index must never
run) -> if a pidfile is there, the previous run did not stop cleanly: note when it began ->
write our pidfile -> our node id (DATA/node-id) -> open the store (drop our temporary files) and
the index (migrating its schema) -> index the files an unclean run wrote but did not commit ->
housekeeping (pacsd.storage.housekeeping) -> open the listeners -> write pacsd.json (pid, ports, node).
Several nodes may share one PostgreSQL index and one storage folder, each with its own DATA.
Stop (SIGTERM/SIGINT): stop accepting, let associations finish within a bound, flush the index
writer, and only then remove the pidfile and pacsd.json. SIGUSR1 dumps every thread's stack.
Under systemd (Type=notify, pacsd/systemd.py) `pacsd serve` says READY=1 once both listeners
accept, WATCHDOG=1 only while a health check passes, and STOPPING=1 when it begins to stop.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pacsd import __version__, compat, logbook, systemd
from pacsd.imaging import bounds
from pacsd.storage.archive import Archive, interrupted_commands
from pacsd.storage.housekeeping import Housekeeping
from pacsd.storage.compression import Compressor
from pacsd.storage.integrity import Scrubber
from pacsd.storage.retention import Retainer
from pacsd.config import Config
from pacsd.daemon.shared import dump_stacks, new_auditor, notify_stored
from pacsd.daemon.workers import DicomWorkers, Zygote, worker_count
from pacsd.audit import Auditor
from pacsd.dimse import DicomServer
from pacsd.accounts import Accounts
from pacsd.errors import AlreadyRunning, FolderNotWritable, IndexFull, IndexUnavailable
from pacsd.hl7 import MllpListener, Receiver
from pacsd.plugins.hooks import Context, Hooks
from pacsd.index import Index
from pacsd.logbook import Logbook
from pacsd.nodes.routing import Router
from pacsd.storage.store import Store, fsync_fd
from pacsd.web import HttpServer, Runtime

log = logging.getLogger(__name__)

ORPHANS_S = 15.0   # how long a start waits for the workers of a killed server to finish


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        fsync_fd(f.fileno())
    os.replace(tmp, path)


def lock_data_folder(data: Path) -> int:
    """Exclusive lock held for the life of the process (released by the kernel on any exit)."""
    try:
        data.mkdir(parents=True, exist_ok=True)
        fd = os.open(data / "pacsd.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError):
        raise FolderNotWritable(f"data folder {data} is not writable: it, or a folder above "
                                "it, is a file") from None
    except OSError as e:
        raise FolderNotWritable(f"data folder {data} is not writable: {e.strerror or e}") from None
    deadline = time.monotonic() + ORPHANS_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            pid = ""
            try:
                pid = (data / "pacsd.pid").read_text().strip()
            except OSError:
                pass
            # The DICOM workers of a server that was killed hold the lock until they have
            # cut their associations and flushed their writes (pacsd.daemon.workers): wait.
            if _alive(pid) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    os.close(fd)
    raise AlreadyRunning(f"another pacsd{' (pid ' + pid + ')' if pid else ''} is using "
                         f"data folder {data}")


def _alive(pid: str) -> bool:
    """Whether the process of a pidfile's text runs (True when unknown: no pid to check)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def dicom_workers(dicom: DicomServer | DicomWorkers) -> Callable[[], tuple[int, int]]:
    """For /status: the DICOM worker processes alive, and how many were replaced since start
    ((0, 0) when the DICOM side runs in the server's own process)."""
    if isinstance(dicom, DicomWorkers):
        return lambda: (len(dicom.pids()), dicom.restarts)
    return lambda: (0, 0)


def node_id(data: Path) -> str:
    """This node's name among those sharing an index and a storage volume: the host name and a
    random tag made once per data folder (two nodes may run on one host), kept in DATA/node-id.
    Safe as a folder name."""
    path = data / "node-id"
    try:
        name = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            return name
    except OSError:
        pass
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "node"
    name = f"{host}-{secrets.token_hex(4)}"
    write_atomic(path, name + "\n")
    return name


class Server:
    """The whole server in one object, for `pacsd serve` and for tests (in-process)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started = 0.0
        self._lock_fd: int | None = None
        self.index: Index | None = None
        self.store: Store | None = None
        self.node = ""
        self.housekeeping: Housekeeping | None = None
        self.scrubber: Scrubber | None = None
        self.compressor: Compressor | None = None
        self.hooks: Hooks | None = None
        self.router: Router | None = None
        self.dicom: DicomServer | DicomWorkers | None = None
        self._unclean = False   # a DICOM worker died: the next start checks its files
        self.http: HttpServer | None = None
        self.hl7: MllpListener | None = None    # [hl7] port 0: off
        self.runtime: Runtime | None = None
        self.logbook = Logbook()
        self.audit: Auditor | None = None
        self._stop = threading.Event()

    @property
    def dicom_port(self) -> int:
        assert self.dicom is not None
        return self.dicom.port

    @property
    def http_url(self) -> str:
        assert self.http is not None
        host = self.cfg.http_bind if self.cfg.http_bind not in ("", "0.0.0.0", "::") \
            else "127.0.0.1"
        return f"{self.http.scheme}://{host}:{self.http.port}"

    def start(self) -> "Server":
        cfg = self.cfg
        self._lock_fd = lock_data_folder(cfg.data)
        self.logbook.preload(cfg.log_path)
        self.logbook.attach()
        logbook.SPELLS.clear()
        zygote: Zygote | None = None
        try:
            # What pacsd patches in pynetdicom, pydicom and cheroot, against the installed
            # versions: a speed patch that no longer fits is logged and falls back; a safety
            # patch that no longer fits stops the start here (LibraryMismatch).
            compat.enforce()
            # DICOM workers are forked from a copy of this process made now, while it runs
            # one thread and every library is loaded and patched (pacsd.daemon.workers.Zygote).
            workers = worker_count(cfg)
            zygote = Zygote() if workers > 1 else None
            # The pidfile is written before anything can be stored and removed only after a
            # clean stop, so finding one means: recover what that run may have left half done.
            unclean_since = self._previous_run()
            self.started = time.time()
            write_atomic(cfg.pidfile, f"{os.getpid()}\n")
            self.node = node_id(cfg.data)
            bounds.configure(bounds.Limits.from_settings(cfg.dicom))
            self.store = store = Store(cfg.storage_path, cfg.storage_min_free_mb,
                                       node=self.node)
            store.open()
            self.index = Index(cfg.index_url, node=self.node, pool_size=cfg.index_pool_size,
                               auto_migrate=cfg.index_auto_migrate).open()
            archive = Archive(store, self.index, overwrite=cfg.storage_overwrite,
                              patient_mismatch=cfg.storage_patient_mismatch,
                              on_conflict=cfg.storage_on_conflict,
                              trash_days=cfg.storage_trash_days,
                              rejection_notes=cfg.storage_rejection_notes)
            archive.label_rules = cfg.label_rules
            accounts = Accounts(cfg, self.index).open()
            accounts.check_http_bind(cfg.http_bind)   # beyond loopback: an administrator
            self.audit = new_auditor(cfg, "server")
            if unclean_since is not None:
                log.warning("the previous run did not stop cleanly; checking the files it wrote")
                archive.recover(since=unclean_since - 60, until=self.started)
            killed_since, marks = interrupted_commands(cfg.data)
            if killed_since is not None:
                log.warning("a command changing the archive (a correction, a restore) was "
                            "stopped before it finished; checking the files it wrote")
                archive.recover(since=killed_since - 60, until=self.started)
                for mark in marks:
                    mark.unlink(missing_ok=True)
            self.housekeeping = Housekeeping(
                self.index, store, cfg.housekeeping_interval, archive.bin,
                Retainer(archive, cfg.retention, str(cfg.storage_path)),
                cfg.worklist if cfg.worklist.enabled else None,
                cfg.hooks_study_stable_after).start()
            if cfg.compression:
                self.compressor = Compressor(archive, cfg.compression).start()
            if cfg.storage_scrub_days > 0:
                self.scrubber = Scrubber(store, self.index, cfg.storage_scrub_days,
                                         cfg.storage_scrub_mb_per_s).start()
            self.hooks = Hooks(cfg, Context(cfg.dicom_aet, cfg.data))
            if self.hooks.has("on_instance_stored"):
                archive.on_stored = partial(notify_stored, self.hooks, store)
            self.router = Router(cfg, self.index, store, accounts, self.hooks).start()
            if self.router.stored_routes:
                archive.routes_for = self.router.for_instance
            if zygote is not None:   # several processes behind the port (.workers)
                self.dicom = DicomWorkers(cfg, workers, zygote, node=self.node,
                                          lock_fd=self._lock_fd, on_routed=self.router.wake,
                                          on_lost=self._worker_lost)
                zygote = None   # theirs now
            else:
                self.dicom = DicomServer(cfg, archive, accounts, self.hooks, audit=self.audit)
            self.dicom.start()
            dicom = self.dicom
            self.runtime = Runtime(cfg, archive, accounts, self.started,
                                   lambda: dicom.active_associations, self.logbook,
                                   hooks=self.hooks, outbox=self.router.outbox,
                                   dicom_stats=dicom.figures,
                                   dicom_workers=dicom_workers(dicom), audit=self.audit)
            self.http = HttpServer(self.runtime)
            self.http.start()
            if cfg.hl7.port:   # orders and patient updates from a RIS or HIS (pacsd.hl7)
                self.hl7 = MllpListener(cfg.hl7, Receiver(
                    archive, self.audit, cfg.hl7.application, cfg.hl7.encoding)).start()
            write_atomic(cfg.runfile, json.dumps({
                "pid": os.getpid(), "version": __version__, "started": self.started,
                "aet": cfg.dicom_aet, "dicom_bind": cfg.dicom_bind, "dicom_port": self.dicom_port,
                "http_bind": cfg.http_bind, "http_port": self.http.port,
                "http_scheme": self.http.scheme,
                "hl7_port": self.hl7.port if self.hl7 else 0,
                "storage": str(cfg.storage_path), "index": cfg.index_label,
                "node": self.node}, indent=1))
        except BaseException:
            if zygote is not None:
                zygote.close()
            self.stop()
            raise
        log.info("pacsd %s ready: %s on DICOM port %d, HTTP port %d, storage %s, index %s "
                 "(node %s)", __version__, cfg.dicom_aet, self.dicom_port,
                 self.http.port if self.http else 0, cfg.storage_path, cfg.index_label,
                 self.node)
        return self

    def _previous_run(self) -> float | None:
        """When the previous run began, if it did not stop cleanly (its pidfile is still here)."""
        try:
            return self.cfg.pidfile.stat().st_mtime
        except OSError:
            return None

    def _worker_lost(self, since: float) -> None:
        """A DICOM worker died: the files it was writing are checked at the next start, from
        when it began (the pidfile's time is where recovery starts)."""
        if not self._unclean:
            self._unclean = True
            try:
                os.utime(self.cfg.pidfile, (since, since))
            except OSError:
                pass

    def stop(self) -> None:
        flushed = True
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.hl7 is not None:   # before the index: a message being applied finishes
            self.hl7.stop()
            self.hl7 = None
        if self.runtime is not None:
            self.runtime.jobs.shutdown()
            self.runtime = None
        if self.dicom is not None:
            self.dicom.stop()
            if isinstance(self.dicom, DicomWorkers) and not self.dicom.clean:
                self._unclean = True
            self.dicom = None
        if self.router is not None:
            self.router.stop()
            self.router = None
        if self.scrubber is not None:
            self.scrubber.stop()
            self.scrubber = None
        if self.compressor is not None:
            self.compressor.stop()
            self.compressor = None
        if self.store is not None:
            self.store.close()   # its writing threads (every file begun is finished by now)
            self.store = None
        if self.housekeeping is not None:
            self.housekeeping.stop()
            self.housekeeping = None
        if self.audit is not None:   # before the index: it looks up patients
            self.audit.close()
            self.audit = None
        if self.index is not None:
            flushed = self.index.close()   # flushes the writer queue first
            self.index = None
        if self._lock_fd is not None:
            # The pidfile of a run that did not finish its work is the sign that the next start
            # must recover: only a run that started and flushed everything removes it.
            if self.started and flushed and not self._unclean:
                for p in (self.cfg.runfile, self.cfg.pidfile):
                    try:
                        p.unlink()
                    except OSError:
                        pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.hooks is not None:
            self.hooks.close()
            self.hooks = None
        self.logbook.detach()

    # --- `pacsd serve` ----------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stop.set()   # only a flag: the main loop does the work (signal-safe)

    def catch_signals(self) -> "Server":
        """SIGTERM and SIGINT become a stop request. `pacsd serve` calls this before start():
        a stop asked for while starting (pacsd.json is written before start() returns) is then
        a clean stop once started, not a death by the default action."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, dump_stacks)
        return self

    def serve_forever(self) -> None:
        self.catch_signals()
        assert self.http is not None
        status = (f"serving: {self.cfg.dicom_aet} on DICOM port {self.dicom_port}, "
                  f"HTTP port {self.http.port}")
        systemd.notify("READY=1", f"STATUS={status}")   # start() returned: both ports accept
        health: threading.Thread | None = None
        interval = systemd.watchdog_interval()
        if interval is not None:
            health = threading.Thread(target=self._watchdog, args=(interval, status),
                                      name="systemd-watchdog", daemon=True)
            health.start()
        try:
            while not self._stop.wait(1.0):
                pass
            log.info("stopping on request")
        finally:
            self._stop.set()   # also ends the health loop
            systemd.notify("STOPPING=1")
            if health is not None:
                health.join(_check_timeout(interval or 0) + 1)
            self.stop()
            log.info("pacsd stopped")

    # --- systemd's watchdog (WatchdogSec) ---------------------------------------------------
    # A timer alone would tell systemd we are alive while the index is wedged: WATCHDOG=1 is
    # sent only after the server passed a real check, so a sick pacsd stops pinging and systemd
    # restarts it. A check that hangs sends nothing either, which is the point.

    def _watchdog(self, interval: float, status: str) -> None:
        healthy = True
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                problem = self.health_problem(_check_timeout(interval))
            except Exception as e:  # noqa: BLE001 - a failed check, never a dead loop
                problem = f"the check itself failed: {e!r}"
            if self._stop.is_set():   # a stop began meanwhile: what failed is the stopping
                return
            if problem is None:
                if not healthy:
                    log.info("health check passed again; telling systemd we are alive")
                systemd.notify("WATCHDOG=1", f"STATUS={status}")
            else:
                log.warning("health check failed: %s; not telling systemd we are alive (it "
                            "restarts pacsd once WatchdogSec passes without a sign)", problem)
                systemd.notify(f"STATUS=unhealthy: {problem}")
            healthy = problem is None
            self._stop.wait(max(0.0, began + interval - time.monotonic()))

    def health_problem(self, timeout: float) -> str | None:
        """What is wrong with the running server, or None: cheap checks, each bounded."""
        index, dicom, http = self.index, self.dicom, self.http
        if index is None or dicom is None or http is None:
            return "the server is not running"
        if not dicom.alive:
            return "the DICOM listener no longer accepts connections"
        if not http.alive:
            return "the HTTP server no longer runs"
        if self.hl7 is not None and not self.hl7.alive:
            return "the HL7 listener no longer accepts connections"
        if not self.cfg.storage_path.is_dir():
            return f"the storage folder {self.cfg.storage_path} is missing"
        try:
            index.probe(timeout=timeout)   # a read and a write through the one index writer
        except TimeoutError:
            return (f"the index {self.cfg.index_label} did not take a test write within "
                    f"{timeout:g} s (locked by another program, or the disk is stuck)")
        except IndexUnavailable as e:
            return f"the index {self.cfg.index_label} is unavailable: {e}"
        except IndexFull:
            # The server is alive; its index volume is full (logged where it arises). A
            # restart by systemd would meet the same full volume: keep telling it we live.
            return None
        return None


def _check_timeout(interval: float) -> float:
    """How long the index may take to answer a health check: well within one interval."""
    return min(interval / 2, 10.0)
