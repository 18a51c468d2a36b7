"""The index: peewee models Patient / Study / Series / Instance and the one serialized writer.

Everything C-FIND and QIDO-RS match or return lives here, so no query opens a file. The models
sit behind a DatabaseProxy; `Index.open` binds it to SQLite (WAL, synchronous=FULL, a busy
timeout). One process has one open Index.

Writes go through a single writer thread that commits whatever is queued in one transaction
(group commit): many associations share one fsync of the database, and SQLite never sees two
writers from this process. `Index.add` returns only once the row is committed.
"""

from __future__ import annotations

import logging
import re
import queue
import sqlite3
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterable, Iterator

from peewee import (AutoField, CharField, DatabaseProxy, DateTimeField, ForeignKeyField,
                    IntegerField, Model, SqliteDatabase, fn)

from pacsd.errors import IndexUnavailable
from pacsd.header import Record

log = logging.getLogger(__name__)

database = DatabaseProxy()
SCHEMA_VERSION = 1


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Patient(BaseModel):
    id = AutoField()
    patient_id = CharField(max_length=64, index=True)
    issuer_of_patient_id = CharField(max_length=64, default="", index=True)
    patient_name = CharField(max_length=324, default="")
    # Upper-cased copy for case-insensitive person name matching (PS3.4 C.2.2.2.1).
    patient_name_key = CharField(max_length=324, default="", index=True)
    patient_birth_date = CharField(max_length=18, default="", index=True)
    patient_sex = CharField(max_length=16, default="", index=True)
    number_of_studies = IntegerField(default=0)
    number_of_series = IntegerField(default=0)
    number_of_instances = IntegerField(default=0)

    class Meta:
        indexes = ((("patient_id", "issuer_of_patient_id"), True),)


class Study(BaseModel):
    id = AutoField()
    patient = ForeignKeyField(Patient, backref="studies", index=True)
    study_instance_uid = CharField(max_length=64, unique=True)
    study_date = CharField(max_length=18, default="", index=True)
    study_time = CharField(max_length=28, default="", index=True)
    accession_number = CharField(max_length=64, default="", index=True)
    study_id = CharField(max_length=16, default="", index=True)
    study_description = CharField(max_length=64, default="", index=True)
    referring_physician_name = CharField(max_length=324, default="")
    referring_physician_name_key = CharField(max_length=324, default="", index=True)
    institution_name = CharField(max_length=64, default="", index=True)
    patient_age = CharField(max_length=4, default="", index=True)
    specific_character_set = CharField(max_length=200, default="")
    modalities_in_study = CharField(max_length=200, default="")
    number_of_series = IntegerField(default=0)
    number_of_instances = IntegerField(default=0)
    created = DateTimeField(default=lambda: time.strftime("%Y-%m-%d %H:%M:%S"), index=True)


class Series(BaseModel):
    id = AutoField()
    study = ForeignKeyField(Study, backref="series", index=True)
    series_instance_uid = CharField(max_length=64, unique=True)
    modality = CharField(max_length=16, default="", index=True)
    series_number = IntegerField(null=True, index=True)
    series_description = CharField(max_length=64, default="", index=True)
    series_date = CharField(max_length=18, default="", index=True)
    series_time = CharField(max_length=28, default="", index=True)
    body_part_examined = CharField(max_length=16, default="", index=True)
    protocol_name = CharField(max_length=64, default="", index=True)
    station_name = CharField(max_length=16, default="", index=True)
    number_of_instances = IntegerField(default=0)

    class Meta:
        indexes = ((("study", "modality"), False),)


class Instance(BaseModel):
    id = AutoField()
    series = ForeignKeyField(Series, backref="instances", index=True)
    sop_instance_uid = CharField(max_length=64, unique=True)
    sop_class_uid = CharField(max_length=64, index=True)
    instance_number = IntegerField(null=True, index=True)
    content_date = CharField(max_length=18, default="", index=True)
    content_time = CharField(max_length=28, default="", index=True)
    acquisition_number = IntegerField(null=True, index=True)
    number_of_frames = IntegerField(null=True)
    rows = IntegerField(null=True)
    columns = IntegerField(null=True)
    transfer_syntax_uid = CharField(max_length=64)
    path = CharField(max_length=255, unique=True)   # relative to the storage root
    size = IntegerField()
    calling_aet = CharField(max_length=16, default="")
    received = DateTimeField(default=lambda: time.strftime("%Y-%m-%d %H:%M:%S"), index=True)


class Meta_(BaseModel):
    """Key/value facts about the index itself (schema version)."""

    key = CharField(primary_key=True, max_length=64)
    value = CharField(max_length=255)

    class Meta:
        table_name = "pacsd_meta"


