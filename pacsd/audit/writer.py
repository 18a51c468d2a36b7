"""The Auditor: records handed over without waiting, written durably by a thread of its own.

`record()` puts the record on a bounded queue and returns; the writer thread takes whatever is
queued, appends it to this process's file as whole JSON lines with one `write()`, and fsyncs
once per batch (group commit, as the index writer does). `close()` writes everything queued
first, so a clean stop loses nothing; under kill -9 only what was queued and not yet synced
(the last few milliseconds) is lost, and a line cut short by the kill is skipped by the reader.

Several processes write at once (the server, its DICOM workers, a command line): each writes
its own file, DATA/audit/ROLE.jsonl (server, dicom-1, dicom-2, cli...), so no two writers share
a file position or a rotation. Files are opened O_APPEND and each batch is one write() of
whole lines, so even two processes of one role (two commands at once, a worker replaced while
its predecessor finishes) never interleave inside a line. Rotation renames ROLE.jsonl to
ROLE-TIME.jsonl; a writer whose file was renamed by another process of its role sees it by the
inode before its next batch and opens the new file. Rotated files older than `keep_days` are
removed (by any writer, at rotation and every hour).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pacsd.audit.record import AuditRecord
from pacsd.audit.syslog import SyslogSender
from pacsd.config import AuditSettings

log = logging.getLogger(__name__)

QUEUE_MAX = 20_000
BATCH_MAX = 2_000
SWEEP_EVERY_S = 3600.0
# Given study UIDs: {study UID: (Patient ID, Patient's Name)} of those stored (pacsd.query).
Resolver = Callable[[list[str]], dict[str, tuple[str, str]]]


def folder_of(data: Path) -> Path:
    return data / "audit"


class Auditor:
    """The audit trail of one process. Never raises into its caller, never blocks on the
    disk or on syslog (only when QUEUE_MAX records wait, for up to a second)."""

    def __init__(self, settings: AuditSettings, data: Path, role: str, source: str = "pacsd",
                 resolve: Resolver | None = None) -> None:
        self.enabled = settings.enabled
        self.settings = settings
        self.folder = folder_of(data)
        self.role = role
        self.source = source
        self.resolve = resolve
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_MAX)
        self._fd = -1
        self._born = 0.0    # when the current file got its first record
        self._size = 0
        self._names: dict[str, tuple[str, str]] = {}   # resolved studies, a small cache
        self._last_sweep = 0.0
        self._thread: threading.Thread | None = None
        self.syslog: SyslogSender | None = None
        if not self.enabled:
            return
        if settings.syslog:
            self.syslog = SyslogSender(settings.syslog, settings.syslog_protocol,
                                       settings.syslog_ca, source)
        self._thread = threading.Thread(target=self._run, name=f"audit-{role}", daemon=True)
        self._thread.start()

    @classmethod
    def off(cls) -> "Auditor":
        """An Auditor that records nothing (audit disabled, or a part built without one)."""
        return cls(AuditSettings(enabled=False), Path("."), "off")

    @property
    def path(self) -> Path:
        return self.folder / f"{self.role}.jsonl"

    # --- callers ------------------------------------------------------------------------------

    def record(self, rec: AuditRecord) -> None:
        """Keep `rec` (written within milliseconds). Cheap; safe from any thread."""
        if not self.enabled or self._thread is None:
            return
        rec.source = rec.source or f"{self.source}/{self.role}"
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            try:
                self._queue.put(rec, timeout=1.0)
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("audit: %d record(s) dropped, the audit writer is stuck (disk "
                              "full or hung?)", self.dropped)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything recorded so far is on disk."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop (and stop the syslog sender)."""
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            self._thread = None
        if self.syslog is not None:
            self.syslog.close()
            self.syslog = None

    # --- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=60.0)
            except queue.Empty:
                self._sweep_if_due()
                continue
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for r in batch if isinstance(r, AuditRecord)]
            stop = any(r is None for r in batch)
            if records:
                try:
                    self._write(records)
                except Exception as e:  # noqa: BLE001 - logged; the server goes on
                    log.error("audit: cannot write %s: %s (%d record(s) lost)", self.path, e,
                              len(records))
                    self._close_file()
            for r in batch:
                if isinstance(r, threading.Event):
                    r.set()
        self._close_file()

    def _resolve(self, records: list[AuditRecord]) -> None:
        """Fill in the patients of records that name studies only (web views, C-STORE), off
        the request's path: one lookup per batch, remembered."""
        if self.resolve is None:
            return
        wanted = {s for r in records if r.studies and not r.patients for s in r.studies[:20]}
        unknown = [s for s in wanted if s not in self._names]
        if unknown:
            try:
                found = self.resolve(unknown[:500])
            except Exception as e:  # noqa: BLE001 - the record is written without them
                log.debug("audit: patients of %d studies not found: %s", len(unknown), e)
                found = {}
            if len(self._names) > 5000:
                self._names.clear()
            self._names.update(found)
        for r in records:
            if r.studies and not r.patients:
                pats = {self._names[s] for s in r.studies[:20] if s in self._names}
                r.patients = sorted(pats)

    def _write(self, records: list[AuditRecord]) -> None:
        self._resolve(records)
        dicts = [r.as_dict() for r in records]
        data = "".join(json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n"
                       for d in dicts).encode("utf-8")
        self._open_for(len(data))
        written = 0
        while written < len(data):   # one write() normally: whole lines, O_APPEND
            written += os.write(self._fd, data[written:])
        _fsync(self._fd)
        self._size += len(data)
        if not self._born:
            self._born = records[0].when
        if self.syslog is not None:
            for d in dicts:
                self.syslog.send(d)

    def _open_for(self, adding: int) -> None:
        s = self.settings
        if self._fd >= 0:
            try:
                renamed = os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
            except FileNotFoundError:
                renamed = True
            if renamed:   # rotated by another process of our role
                self._close_file()
            elif (self._size and self._size + adding > s.rotate_mb * 1_000_000) or (
                    self._born and time.time() - self._born > s.rotate_days * 86400):
                self._rotate()
        if self._fd < 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._size = os.fstat(self._fd).st_size
            self._born = 0.0 if self._size == 0 else _first_time(self.path)
            if fresh:
                _sync_folder(self.folder)
            self._sweep_if_due()

    def _rotate(self) -> None:
        self._close_file()
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
        target = self.folder / f"{self.role}-{stamp}-{os.getpid()}.jsonl"
        try:
            os.rename(self.path, target)
        except FileNotFoundError:
            pass   # another process of our role rotated it
        self._sweep(force=True)

    def _close_file(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
            self._size = 0
            self._born = 0.0

    def _sweep_if_due(self) -> None:
        if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
            self._sweep(force=True)

    def _sweep(self, force: bool = False) -> None:
        """Remove the rotated files past `keep_days` (0: keep them all)."""
        self._last_sweep = time.monotonic()
        days = self.settings.keep_days
        if not days:
            return
        cutoff = time.time() - days * 86400
        try:
            names = list(self.folder.glob("*-*.jsonl"))
        except OSError:
            return
        for p in names:
            if p == self.path:
                continue
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    log.info("audit: %s removed ([audit] keep_days = %g)", p.name, days)
            except OSError:
                pass


def _first_time(path: Path) -> float:
    try:
        with open(path, "rb") as f:
            return float(json.loads(f.readline(1 << 16))["t"])
    except (OSError, ValueError, KeyError, TypeError):
        return time.time()


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        _fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync(fd: int) -> None:
    """To the disk itself: on macOS fsync() stops at the drive's cache (as the store does)."""
    if sys.platform == "darwin":
        import fcntl
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)
