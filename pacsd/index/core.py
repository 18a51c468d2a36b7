"""The index: the one serialized writer over the tables of pacsd.index.models, and the reads that
are not queries (counts, paths, health).

`Index.open` binds the models to the database `[index] url` names (pacsd.index.backends: SQLite by
default, PostgreSQL for several nodes) and brings its schema up to date (pacsd.index.migrations).

Writes go through a single writer thread that commits whatever is queued in one transaction
(group commit): many associations share one fsync of the database, and SQLite never sees two
writers from this process. `Index.add` returns only once the row is committed.

Several nodes may share one PostgreSQL index, so nothing here relies on being alone:
- rows are created with INSERT ... ON CONFLICT DO NOTHING and read back, so two nodes storing
  the same SOP Instance (or the first images of one series) at once make one row;
- counters are added up per batch and applied at its end in id order, so that two nodes'
  batches touching the same studies lock them in the same order;
- a batch that meets a deadlock or a lost connection is run again: every item is idempotent
  (an instance already indexed under the same path is ours, not a duplicate);
- the series cache only saves look-ups and is dropped on any error;
- leases in the database decide which node runs a must-run-once job.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from peewee import IntegrityError, fn

from pacsd.index import backends
from pacsd.index import migrations
from pacsd.errors import IndexFull, IndexUnavailable, PatientMismatch
from pacsd.imaging.header import Record
from pacsd.index.models import (
    INSTANCE_FIELDS,
    PATIENT_FIELDS,
    SERIES_FIELDS,
    STUDY_FIELDS,
    Conflict,
    Instance,
    Meta_,
    Patient,
    Series,
    Study,
    database,
    name_key,
    reading,
    starts_with,
)

log = logging.getLogger(__name__)

ATTEMPTS = 5   # tries of one batch that met a deadlock or a lost connection


@dataclass
class Added:
    """What `Index.add` did: `duplicate` is True when the instance was already indexed under
    another file (the new file should be dropped); `replaced_path` names an old file to delete
    after an overwrite."""

    duplicate: bool = False
    replaced_path: str | None = None
    # A duplicate: the stored copy's path, content hash (None before schema 4) and SOP Class.
    stored_path: str = ""
    stored_hash: str | None = None
    stored_class: str = ""
    stored_syntax: str = ""
    # Stored, though filed under another patient or study than its own (patient_mismatch =
    # "accept"): why, in words without patient data.
    misfiled: str = ""


@dataclass(frozen=True)
class _Filed:
    """Where an existing series or study is filed: its study, and that study's patient."""

    study_uid: str
    patient_id: str
    issuer: str
    patient_row: int


@dataclass
class _Counters:
    """Additions to the counters (PS3.4 C.3.4 Number of ... Related ...): one item's, merged
    into its batch's once the item's savepoint holds; the batch's are applied at its end in id
    order."""

    series: dict[int, int] = field(default_factory=dict)
    # study id -> [instances, series, modalities of its new series]
    studies: dict[int, list[Any]] = field(default_factory=dict)
    # patient id -> [instances, series, studies]
    patients: dict[int, list[int]] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)   # study UIDs that received an instance

    def merge(self, other: _Counters) -> None:
        """Add one item's counts to the batch's (the item's savepoint has been released)."""
        for sid, n in other.series.items():
            self.series[sid] = self.series.get(sid, 0) + n
        for sid, (n_inst, n_series, mods) in other.studies.items():
            st = self.studies.setdefault(sid, [0, 0, []])
            st[0] += n_inst
            st[1] += n_series
            st[2] += [m for m in mods if m not in st[2]]
        for pid, counts in other.patients.items():
            pt = self.patients.setdefault(pid, [0, 0, 0])
            for i, n in enumerate(counts):
                pt[i] += n
        self.active |= other.active

    def count(self, series_id: int, study_id: int, patient_id: int, new_series: bool,
              new_study: bool, modality: str) -> None:
        self.series[series_id] = self.series.get(series_id, 0) + 1
        st = self.studies.setdefault(study_id, [0, 0, []])
        st[0] += 1
        st[1] += int(new_series)
        if new_series and modality and modality not in st[2]:
            st[2].append(modality)
        pt = self.patients.setdefault(patient_id, [0, 0, 0])
        pt[0] += 1
        pt[1] += int(new_series)
        pt[2] += int(new_study)