MODELS = (Patient, Study, Series, Instance, Meta_)

_PATIENT = ("patient_name", "patient_birth_date", "patient_sex")
_STUDY = ("study_date", "study_time", "accession_number", "study_id", "study_description",
          "referring_physician_name", "institution_name", "patient_age",
          "specific_character_set")
_SERIES = ("modality", "series_number", "series_description", "series_date", "series_time",
           "body_part_examined", "protocol_name", "station_name")
_INSTANCE = ("sop_class_uid", "instance_number", "content_date", "content_time",
             "acquisition_number", "number_of_frames", "rows", "columns")


def name_key(name: str) -> str:
    """Upper case, without the empty trailing components that some modalities send
    ("DOE^JOHN^^^" matches "Doe^John")."""
    return re.sub(r"[\^ ]+(?=(=|$))", "", name.upper())


@dataclass
class Added:
    """What `Index.add` did: `duplicate` is True when the instance was already indexed (and the
    new file should be dropped); `replaced_path` names an old file to delete after overwrite."""

    duplicate: bool = False
    replaced_path: str | None = None


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
    # connection from peewee.
    return SqliteDatabase(str(path), pragmas=pragmas, check_same_thread=False, timeout=30)


@contextmanager
def reading() -> Iterator[None]:
    """Make sure this thread has a connection, and keep it for the thread's next request:
    HTTP workers and association threads serve many requests, and opening SQLite with its
    pragmas costs more than a small query (a fifth of a viewer's frame request). Outside a
    transaction the connection holds no snapshot, so it never holds back a checkpoint; it is
    closed when its thread ends."""
    database.connect(reuse_if_open=True)
    yield


