"""From `[index] url` to a peewee database: SQLite (embedded, the default) or PostgreSQL.

    sqlite:///PATH                        one file; one pacsd at a time
    postgresql://USER:PASS@HOST:PORT/DB   a server; several pacsd nodes may share it

Both keep the durability promise: a commit returns only once it is on disk (SQLite:
synchronous=FULL in WAL mode; PostgreSQL: synchronous_commit=on, forced on our sessions whatever
the server's default). What differs between them in SQL is said here, once.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from peewee import Database, SqliteDatabase
from playhouse.pool import PooledPostgresqlDatabase

# What an index URL says (which database, where, shown without secrets) is configuration, read
# before any database is opened: pacsd.config.index_url. Re-exported for the index family.
from pacsd.config.index_url import POSTGRESQL, SQLITE, kind, redacted, sqlite_path

__all__ = ["POSTGRESQL", "SQLITE", "kind", "redacted", "sqlite_path", "connect", "is_disk_full",
           "is_retryable", "now_epoch_sql", "integrity_check"]

# DICOM strings (pacsd.index.models.Text): TEXT; on PostgreSQL compared byte by byte (see Text).
_SQLITE_TYPES = {"PACSD_TEXT": "TEXT"}
_POSTGRES_TYPES = {"PACSD_TEXT": 'TEXT COLLATE "C"'}

# SQLSTATEs after which the same transaction may simply be tried again: serialization failure,
# deadlock (two nodes updating the same study's counters in opposite order), and the
# connection failures of a restarting or failed-over server (class 08, 57P01-57P03).
_RETRYABLE = ("40001", "40P01", "08000", "08001", "08003", "08004", "08006", "57P01", "57P02",
              "57P03")


def connect(url: str, pool_size: int = 20) -> Database:
    """An unconnected peewee database for `url`."""
    if kind(url) == SQLITE:
        return _sqlite(sqlite_path(url))
    return _postgresql(url, pool_size)


def _sqlite(path: Path) -> SqliteDatabase:
    pragmas: dict[str, Any] = {
        "journal_mode": "wal",
        "synchronous": 2,          # FULL: a commit is on disk before it returns
        "busy_timeout": 30000,
        "foreign_keys": 1,
        "cache_size": -32768,      # 32 MiB
        "temp_store": "memory",
    }
    if sys.platform == "darwin":
        pragmas["fullfsync"] = 1
        pragmas["checkpoint_fullfsync"] = 1
    # check_same_thread=False: the writer hands rows around; each thread still gets its own
    # connection from peewee. lock_type: every transaction takes the write lock when it begins
    # (BEGIN IMMEDIATE), waiting up to busy_timeout for another process's writer (DICOM
    # workers, one-shot commands); a transaction that read first and then wrote would instead
    # fail at once with "database is locked" when another process wrote in between.
    return SqliteDatabase(str(path), pragmas=pragmas, check_same_thread=False, timeout=30,
                          field_types=_SQLITE_TYPES, lock_type="IMMEDIATE")


def _postgresql(url: str, pool_size: int) -> PooledPostgresqlDatabase:
    if url.lower().startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    # A pool: each HTTP request or association borrows a connection for its reads and gives it
    # back (pacsd.index.models.reading); `timeout` is how long a thread waits when all are busy.
    return PooledPostgresqlDatabase(
        url, max_connections=pool_size, stale_timeout=600, timeout=30,
        field_types=_POSTGRES_TYPES, prefer_psycopg3=True,
        application_name="pacsd", connect_timeout=10,
        # The durability promise must not depend on the server's postgresql.conf.
        options="-c synchronous_commit=on")


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what caused it (peewee wraps the driver's error)."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not x for x in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def is_disk_full(error: BaseException) -> bool:
    """The index's volume is full: SQLite's SQLITE_FULL ("database or disk is full"),
    PostgreSQL's SQLSTATE 53100 (disk_full: "could not extend file")."""
    for e in _chain(error):
        state = getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate",
                                                         None)
        if state == "53100" or getattr(e, "sqlite_errorcode", None) == 13:   # SQLITE_FULL
            return True
        if type(e).__name__ == "OperationalError" and "database or disk is full" in str(e):
            return True
    return False


class WriteTurn:
    """The turn to write one SQLite index among the processes of one server (its DICOM workers'
    writers and its own): an flock on a file beside the index, held for a whole transaction.

    SQLite would serialize them too, but a writer that finds the database locked sleeps in
    steps of 1, 2, 5, 10 ms... before it looks again, while the lock is held about a millisecond
    (measured: C-STORE over 16 associations with two workers gained 1.3x instead of ~2x). The
    kernel wakes an flock waiter the moment the lock is free; it is released if its holder
    dies, and a one-shot command that writes without it still meets SQLite's own lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._local = threading.Lock()   # one transaction at a time in this process anyway

    def __enter__(self) -> None:
        self._local.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            pass   # no lock file (a read-only folder): SQLite's own lock still holds
        except BaseException:
            self._local.release()
            raise

    def __exit__(self, *_: Any) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._local.release()


def write_turn(url: str) -> AbstractContextManager[Any]:
    """The turn to write the index at `url` (WriteTurn for SQLite; PostgreSQL locks rows)."""
    if kind(url) == SQLITE:
        return WriteTurn(sqlite_path(url).with_name(sqlite_path(url).name + "-writer.lock"))
    return nullcontext()


def is_retryable(error: BaseException) -> bool:
    """A failed transaction that may be tried again as it is (deadlock, lost connection)."""
    if is_disk_full(error):
        return False   # it would fail the same way: see pacsd.index, IndexFull
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:   # peewee wraps the driver's error
        seen.add(id(e))
        state = getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate",
                                                         None)
        if state in _RETRYABLE:
            return True
        if type(e).__name__ in ("OperationalError", "InterfaceError") and \
                type(e).__module__.startswith("psycopg"):
            return True   # the connection broke, with no SQLSTATE to say so
        e = e.__cause__ or e.__context__
    return False


def now_epoch_sql(db: Database) -> str:
    """The database's clock, in seconds since the epoch, as an SQL expression (leases compare
    times from several nodes: one clock for all)."""
    if isinstance(db, SqliteDatabase):
        return "((julianday('now') - 2440587.5) * 86400.0)"
    return "EXTRACT(EPOCH FROM clock_timestamp())::float8"


def integrity_check(db: Database) -> str:
    """'ok', or what the engine found wrong (SQLite's own check; PostgreSQL checks its pages as
    it reads them, so a full read of the catalogue is the test here)."""
    if isinstance(db, SqliteDatabase):
        return db.execute_sql("PRAGMA integrity_check").fetchone()[0]
    db.execute_sql("SELECT count(*) FROM pg_catalog.pg_class").fetchone()
    return "ok"

