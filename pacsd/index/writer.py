"""The index's one serialized writer: the database's life cycle (open, close, size, integrity)
and the thread that commits whatever is queued in one transaction.

`Writer.open` binds the models to the database `[index] url` names (pacsd.index.backends: SQLite
by default, PostgreSQL for several nodes) and brings its schema up to date
(pacsd.index.migrations).

Writes go through a single writer thread that commits whatever is queued in one transaction
(group commit): many associations share one fsync of the database, and SQLite never sees two
writers from this process. `submit` returns only once the work is committed.

Several nodes may share one PostgreSQL index, so nothing here relies on being alone:
- every item runs in a savepoint of its own: one bad item spoils no other;
- counters are added up per batch and applied at its end in id order (pacsd.index.counters);
- a batch that meets a deadlock or a lost connection is run again: every item is idempotent;
- the series cache only saves look-ups and is dropped on any error;
- a full volume fails every item with IndexFull, logged once when it begins and once when it
  ends.

What is written lives beside it: instances (pacsd.index.instances) and leases
(pacsd.index.leases); `pacsd.index.Index` is the three together.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Self

from peewee import IntegrityError

from pacsd import logbook
from pacsd.errors import IndexFull, IndexUnavailable
from pacsd.index import backends, counters, migrations
from pacsd.index.counters import Counters
from pacsd.index.timing import CommitTimes
from pacsd.index.models import database, reading

log = logging.getLogger(__name__)

INDEX_FULL = "index-full"   # the spell (pacsd.logbook.Spells) of a full index volume
ATTEMPTS = 5   # tries of one batch that met a deadlock or a lost connection


@dataclass(frozen=True)
class Filed:
    """Where an existing series or study is filed: its study, and that study's patient."""

    study_uid: str
    patient_id: str
    issuer: str
    patient_row: int