class Index:
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
        self._cache: dict[str, tuple[tuple[int, int, int], _Filed]] = {}
        self._counters = _Counters()
        self.commits = 0   # transactions committed by the writer (group commit shows here)
        self.full = False  # the index's volume is full: commits fail until space is freed
        self.retries = 0   # batches run again after a deadlock or a lost connection

    # --- life cycle -------------------------------------------------------------------------

    def open(self, writer: bool = True) -> Index:
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
                self._counters = _Counters()
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
            if not database.is_closed():
                database.close()

    def _commit(self, batch: list[tuple[Callable[[], Any], Future]]) -> None:
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
        if self.full:
            self.full = False
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
        batch_counts = _Counters()
        with database.atomic():
            for work, fut in batch:
                for attempt in (1, 2):
                    self._counters = _Counters()   # this item's: counted only if it stays
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
            log.error("the index volume is full (%s: %s): nothing can be stored (C-STORE "
                      "0xA700, STOW-RS 507) until space is freed there; a restart would not "
                      "help. Queries and retrieves go on", where,
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

    def _apply_counters(self, c: _Counters) -> None:
        """Add the batch's counts, locking rows in id order: series, studies, patients."""
        db = database.obj
        p = db.param
        for sid in sorted(c.series):
            db.execute_sql("UPDATE series SET number_of_instances = number_of_instances + "
                           f"{p} WHERE id = {p}", (c.series[sid], sid))
        lock = " FOR UPDATE" if self.backend == backends.POSTGRESQL else ""
        for sid in sorted(c.studies):
            n_inst, n_series, mods = c.studies[sid]
            if mods:
                row = db.execute_sql(f"SELECT modalities_in_study FROM study WHERE id = {p}"
                                     f"{lock}", (sid,)).fetchone()
                known = [m for m in (row[0] if row else "").split("\\") if m]
                merged = "\\".join(known + [m for m in mods if m not in known])
                db.execute_sql("UPDATE study SET number_of_instances = number_of_instances + "
                               f"{p}, number_of_series = number_of_series + {p}, "
                               f"modalities_in_study = {p} WHERE id = {p}",
                               (n_inst, n_series, merged, sid))
            else:
                db.execute_sql("UPDATE study SET number_of_instances = number_of_instances + "
                               f"{p}, number_of_series = number_of_series + {p} WHERE id = {p}",
                               (n_inst, n_series, sid))
        for pid in sorted(c.patients):
            n_inst, n_series, n_studies = c.patients[pid]
            db.execute_sql("UPDATE patient SET number_of_instances = number_of_instances + "
                           f"{p}, number_of_series = number_of_series + {p}, "
                           f"number_of_studies = number_of_studies + {p} WHERE id = {p}",
                           (n_inst, n_series, n_studies, pid))
        now = backends.now_epoch_sql(db)
        for uid in sorted(c.active):   # when the study last grew (pacsd.nodes.routing: stable)
            db.execute_sql(f"INSERT INTO pacsd_study_activity (study_uid, last_received) VALUES "
                           f"({p}, {now}) ON CONFLICT (study_uid) DO UPDATE SET "
                           "last_received = excluded.last_received", (uid,))

    # --- writes -----------------------------------------------------------------------------

    def add(self, record: Record, *, path: str, size: int, transfer_syntax: str,
            calling_aet: str = "", overwrite: bool = False,
            routes: Sequence[tuple[str, str]] = (), content_hash: str | None = None,
            refuse_mismatch: bool = False) -> Added:
        """Index one stored instance; returns once committed. `routes` ((route, destination)
        pairs) queue it for sending in the same transaction, so that an instance acknowledged
        is also an instance that will be forwarded. `refuse_mismatch`: raise PatientMismatch
        rather than file it under another patient or study than its own."""
        def work() -> Added:
            added = self._add(record.values, path, size, transfer_syntax, calling_aet,
                              overwrite, content_hash, refuse_mismatch)
            if routes and not added.duplicate:
                self.enqueue([(r, d, record.values["study_instance_uid"],
                               record.values["sop_instance_uid"]) for r, d in routes])
            return added
        return self.submit(work)

    def enqueue(self, jobs: Iterable[tuple[str, str, str, str]]) -> None:
        """Queue routing jobs (route, destination, study UID, SOP instance UID or "" for the
        whole study). Writer thread only: call it inside submitted work."""
        db = database.obj
        p, now = db.param, backends.now_epoch_sql(db)
        for route, dest, study, sop in jobs:
            db.execute_sql(
                "INSERT INTO pacsd_route_job (route, destination, study_uid, sop_uid, state, "
                "attempts, next_try, claimed_by, claimed_until, last_error, created, updated) "
                f"VALUES ({p}, {p}, {p}, {p}, 'queued', 0, {now}, '', 0, '', {now}, {now})",
                (route, dest, study, sop))

    def add_many(self, items: Iterable[tuple[Record, str, int, str]], new: bool = True) -> int:
        """Index several instances in one transaction (reindex, recovery). Duplicates skipped.
        `new`: they count as just received (their studies become stable later, with hooks and
        routes); a rebuilt index (reindex) re-reads old images, which are not news."""
        items = list(items)

        def work() -> int:
            n = 0
            for record, path, size, ts in items:
                added = self._add(record.values, path, size, ts, "", False)
                if not added.duplicate:
                    n += 1
                if added.misfiled:   # a file already in storage: index it, and say so
                    log.warning("stored file %s indexed though %s", path, added.misfiled)
            if not new:
                self._counters.active.clear()   # this item's own counts only
            return n
        return self.submit(work)

    def _insert(self, table: str, values: dict[str, Any], conflict: str) -> int | None:
        """INSERT a row unless one with the same unique key exists (maybe another node's, just
        committed); its id, or None when it existed."""
        db = database.obj
        p = db.param
        row = db.execute_sql(
            f"INSERT INTO {table} ({', '.join(values)}) VALUES "
            f"({', '.join([p] * len(values))}) ON CONFLICT ({conflict}) DO NOTHING RETURNING id",
            tuple(values.values())).fetchone()
        return None if row is None else row[0]

    def _row(self, sql: str, params: tuple) -> tuple:
        """A row that must exist (the INSERT met it); gone only if deleted meanwhile."""
        row = database.obj.execute_sql(sql, params).fetchone()
        if row is None:
            raise IndexUnavailable("a row was deleted while it was being indexed; try again")
        return tuple(row)

    def _series_ids(self, v: dict[str, Any]) -> tuple[tuple[int, int, int, bool, bool], _Filed]:
        """(series, study, patient) row ids for a record, creating rows as needed; plus whether
        the series and the study are new; and where an existing series or study is filed, for
        `_misfiled`. Cached: a known series costs no statement."""
        uid = v["series_instance_uid"]
        hit = self._cache.get(uid)
        if hit is not None:
            return (*hit[0], False, False), hit[1]
        p = database.obj.param
        row = database.obj.execute_sql(
            f"SELECT series.id, series.study_id, study.patient_id, study.study_instance_uid, "
            f"patient.patient_id, patient.issuer_of_patient_id FROM series JOIN study ON "
            f"study.id = series.study_id JOIN patient ON patient.id = study.patient_id "
            f"WHERE series.series_instance_uid = {p}", (uid,)).fetchone()
        new_series = new_study = False
        study_id: int | None
        patient_id: int | None   # None only until the SELECT after a lost insert race
        if row is not None:
            ids = (row[0], row[1], row[2])
            filed = _Filed(row[3], row[4], row[5], row[2])
        else:
            study_row = self._study_of(v["study_instance_uid"])
            if study_row is not None:   # a known study keeps its patient (see _misfiled)
                study_id, patient_id = study_row[0], study_row[1].patient_row
            else:
                patient_id = self._insert("patient", {
                    "patient_id": v["patient_id"],
                    "issuer_of_patient_id": v["issuer_of_patient_id"],
                    **{k: v[k] for k in PATIENT_FIELDS},
                    "patient_name_key": name_key(v["patient_name"]), "number_of_studies": 0,
                    "number_of_series": 0, "number_of_instances": 0},
                    "patient_id, issuer_of_patient_id")
                if patient_id is None:
                    patient_id = self._row(f"SELECT id FROM patient WHERE patient_id = {p} AND "
                                           f"issuer_of_patient_id = {p}",
                                           (v["patient_id"], v["issuer_of_patient_id"]))[0]
                study_id = self._insert("study", {
                    "patient_id": patient_id, "study_instance_uid": v["study_instance_uid"],
                    "referring_physician_name_key": name_key(v["referring_physician_name"]),
                    **{k: v[k] for k in STUDY_FIELDS}, "modalities_in_study": "",
                    "number_of_series": 0, "number_of_instances": 0,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}, "study_instance_uid")
                new_study = study_id is not None
                if study_id is None:   # another node's, committed since our SELECT
                    study_row = self._study_of(v["study_instance_uid"])
                    if study_row is None:
                        raise IndexUnavailable("a row was deleted while it was being indexed; "
                                               "try again")
                    study_id, patient_id = study_row[0], study_row[1].patient_row
            filed = _Filed(v["study_instance_uid"], v["patient_id"], v["issuer_of_patient_id"],
                           patient_id) if study_row is None else study_row[1]
            series_id = self._insert("series", {
                "study_id": study_id, "series_instance_uid": uid,
                **{k: v[k] for k in SERIES_FIELDS}, "number_of_instances": 0},
                "series_instance_uid")
            new_series = series_id is not None
            if series_id is None:
                series_id = self._row(f"SELECT id FROM series WHERE series_instance_uid = {p}",
                                      (uid,))[0]
            ids = (series_id, study_id, patient_id)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[uid] = (ids, filed)
        return (*ids, new_series, new_study), filed

    def _study_of(self, study_uid: str) -> tuple[int, _Filed] | None:
        p = database.obj.param
        row = database.obj.execute_sql(
            f"SELECT study.id, study.patient_id, patient.patient_id, "
            f"patient.issuer_of_patient_id FROM study JOIN patient ON patient.id = "
            f"study.patient_id WHERE study.study_instance_uid = {p}", (study_uid,)).fetchone()
        return None if row is None else (row[0], _Filed(study_uid, row[2], row[3], row[1]))

    def _misfiled(self, v: dict[str, Any], filed: _Filed, refuse: bool) -> str:
        """Why the instance `v` would be filed under another patient or study than its own
        (words without patient data, for a WARNING), or "". Raises PatientMismatch when such
        instances are refused ([storage] patient_mismatch = "refuse")."""
        if filed.study_uid != v["study_instance_uid"]:
            why = (f"its series {v['series_instance_uid']} is filed under study "
                   f"{filed.study_uid}, not under its own study {v['study_instance_uid']}")
        elif filed.patient_id != v["patient_id"] or (
                filed.issuer and v["issuer_of_patient_id"]
                and filed.issuer != v["issuer_of_patient_id"]):
            p = database.obj.param
            own = database.obj.execute_sql(
                f"SELECT id FROM patient WHERE patient_id = {p} AND issuer_of_patient_id = {p}",
                (v["patient_id"], v["issuer_of_patient_id"])).fetchone()
            why = (f"its study {v['study_instance_uid']} is filed under patient #"
                   f"{filed.patient_row} (index row), while its own Patient ID is "
                   + (f"patient #{own[0]}'s" if own else "another, not yet in the index"))
            log.debug("instance %s: Patient ID %r (issuer %r) in the image, %r (issuer %r) of "
                      "record for study %s", v["sop_instance_uid"], v["patient_id"],
                      v["issuer_of_patient_id"], filed.patient_id, filed.issuer,
                      v["study_instance_uid"])
        else:
            return ""
        if refuse:
            raise PatientMismatch(f"instance {v['sop_instance_uid']} refused: {why}")
        return why

    def _add(self, v: dict[str, Any], path: str, size: int, ts: str, calling_aet: str,
             overwrite: bool, content_hash: str | None = None,
             refuse_mismatch: bool = False) -> Added:
        # The hot path of every C-STORE: plain parameterized SQL (peewee builds each query
        # anew, which costs more than SQLite executing it).
        db = database.obj
        p = db.param
        row = db.execute_sql(f"SELECT id, path, content_hash, sop_class_uid, "
                             f"transfer_syntax_uid FROM instance WHERE sop_instance_uid = {p}",
                             (v["sop_instance_uid"],)).fetchone()
        if row is not None:
            return self._known(row, v, path, size, ts, calling_aet, overwrite, content_hash)
        ids, filed = self._series_ids(v)
        series_id, study_id, patient_id, new_series, new_study = ids
        # Is the instance filed under its own patient and study? (Raises when refused; the
        # savepoint then drops any row made above.) Compares cached strings: no statement.
        misfiled = self._misfiled(v, filed, refuse_mismatch)
        cols = {"series_id": series_id, "sop_instance_uid": v["sop_instance_uid"],
                "transfer_syntax_uid": ts, "path": path, "size": size,
                "calling_aet": calling_aet, "received": time.strftime("%Y-%m-%d %H:%M:%S"),
                "content_hash": content_hash, **{k: v[k] for k in INSTANCE_FIELDS}}
        if self._insert("instance", cols, "sop_instance_uid") is None:
            # Another node indexed it since our SELECT, and has committed.
            row = self._row(f"SELECT id, path, content_hash, sop_class_uid, "
                            f"transfer_syntax_uid FROM instance WHERE sop_instance_uid = {p}",
                            (v["sop_instance_uid"],))
            return self._known(row, v, path, size, ts, calling_aet, overwrite, content_hash)
        self._counters.count(series_id, study_id, patient_id, new_series, new_study,
                             v["modality"] or "")
        self._counters.active.add(v["study_instance_uid"])
        return Added(misfiled=misfiled)

    def _known(self, row: Any, v: dict[str, Any], path: str, size: int, ts: str,
               calling_aet: str, overwrite: bool, content_hash: str | None = None) -> Added:
        """The instance has a row already."""
        if row[1] == path:
            # Our own file: a batch run again after its commit went through, or another node's
            # recovery indexed the file we had just written. Stored, and not twice.
            return Added()
        if not overwrite:
            return Added(duplicate=True, stored_path=row[1], stored_hash=row[2],
                         stored_class=row[3], stored_syntax=row[4])
        Instance.update(path=path, size=size, transfer_syntax_uid=ts, calling_aet=calling_aet,
                        content_hash=content_hash, **{k: v[k] for k in INSTANCE_FIELDS}).where(
            Instance.id == row[0]).execute()
        return Added(replaced_path=row[1])

    def set_hash(self, sop_instance_uid: str, path: str, content_hash: str) -> None:
        """Record the content hash of an instance stored before hashes were kept (schema 4)."""
        def work() -> None:
            Instance.update(content_hash=content_hash).where(
                (Instance.sop_instance_uid == sop_instance_uid) & (Instance.path == path)
                & Instance.content_hash.is_null()).execute()
        self.submit(work)

    def add_conflict(self, sop_instance_uid: str, content_hash: str, path: str,
                     transfer_syntax: str, calling_aet: str) -> bool:
        """Record a copy kept aside; False (nothing recorded) when a copy with the same
        content is already kept for this instance."""
        def work() -> bool:
            known = Conflict.select(Conflict.id).where(
                (Conflict.sop_instance_uid == sop_instance_uid)
                & (Conflict.content_hash == content_hash)).exists()
            if known:
                return False
            Conflict.insert(sop_instance_uid=sop_instance_uid, content_hash=content_hash,
                            path=path, transfer_syntax_uid=transfer_syntax,
                            calling_aet=calling_aet).execute()
            return True
        return bool(self.submit(work))

    def conflicted(self, uids: Sequence[str]) -> set[str]:
        """Which of these SOP Instance UIDs have a copy with other content kept aside."""
        found: set[str] = set()
        with reading():
            for start in range(0, len(uids), 500):
                q = Conflict.select(Conflict.sop_instance_uid).where(
                    Conflict.sop_instance_uid.in_(list(uids[start:start + 500]))).distinct()
                found |= {str(c.sop_instance_uid) for c in q}
        return found

    # --- leases: jobs that one node of several runs -----------------------------------------

    def lease(self, name: str, seconds: float) -> bool:
        """Take, or renew, the lease `name` for this node for `seconds`; whether we hold it.
        A lease whose holder stopped renewing (killed, hung) passes to the next taker once it
        has expired, by the database's clock."""
        def work() -> bool:
            db = database.obj
            p, now = db.param, backends.now_epoch_sql(db)
            db.execute_sql(
                f"INSERT INTO pacsd_lease (name, holder, expires) VALUES ({p}, {p}, {now} + {p}) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "expires = excluded.expires WHERE pacsd_lease.holder = excluded.holder "
                f"OR pacsd_lease.expires < {now}", (name, self.node, float(seconds)))
            row = db.execute_sql(f"SELECT holder FROM pacsd_lease WHERE name = {p}",
                                 (name,)).fetchone()
            return row is not None and row[0] == self.node
        return bool(self.submit(work))

    def release(self, name: str) -> None:
        def work() -> None:
            p = database.obj.param
            database.obj.execute_sql(f"DELETE FROM pacsd_lease WHERE name = {p} AND "
                                     f"holder = {p}", (name, self.node))
        self.submit(work)

    def leases(self) -> list[tuple[str, str, float]]:
        """The leases held now: (name, holder, seconds until they expire)."""
        with reading():
            db = database.obj
            return [(n, h, float(left)) for n, h, left in db.execute_sql(
                f"SELECT name, holder, expires - {backends.now_epoch_sql(db)} FROM pacsd_lease "
                f"WHERE expires >= {backends.now_epoch_sql(db)} ORDER BY name").fetchall()]

    def shared_value(self, key: str, first: str) -> str:
        """pacsd_meta[key], set to `first` unless a node set it before: one value (a secret,
        say) for every node of an index."""
        def work() -> str:
            Meta_.insert(key=key, value=first).on_conflict_ignore().execute()
            return str(Meta_.get(Meta_.key == key).value)
        return self.submit(work)

    def lease_holder(self, name: str) -> str | None:
        """Who holds `name` now (an expired lease counts as nobody's)."""
        with reading():
            db = database.obj
            p = db.param
            row = db.execute_sql(f"SELECT holder FROM pacsd_lease WHERE name = {p} AND "
                                 f"expires >= {backends.now_epoch_sql(db)}", (name,)).fetchone()
        return None if row is None else row[0]

    def clear(self) -> None:
        def work() -> None:
            self._cache.clear()
            for model in (Instance, Series, Study, Patient):
                model.delete().execute()
        self.submit(work)

    # --- reads ------------------------------------------------------------------------------

    def probe(self, timeout: float = 1.0) -> None:
        """A read, and a small write through the writer (this node's last probe time), within
        `timeout`; raises IndexUnavailable or TimeoutError."""
        with reading():
            Meta_.get_or_none(Meta_.key == "schema_version")
        # UTC: nodes in other time zones compare these marks (pacsd.storage.housekeeping).
        key, now = f"alive:{self.node}"[:64], time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self.submit(lambda: Meta_.insert(key=key, value=now).on_conflict(
            conflict_target=[Meta_.key], update={Meta_.value: now}).execute(), timeout=timeout)

    def indexed_paths(self, prefix: str) -> set[str]:
        with reading():
            rows = Instance.select(Instance.path).where(starts_with(Instance.path, prefix))
            return {str(row[0]) for row in rows.tuples()}  # type: ignore[index]

    def counts(self) -> dict[str, int]:
        with reading():
            return {"patients": Patient.select().count(), "studies": Study.select().count(),
                    "series": Series.select().count(),
                    "instances": Instance.select().count(),
                    "bytes": int(Instance.select(fn.COALESCE(fn.SUM(Instance.size), 0)).scalar())}

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
            rows: list[Any] = []   # (id, path, series id, SOP Instance UID)
            for start in range(0, len(wanted), 500):   # stay below SQLite's variable limit
                q = (Instance.select(Instance.id, Instance.path, Instance.series,
                                     Instance.sop_instance_uid)
                     .join(Series).join(Study).where(column.in_(wanted[start:start + 500])))
                rows += list(q.tuples())
            series_ids = sorted({r[2] for r in rows})
            for start in range(0, len(rows), 500):
                Instance.delete().where(
                    Instance.id.in_([r[0] for r in rows[start:start + 500]])).execute()
                # Deleting an instance resolves its conflicts: the copies kept aside stay on
                # disk (STORAGE/.conflicts) for a person to import if they were the right one.
                Conflict.delete().where(Conflict.sop_instance_uid.in_(
                    [r[3] for r in rows[start:start + 500]])).execute()
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
