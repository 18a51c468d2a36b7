"""`pacsd index copy`: the whole index into another database, rows keeping their ids, so that a
clinic moves its SQLite index to PostgreSQL (or back) without sending its images again.

The tables of pacsd.index.models are copied parents first (patient, study, series, instance, then
the index's facts, nodes and users; never the leases, nor the schema version and the health
marks, which belong to each database), in id order, in batches of one transaction each. The
target's schema is made by pacsd.index.migrations, as `pacsd serve` would make it.

Resumable: a batch is committed whole or not at all, so after an interruption the target holds
each table's rows up to some id, and the next run carries on after the highest id it finds
(rows are inserted with ON CONFLICT DO NOTHING: a row met again costs nothing). A target that
holds anything else (an id with another UID, a row the source does not have) is refused
before anything is written: archives are never merged.

Both databases are open at once, through plain SQL on two peewee databases; the models'
global proxy (pacsd.index.models.database) is only bound, for the migrations, inside `bind_ctx`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self
from urllib.parse import urlsplit

from peewee import BooleanField, Database, DateTimeField, Field, Model, SqliteDatabase

from pacsd.compat import peewee as peewee_meta
from pacsd.index import backends, counters
from pacsd.index import migrations
from pacsd.errors import EXIT_FAILURE, IndexUnavailable, PacsError
from pacsd.index.models import (
    DICOM_MODELS,
    MODELS,
    Instance,
    Meta_,
    NodeRow,
    Patient,
    Series,
    Study,
    UserRow,
    database,
)

log = logging.getLogger(__name__)

# Parents before children (the foreign keys hold at every commit); pacsd_lease is not copied:
# a lease names a node of the source's and a time by its clock.
COPIED: tuple[type[Model], ...] = (Patient, Study, Series, Instance, Meta_, NodeRow, UserRow)

# What identifies a row, whatever its id: the target's rows must be the source's.
_IDENTITY: dict[type[Model], tuple[str, ...]] = {
    Patient: ("patient_id", "issuer_of_patient_id"),
    Study: ("study_instance_uid",),
    Series: ("series_instance_uid",),
    Instance: ("sop_instance_uid", "path"),
}

# The counters (PS3.4 C.3.4 Number of ... Related ...) and sizes, compared as sums at the end.
_SUMS: tuple[tuple[type[Model], str], ...] = (
    (Patient, "number_of_studies"), (Patient, "number_of_series"),
    (Patient, "number_of_instances"), (Study, "number_of_series"),
    (Study, "number_of_instances"), (Series, "number_of_instances"), (Instance, "size"))

_SAMPLES = 16        # ids of each table of the target compared with the source's before copying

OnProgress = Callable[[str, int, int, float], None]   # (table, rows done, rows in all, rows/s)


class CopyRefused(PacsError):
    """The copy cannot start (or go on) as things are; nothing was written."""

    exit_code = EXIT_FAILURE


def _meta_copied(key: str) -> bool:
    """pacsd_meta rows that describe the archive, not the database: not the schema version
    (the target's own, from its migrations) nor the nodes' health-probe marks."""
    return key != "schema_version" and not key.startswith("alive:")


def _timestamp(value: Any) -> Any:
    # SQLite keeps pacsd's 'YYYY-MM-DD HH:MM:SS' strings, which PostgreSQL casts on insert;
    # PostgreSQL hands back datetimes, which SQLite gets in the same text form.
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="microseconds" if value.microsecond
                               else "seconds")
    return value


def _boolean(value: Any) -> Any:
    return value if value is None else bool(value)   # SQLite's 0/1; PostgreSQL wants a bool


def _converter(fields: list[Field]) -> Callable[[tuple], tuple]:
    """Makes a source row fit any target: only booleans and timestamps differ."""
    conv = [(i, _boolean if isinstance(f, BooleanField) else _timestamp)
            for i, f in enumerate(fields) if isinstance(f, (BooleanField, DateTimeField))]
    if not conv:
        return tuple

    def convert(row: tuple) -> tuple:
        out = list(row)
        for i, fn in conv:
            out[i] = fn(out[i])
        return tuple(out)
    return convert


@dataclass
class Check:
    """One figure compared at the end: a table's rows or a sum of a column."""

    what: str
    source: int
    target: int

    @property
    def ok(self) -> bool:
        return self.source == self.target


@dataclass
class Copied:
    table: str
    rows: int        # rows in the source
    before: int      # rows the target held already (an earlier, interrupted run)
    copied: int      # rows inserted by this run
    seconds: float


def label(url: str) -> str:
    return str(backends.sqlite_path(url)) if backends.kind(url) == backends.SQLITE \
        else backends.redacted(url)


def same_database(a: str, b: str) -> bool:
    if backends.kind(a) != backends.kind(b):
        return False
    if backends.kind(a) == backends.SQLITE:
        return backends.sqlite_path(a).resolve() == backends.sqlite_path(b).resolve()
    pa, pb = urlsplit(a), urlsplit(b)
    return ((pa.hostname or "localhost"), pa.port or 5432, pa.path.strip("/")) == \
        ((pb.hostname or "localhost"), pb.port or 5432, pb.path.strip("/"))


class IndexCopy:
    """with IndexCopy(source, target) as c: c.prepare(); c.copy(progress); c.verify()

    For a one-shot command: not in a process that has an Index open (see __enter__)."""

    def __init__(self, source_url: str, target_url: str, *, batch: int = 5000,
                 migrate_source: bool = True) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        for url in (source_url, target_url):
            backends.kind(url)   # ValueError for what is not an index URL
        self.source_url, self.target_url = source_url, target_url
        self.source_label, self.target_label = label(source_url), label(target_url)
        self.batch = batch
        self.migrate_source = migrate_source
        self.src: Database | None = None
        self.dst: Database | None = None

    # --- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if database.obj is not None:
            # prepare() binds the models to each database in turn: not beside an open Index.
            raise RuntimeError("IndexCopy cannot run in a process with an open index")
        if same_database(self.source_url, self.target_url):
            raise CopyRefused(f"the target {self.target_label} is the configured index itself")
        if backends.kind(self.source_url) == backends.SQLITE and \
                not backends.sqlite_path(self.source_url).is_file():
            raise CopyRefused(f"there is no index at {self.source_label}: nothing to copy")
        try:
            self.src = self._open(self.source_url, self.source_label, "source")
            if backends.kind(self.target_url) == backends.SQLITE:
                backends.sqlite_path(self.target_url).parent.mkdir(parents=True, exist_ok=True)
            self.dst = self._open(self.target_url, self.target_label, "target")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _open(url: str, name: str, role: str) -> Database:
        db = backends.connect(url, pool_size=1)
        try:
            db.connect()
        except Exception as e:  # noqa: BLE001 - the driver's own error: which index, and why
            raise IndexUnavailable(f"cannot open the {role} index {name}: "
                                   f"{str(e).strip()}") from None
        return db

    def close(self) -> None:
        for db in (self.src, self.dst):
            if db is None:
                continue
            try:
                if not db.is_closed():
                    db.close()
                getattr(db, "close_all", lambda: None)()   # a pool's idle connections
            except Exception:   # closing after an error: nothing left to save
                log.debug("closing %s", db, exc_info=True)
        self.src = self.dst = None

    @property
    def _dbs(self) -> tuple[Database, Database]:
        if self.src is None or self.dst is None:
            raise RuntimeError("IndexCopy is not open")
        return self.src, self.dst

    # --- before copying ---------------------------------------------------------------------

    def prepare(self) -> list[str]:
        """Check both databases, then bring their schemas to migrations.LATEST; what was done,
        in words. CopyRefused (before anything is written) if the copy cannot go ahead."""
        src, dst = self._dbs
        with src.bind_ctx(MODELS):
            v = migrations.version(src)
        if v == 0:
            raise CopyRefused(f"the index {self.source_label} has no tables: nothing to copy")
        if v > migrations.LATEST:
            raise CopyRefused(f"the index {self.source_label} has schema {v}, newer than this "
                              f"pacsd ({migrations.LATEST}); upgrade pacsd")
        if v < migrations.LATEST and not self.migrate_source:
            raise CopyRefused(f"the index {self.source_label} has schema {v}; this pacsd "
                              f"copies schema {migrations.LATEST}: run `pacsd migrate` first "
                              "([index] auto_migrate is false)")
        self._check_target()
        done = []
        with src.bind_ctx(MODELS):
            done += [f"source {self.source_label}: {line}"
                     for line in migrations.upgrade(src, self.source_label)]
        with dst.bind_ctx(MODELS):
            done += [f"target {self.target_label}: {line}"
                     for line in migrations.upgrade(dst, self.target_label)]
        return done

    def _refuse(self, what: str) -> CopyRefused:
        return CopyRefused(
            f"the target {self.target_label} already holds other data: {what}. Nothing was "
            "written. Copy into an empty database (e.g. `createdb`), or empty this one first "
            "if what it holds is not needed.")

    def _check_target(self) -> None:
        """The target must be empty, or hold a prefix of the source (an interrupted copy):
        per table, the same rows up to its highest id. Compared: the first and last ids and
        some between them (identities), and the number of rows up to the last id."""
        src, dst = self._dbs
        tables = set(dst.get_tables())
        for model in DICOM_MODELS:
            table = peewee_meta.table_name(model)
            if table not in tables:
                continue
            n, lo, hi = dst.execute_sql(
                f"SELECT COUNT(*), MIN(id), MAX(id) FROM {table}").fetchone()
            if not n:
                continue
            keys = ", ".join(_IDENTITY[model])
            ids = sorted({lo, hi, *(lo + (hi - lo) * k // (_SAMPLES - 1)
                                    for k in range(1, _SAMPLES - 1))})
            for wanted in ids:
                there = dst.execute_sql(
                    f"SELECT id, {keys} FROM {table} WHERE id >= {dst.param} ORDER BY id "
                    "LIMIT 1", (wanted,)).fetchone()
                here = src.execute_sql(f"SELECT id, {keys} FROM {table} WHERE id = {src.param}",
                                       (there[0],)).fetchone()
                if here is None or tuple(here) != tuple(there):
                    raise self._refuse(
                        f"its {table} row {there[0]} is {tuple(there[1:])!r}, "
                        + (f"the source's is {tuple(here[1:])!r}" if here is not None
                           else "the source has no such row"))
            mine = src.execute_sql(f"SELECT COUNT(*) FROM {table} WHERE id <= {src.param}",
                                   (hi,)).fetchone()[0]
            if mine != n:
                raise self._refuse(
                    f"it has {n} {table} row(s) with ids up to {hi}, the source {mine} (if it is "
                    "an interrupted copy, the source has changed since: pacsd ran in between)")
        for small in (Meta_, NodeRow, UserRow):
            table = peewee_meta.table_name(small)
            if table not in tables:
                continue
            ours = dict(self._small_rows(src, small)) if table in src.get_tables() else {}
            for key, row in self._small_rows(dst, small):
                if ours.get(key) != row:
                    raise self._refuse(f"its {table} row {key!r} is not the source's")

    def _small_rows(self, db: Database, model: type[Model]) -> Iterator[tuple[Any, tuple]]:
        """(primary key, row) of a small table (facts, nodes, users), as the target gets them."""
        fields = peewee_meta.sorted_fields(model)
        cols = ", ".join(f'"{f.column_name}"' for f in fields)
        convert = _converter(fields)
        pk = fields[0].column_name   # the primary key comes first
        for row in db.execute_sql(f"SELECT {cols} FROM {peewee_meta.table_name(model)} ORDER BY {pk}"):
            if model is Meta_ and not _meta_copied(row[0]):
                continue
            yield row[0], convert(tuple(row))

    # --- copying ----------------------------------------------------------------------------

    def copy(self, progress: OnProgress | None = None) -> list[Copied]:
        """Copy every table, then set PostgreSQL's sequences past the highest ids."""
        dst = self._dbs[1]
        if not isinstance(dst, SqliteDatabase):
            with dst.atomic():   # this session's scratch tables for _insert
                for model in COPIED:
                    table = peewee_meta.table_name(model)
                    dst.execute_sql(f"CREATE TEMPORARY TABLE IF NOT EXISTS pacsd_copy_{table} "
                                    f"(LIKE {table}) ON COMMIT DELETE ROWS")
        out = [self._copy_table(model, progress) for model in COPIED]
        self._set_sequences()
        with dst.atomic():   # the target's totals row: counted from the rows it now holds
            counters.recount(dst)
        return out

    def _copy_table(self, model: type[Model], progress: OnProgress | None) -> Copied:
        src, dst = self._dbs
        table = peewee_meta.table_name(model)
        fields = peewee_meta.sorted_fields(model)
        cols = [f.column_name for f in fields]
        convert = _converter(fields)
        t0 = time.monotonic()
        if model not in DICOM_MODELS:   # a few rows: one transaction
            rows = [row for _, row in self._small_rows(src, model)]
            before = sum(1 for _ in self._small_rows(dst, model))
            with dst.atomic():
                self._insert(table, cols, rows)
            total = len(rows)
            if progress:
                progress(table, total, total, 0.0)
            return Copied(table, total, before, total - before, time.monotonic() - t0)
        total = src.execute_sql(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        before, last = dst.execute_sql(
            f"SELECT COUNT(*), COALESCE(MAX(id), 0) FROM {table}").fetchone()
        if before:
            log.info("%s: %d row(s) of %d already in the target; continuing after id %d",
                     table, before, total, last)
        names = ", ".join(f'"{c}"' for c in cols)
        select = (f"SELECT {names} FROM {table} WHERE id > {src.param} ORDER BY id "
                  f"LIMIT {int(self.batch)}")
        done, copied = before, 0
        if progress:
            progress(table, done, total, 0.0)
        while True:   # ends: each batch moves `last` past the ids it copied
            rows = [convert(tuple(r)) for r in src.execute_sql(select, (last,)).fetchall()]
            if not rows:
                break
            try:
                with dst.atomic():
                    self._insert(table, cols, rows)
            except Exception as e:   # say which rows, then stop
                raise IndexUnavailable(
                    f"copying {table} rows {rows[0][0]}-{rows[-1][0]} into "
                    f"{self.target_label} failed: {str(e).strip()}") from e
            last = rows[-1][0]
            done += len(rows)
            copied += len(rows)
            if progress:
                progress(table, done, total, copied / max(time.monotonic() - t0, 1e-6))
        return Copied(table, total, before, copied, time.monotonic() - t0)

    def _insert(self, table: str, cols: list[str], rows: list[tuple]) -> None:
        """INSERT the rows, each unless a row with its key is there already."""
        if not rows:
            return
        dst = self._dbs[1]
        names = ", ".join(f'"{c}"' for c in cols)
        insert = f"INSERT INTO {table} ({names})"
        one = "(" + ", ".join([dst.param] * len(cols)) + ")"
        cursor = dst.cursor()
        if isinstance(dst, SqliteDatabase) or not hasattr(cursor, "copy"):
            # SQLite: the driver's loop, in C. (psycopg 2 would land here too.)
            cursor.executemany(f"{insert} VALUES {one} ON CONFLICT DO NOTHING", rows)
            return
        # PostgreSQL: COPY into a temporary table (made by `copy`, emptied at each commit),
        # then one INSERT ... SELECT: four times the rows per second of multi-row INSERTs (no
        # statement of thousands of parameters to parse and plan).
        scratch = f"pacsd_copy_{table}"
        with cursor.copy(f"COPY {scratch} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        dst.execute_sql(f"{insert} SELECT {names} FROM {scratch} ORDER BY 1 "
                        "ON CONFLICT DO NOTHING")

    def _set_sequences(self) -> None:
        """The rows came with their ids: PostgreSQL's sequences must start after them, or the
        next C-STORE would collide with a copied row. (SQLite takes MAX(id) + 1 by itself.)"""
        dst = self._dbs[1]
        if isinstance(dst, SqliteDatabase):
            return
        with dst.atomic():
            for model in DICOM_MODELS:
                table = peewee_meta.table_name(model)
                dst.execute_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                f"COALESCE(MAX(id), 0) + 1, false) FROM {table}")

    # --- after copying ----------------------------------------------------------------------

    def verify(self) -> list[Check]:
        """Rows per table and the counters' sums, in the source and in the target."""
        src, dst = self._dbs
        checks = []
        for model in COPIED:
            table = peewee_meta.table_name(model)
            if model in DICOM_MODELS:
                sql = f"SELECT COUNT(*) FROM {table}"
                checks.append(Check(f"{table} rows", src.execute_sql(sql).fetchone()[0],
                                    dst.execute_sql(sql).fetchone()[0]))
            else:
                checks.append(Check(f"{table} rows", sum(1 for _ in self._small_rows(src, model)),
                                    sum(1 for _ in self._small_rows(dst, model))))
        for model, col in _SUMS:
            table = peewee_meta.table_name(model)
            sql = f"SELECT COALESCE(SUM({col}), 0) FROM {table}"
            checks.append(Check(f"sum of {table}.{col}", int(src.execute_sql(sql).fetchone()[0]),
                                int(dst.execute_sql(sql).fetchone()[0])))
        return checks