class Writer:
    """The database and its writer thread; pacsd.index.Index adds instances and leases."""

    def __init__(self, url: str, *, node: str = "", pool_size: int = 20,
                 auto_migrate: bool = True) -> None:
        self.url = url
        self.backend = backends.kind(url)
        self.label = str(backends.sqlite_path(url)) if self.backend == backends.SQLITE \
            else backends.redacted(url)
        # Who we are in leases and health probes; unique among the nodes of one index.
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self.pool_size = pool_size
        self.auto_migrate = auto_migrate
        self._queue: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        # series UID -> (series, study, patient) ids; touched only by the thread that writes.
        self._cache: dict[str, tuple[tuple[int, int, int], Filed]] = {}
        self._counters = Counters()
        self.commits = 0   # transactions committed by the writer (group commit shows here)
        self.full = False  # the index's volume is full: commits fail until space is freed
        self.retries = 0   # batches run again after a deadlock or a lost connection
        self.commit_times = CommitTimes()   # each committed batch, retries included (/metrics)
        self._turn = backends.write_turn(url)

    # --- life cycle -------------------------------------------------------------------------

    def open(self, writer: bool = True) -> Self:
        if database.obj is not None:
            raise IndexUnavailable("an index is already open in this process")
        try:
            if self.backend == backends.SQLITE:
                backends.sqlite_path(self.url).parent.mkdir(parents=True, exist_ok=True)
            db = backends.connect(self.url, self.pool_size)
            database.initialize(db)
            with database.connection_context():
                if self.auto_migrate or not migrations.version(db):
                    migrations.upgrade(db, self.label)
                else:
                    migrations.check(db, self.label)
                    migrations.fill_search_keys(db, self.label)   # resumes a stopped fill
        except IndexUnavailable:
            database.initialize(None)
            raise
        except Exception as e:  # noqa: BLE001 - any driver error: say which index, and why
            database.initialize(None)
            raise IndexUnavailable(f"cannot open index {self.label}: {e}") from None
        if writer:
            self._writer = threading.Thread(target=self._write_loop, name="index-writer",
                                            daemon=True)
            self._writer.start()
        return self

    def close(self) -> bool:
        """Flush the writer and close; False if the writer did not finish in time."""
        flushed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
            flushed = not self._writer.is_alive()
            if not flushed:
                log.error("the index writer did not finish within 30 s")
            self._writer = None
        if database.obj is not None:
            if not database.is_closed():
                database.close()
            close_all = getattr(database.obj, "close_all", None)
            if close_all is not None:
                close_all()   # the pool's idle connections
            database.initialize(None)
        return flushed

    def reading(self) -> AbstractContextManager[None]:
        return reading()

    # --- the writer thread ------------------------------------------------------------------

    def submit(self, work: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run `work` inside the writer's next transaction; return its result once committed."""
        if self._writer is None:
            # No writer thread (one-shot CLI commands): run it in a transaction of our own.
            with database.connection_context(), database.atomic():
                self._counters = Counters()
                result = work()
                self._apply_counters(self._counters)
                return result
        if not self._writer.is_alive():
            raise IndexUnavailable("the index writer has stopped; see the log")
        fut: Future = Future()
        self._queue.put((work, fut))
        return fut.result(timeout=timeout)

    def _write_loop(self) -> None:
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                # Our turn among the processes writing this index (a DICOM worker's writer and
                # the server's): what is queued while another commits joins this batch.
                with self._turn:
                    stop = self._gather(batch)
                    self._commit(batch)
        finally:
            if not database.is_closed():
                database.close()

    def _gather(self, batch: list[tuple[Callable[[], Any], Future]]) -> bool:
        """Add what is queued to `batch` (500 at most); True if the stop sign was among it."""
        while len(batch) < 500:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                return True
            batch.append(nxt)
        return False

    @property
    def queue_depth(self) -> int:
        """Writes waiting for the writer thread (approximate, as Queue.qsize is)."""
        return self._queue.qsize()

    def _commit(self, batch: list[tuple[Callable[[], Any], Future]]) -> None:
        began = time.perf_counter()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if database.is_closed():
                    database.connect()
                results = self._run(batch)
                break
            except Exception as e:  # noqa: BLE001 - the commit failed: nothing is durable
                self._cache.clear()
                if attempt < ATTEMPTS and backends.is_retryable(e):
                    self.retries += 1
                    log.info("index batch of %d item(s) meets %s; running it again",
                             len(batch), str(e).strip().splitlines()[0][:200])
                    self._drop_connection()
                    time.sleep(0.05 * attempt * attempt)   # at most 1.5 s in all
                    continue
                self._drop_connection()
                if backends.is_disk_full(e):
                    error: BaseException = self._volume_full(e)
                else:
                    log.error("index commit of %d item(s) failed: %s", len(batch), e)
                    error = IndexUnavailable(f"index commit failed: {e}")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                return
        self.commits += 1
        # From the batch's start to its durable commit: what the C-STOREs in it waited.
        self.commit_times.observe(time.perf_counter() - began)
        if self.full:
            self.full = False
            if logbook.spell(INDEX_FULL, False):
                log.warning("the index %s accepts writes again: storing resumes", self.label)
        for fut, value, failure in results:
            if failure is not None:
                fut.set_exception(failure)
            else:
                fut.set_result(value)

    def _run(self, batch: list[tuple[Callable[[], Any], Future]]
             ) -> list[tuple[Future, Any, BaseException | None]]:
        """One transaction: every item in a savepoint of its own, then the counters."""
        results: list[tuple[Future, Any, BaseException | None]] = []
        batch_counts = Counters()
        with database.atomic():
            for work, fut in batch:
                for attempt in (1, 2):
                    self._counters = Counters()   # this item's: counted only if it stays
                    try:
                        with database.atomic():   # a savepoint: one bad item spoils no other
                            results.append((fut, work(), None))
                        batch_counts.merge(self._counters)
                        break
                    except Exception as e:   # handed back to the caller
                        if backends.is_retryable(e) or backends.is_disk_full(e):
                            raise   # the whole transaction is spoilt: run the batch again
                        # The cache may name rows the savepoint rolled back, or a series that
                        # another node deleted (a foreign key error): once more without it.
                        self._cache.clear()
                        if attempt == 2 or not isinstance(e, IntegrityError):
                            results.append((fut, None, e))
                            break
            self._apply_counters(batch_counts)
        return results

    def _volume_full(self, e: Exception) -> IndexFull:
        """A commit failed for want of space on the index's volume: the error every item gets;
        logged once when it begins (never per image), and once when it ends (_commit)."""
        where = f"the volume of {self.label}" if self.backend == backends.SQLITE \
            else f"the PostgreSQL server's volume ({self.label})"
        if not self.full:
            self.full = True
            if logbook.spell(INDEX_FULL, True):   # once for the server, not per process
                log.error("the index volume is full (%s: %s): nothing can be stored "
                          "(C-STORE 0xA700, STOW-RS 507) until space is freed there; a restart "
                          "would not help. Queries and retrieves go on", where,
                          str(e).strip().splitlines()[0][:200])
        return IndexFull(f"the index volume is full ({where})")

    def _drop_connection(self) -> None:
        """After a failed transaction: a broken connection is closed, so the next batch takes
        a fresh one."""
        try:
            if not database.is_closed() and not database.is_connection_usable():
                database.close()
        except Exception as e:  # noqa: BLE001 - it is being thrown away
            log.debug("closing a broken index connection: %s", e)

    def _apply_counters(self, c: Counters) -> None:
        counters.apply(c, self.backend == backends.POSTGRESQL)

    # --- the database's health --------------------------------------------------------------

    def size_bytes(self) -> int:
        """The index's size on disk: SQLite's file and journals, or PostgreSQL's database."""
        if self.backend == backends.SQLITE:
            path, total = backends.sqlite_path(self.url), 0
            for suffix in ("", "-wal", "-shm"):
                try:
                    total += os.stat(f"{path}{suffix}").st_size
                except OSError:
                    pass
            return total
        with reading():
            return int(database.execute_sql(
                "SELECT pg_database_size(current_database())").fetchone()[0])

    def integrity_check(self) -> str:
        with reading():
            return backends.integrity_check(database.obj)