class Index:
    def __init__(self, url: str) -> None:
        if not url.startswith("sqlite:///"):
            raise IndexUnavailable(f"unsupported index URL {url!r}")
        self.url = url
        self.path = Path(url[len("sqlite:///"):])
        self._queue: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        # series UID -> (series, study, patient) ids; touched only by the thread that writes.
        self._cache: dict[str, tuple[int, int, int]] = {}
        self.commits = 0   # transactions committed by the writer (group commit shows here)

    # --- life cycle -------------------------------------------------------------------------

    def open(self, writer: bool = True) -> "Index":
        if database.obj is not None:
            raise IndexUnavailable("an index is already open in this process")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = _sqlite(self.path)
            database.initialize(db)
            with database.connection_context():
                database.create_tables(MODELS, safe=True)
                version = Meta_.get_or_none(Meta_.key == "schema_version")
                if version is None:
                    Meta_.create(key="schema_version", value=str(SCHEMA_VERSION))
                elif int(version.value) > SCHEMA_VERSION:
                    raise IndexUnavailable(
                        f"index {self.path} has schema {version.value}, newer than this pacsd "
                        f"({SCHEMA_VERSION}); upgrade pacsd")
        except IndexUnavailable:
            database.initialize(None)
            raise
        except (sqlite3.Error, OSError, Exception) as e:
            database.initialize(None)
            raise IndexUnavailable(f"cannot open index {self.path}: {e}") from None
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
            database.initialize(None)
        return flushed

    def reading(self) -> AbstractContextManager[None]:
        return reading()

    # --- the writer thread ------------------------------------------------------------------

    def submit(self, work: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run `work` inside the writer's next transaction; return its result once committed."""
        if self._writer is None:
            # No writer thread (one-shot CLI commands): run it in a transaction of our own.
            with database.connection_context():
                with database.atomic():
                    return work()
        if not self._writer.is_alive():
            raise IndexUnavailable("the index writer has stopped; see the log")
        fut: Future = Future()
        self._queue.put((work, fut))
        return fut.result(timeout=timeout)

    def _write_loop(self) -> None:
        try:
            database.connect(reuse_if_open=True)
        except Exception as e:
            log.critical("the index writer cannot connect to %s: %s", self.path, e)
            return
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                stop = False
                while len(batch) < 500:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._commit(batch)
                if stop:
                    return
        finally:
            database.close()

    def _commit(self, batch: list[tuple[Callable[[], Any], Future]]) -> None:
        results: list[tuple[Future, Any, BaseException | None]] = []
        try:
            with database.atomic():
                for work, fut in batch:
                    try:
                        with database.atomic():   # a savepoint: one bad item spoils no other
                            results.append((fut, work(), None))
                    except Exception as e:  # noqa: BLE001 - handed back to the caller
                        self._cache.clear()   # it may name rows the savepoint rolled back
                        results.append((fut, None, e))
        except Exception as e:  # the commit itself failed: nothing in the batch is durable
            self._cache.clear()
            log.error("index commit of %d item(s) failed: %s", len(batch), e)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(IndexUnavailable(f"index commit failed: {e}"))
            return
        self.commits += 1
        for fut, value, error in results:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

    # --- writes -----------------------------------------------------------------------------

    def add(self, record: Record, *, path: str, size: int, transfer_syntax: str,
            calling_aet: str = "", overwrite: bool = False) -> Added:
        """Index one stored instance; returns once committed."""
        return self.submit(lambda: self._add(record.values, path, size, transfer_syntax,
                                             calling_aet, overwrite))

    def add_many(self, items: Iterable[tuple[Record, str, int, str]]) -> int:
        """Index several instances in one transaction (reindex, recovery). Duplicates skipped."""
        def work() -> int:
            n = 0
            for record, path, size, ts in items:
                if not self._add(record.values, path, size, ts, "", False).duplicate:
                    n += 1
            return n
        return self.submit(work)

    def _series_ids(self, v: dict[str, Any]) -> tuple[int, int, int, bool, bool]:
        """(series, study, patient) row ids for a record, creating rows as needed; plus whether
        the series and the study are new. Cached: rows are only ever added while we run."""
        uid = v["series_instance_uid"]
        hit = self._cache.get(uid)
        if hit is not None:
            return (*hit, False, False)
        patient, _ = Patient.get_or_create(
            patient_id=v["patient_id"], issuer_of_patient_id=v["issuer_of_patient_id"],
            defaults={**{k: v[k] for k in _PATIENT},
                      "patient_name_key": name_key(v["patient_name"])})
        study = Study.get_or_none(Study.study_instance_uid == v["study_instance_uid"])
        new_study = study is None
        if new_study:
            study = Study.create(
                patient=patient, study_instance_uid=v["study_instance_uid"],
                referring_physician_name_key=name_key(v["referring_physician_name"]),
                **{k: v[k] for k in _STUDY})
        assert study is not None
        series = Series.get_or_none(Series.series_instance_uid == uid)
        new_series = series is None
        if series is None:
            series = Series.create(study=study, series_instance_uid=uid,
                                   **{k: v[k] for k in _SERIES})
            modalities = [m for m in study.modalities_in_study.split("\\") if m]
            if series.modality and series.modality not in modalities:
                modalities.append(series.modality)
                Study.update(modalities_in_study="\\".join(modalities)).where(
                    Study.id == study.id).execute()
        ids = (series.id, series.study_id, study.patient_id)  # type: ignore[attr-defined]
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[uid] = ids
        return (*ids, new_series, new_study)

    def _add(self, v: dict[str, Any], path: str, size: int, ts: str, calling_aet: str,
             overwrite: bool) -> Added:
        # The hot path of every C-STORE: plain parameterized SQL (peewee builds each query
        # anew, which costs more than SQLite executing it).
        db = database.obj
        p = db.param
        row = db.execute_sql(f"SELECT id, path FROM instance WHERE sop_instance_uid = {p}",
                             (v["sop_instance_uid"],)).fetchone()
        if row is not None:
            if not overwrite:
                return Added(duplicate=True)
            Instance.update(path=path, size=size, transfer_syntax_uid=ts,
                            calling_aet=calling_aet,
                            **{k: v[k] for k in _INSTANCE}).where(
                Instance.id == row[0]).execute()
            return Added(replaced_path=row[1])
        series_id, study_id, patient_id, new_series, new_study = self._series_ids(v)
        cols = ("series_id", "sop_instance_uid", "transfer_syntax_uid", "path", "size",
                "calling_aet", "received") + _INSTANCE
        values = (series_id, v["sop_instance_uid"], ts, path, size, calling_aet,
                  time.strftime("%Y-%m-%d %H:%M:%S")) + tuple(v[k] for k in _INSTANCE)
        db.execute_sql(f"INSERT INTO instance ({', '.join(cols)}) VALUES "
                       f"({', '.join([p] * len(cols))})", values)
        # Counters kept on write, so that C-FIND never counts rows (PS3.4 C.3.4: Number of
        # Patient/Study/Series Related ...). Increments are safe under concurrent writers.
        db.execute_sql("UPDATE series SET number_of_instances = number_of_instances + 1 "
                       f"WHERE id = {p}", (series_id,))
        db.execute_sql("UPDATE study SET number_of_instances = number_of_instances + 1, "
                       f"number_of_series = number_of_series + {p} WHERE id = {p}",
                       (int(new_series), study_id))
        db.execute_sql("UPDATE patient SET number_of_instances = number_of_instances + 1, "
                       f"number_of_series = number_of_series + {p}, "
                       f"number_of_studies = number_of_studies + {p} WHERE id = {p}",
                       (int(new_series), int(new_study), patient_id))
        return Added()

    def clear(self) -> None:
        def work() -> None:
            self._cache.clear()
            for model in (Instance, Series, Study, Patient):
                model.delete().execute()
        self.submit(work)

    # --- reads ------------------------------------------------------------------------------

    def probe(self, timeout: float = 1.0) -> None:
        """A read, and a small write through the writer (the last probe's time), within
        `timeout`; raises IndexUnavailable or TimeoutError."""
        with database.connection_context():
            Meta_.get_or_none(Meta_.key == "schema_version")
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        self.submit(lambda: Meta_.replace(key="alive", value=now).execute(), timeout=timeout)

    def indexed_paths(self, prefix: str) -> set[str]:
        with database.connection_context():
            rows = Instance.select(Instance.path).where(Instance.path.startswith(prefix))
            return {str(row[0]) for row in rows.tuples()}  # type: ignore[index]

    def counts(self) -> dict[str, int]:
        with database.connection_context():
            return {"patients": Patient.select().count(), "studies": Study.select().count(),
                    "series": Series.select().count(),
                    "instances": Instance.select().count(),
                    "bytes": Instance.select(fn.COALESCE(fn.SUM(Instance.size), 0)).scalar()}

    def integrity_check(self) -> str:
        with database.connection_context():
            return database.execute_sql("PRAGMA integrity_check").fetchone()[0]

    # --- deleting ---------------------------------------------------------------------------

    def delete(self, level: str, uids: Iterable[str]) -> list[str]:
        """Remove the studies, series or instances (level STUDY, SERIES or IMAGE) with these
        UIDs, and what becomes empty above them; fix the counters. Returns the paths of the
        removed instances' files, for the caller to delete once this has committed."""
        column = {"STUDY": Study.study_instance_uid, "SERIES": Series.series_instance_uid,
                  "IMAGE": Instance.sop_instance_uid}[level]
        wanted = list(dict.fromkeys(uids))

        def work() -> list[str]:
            # Rows are no longer only ever added: the series cache could name a deleted row.
            self._cache.clear()
            rows: list[Any] = []   # (id, path, series id)
            for start in range(0, len(wanted), 500):   # stay below SQLite's variable limit
                q = (Instance.select(Instance.id, Instance.path, Instance.series)
                     .join(Series).join(Study).where(column.in_(wanted[start:start + 500])))
                rows += list(q.tuples())
            series_ids = sorted({r[2] for r in rows})
            for start in range(0, len(rows), 500):
                Instance.delete().where(
                    Instance.id.in_([r[0] for r in rows[start:start + 500]])).execute()
            if level != "IMAGE":   # a study or series without instances goes too
                empty = Series.select(Series.id).join(Study).where(column.in_(wanted)) \
                    if level == "STUDY" else Series.select(Series.id).where(column.in_(wanted))
                series_ids = sorted(set(series_ids) | {s.id for s in empty})
            self._recount(series_ids)
            return [r[1] for r in rows]
        return self.submit(work)

    def _recount(self, series_ids: list[int]) -> None:
        """Recompute the counters of these series and of their study and patient from the rows
        that remain, and drop the series, studies and patients left empty."""
        study_ids: set[int] = set()
        for start in range(0, len(series_ids), 500):
            chunk = series_ids[start:start + 500]
            study_ids |= {s.study_id for s in Series.select(Series.study).where(  # type: ignore
                Series.id.in_(chunk))}
            Series.update(number_of_instances=Instance.select(fn.COUNT(Instance.id)).where(
                Instance.series == Series.id)).where(Series.id.in_(chunk)).execute()
            Series.delete().where(Series.id.in_(chunk) & (Series.number_of_instances == 0)
                                  ).execute()
        patient_ids: set[int] = set()
        for study in Study.select().where(Study.id.in_(sorted(study_ids))):
            patient_ids.add(study.patient_id)  # type: ignore[attr-defined]
            series: list[Any] = list(
                Series.select(Series.modality, Series.number_of_instances)
                .where(Series.study == study.id).order_by(Series.id).tuples())
            if not series:
                study.delete_instance()
                continue
            modalities = list(dict.fromkeys(m for m, _ in series if m))
            Study.update(number_of_series=len(series),
                         number_of_instances=sum(n for _, n in series),
                         modalities_in_study="\\".join(modalities)).where(
                Study.id == study.id).execute()
        for patient in Patient.select().where(Patient.id.in_(sorted(patient_ids))):
            studies: list[Any] = list(
                Study.select(Study.number_of_series, Study.number_of_instances)
                .where(Study.patient == patient.id).tuples())
            if not studies:
                patient.delete_instance()
                continue
            Patient.update(number_of_studies=len(studies),
                           number_of_series=sum(s for s, _ in studies),
                           number_of_instances=sum(n for _, n in studies)).where(
                Patient.id == patient.id).execute()
