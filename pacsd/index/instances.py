"""The instances in the index: adding them (the hot path of every C-STORE and STOW-RS), the
rows above them (patient, study, series) made as needed, duplicates and overwrites, copies kept
aside with other content (conflicts), the routing jobs queued with an instance's row, counts,
and deleting (the counters recomputed from what remains).

Several nodes may share one PostgreSQL index:
- rows are created with INSERT ... ON CONFLICT DO NOTHING and read back, so two nodes storing
  the same SOP Instance (or the first images of one series) at once make one row;
- an instance already indexed under the same path is ours, not a duplicate (a batch the writer
  runs again is idempotent);
- an instance whose study is filed under another patient is refused or stored with a warning
  (`_misfiled`, [storage] patient_mismatch).
Everything that writes runs on the writer thread (pacsd.index.writer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import fn

from pacsd.errors import IndexUnavailable, PatientMismatch
from pacsd.imaging.header import Record
from pacsd.index import backends, counters
from pacsd.index.models import (
    INSTANCE_FIELDS,
    PATIENT_FIELDS,
    SERIES_FIELDS,
    STUDY_FIELDS,
    Conflict,
    Damage,
    Instance,
    Patient,
    Series,
    Study,
    database,
    name_key,
    search_key,
    reading,
    starts_with,
)
from pacsd.index.writer import Filed, Writer
from pacsd.index.labels import insert_labels

log = logging.getLogger(__name__)


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


class Instances(Writer):
    """Adding, finding and deleting instances; part of pacsd.index.Index."""

    # --- writes -----------------------------------------------------------------------------

    def add(self, record: Record, *, path: str, size: int, transfer_syntax: str,
            calling_aet: str = "", overwrite: bool = False,
            routes: Sequence[tuple[str, str]] = (), content_hash: str | None = None,
            refuse_mismatch: bool = False, labels: Sequence[str] = ()) -> Added:
        """Index one stored instance; returns once committed. `routes` ((route, destination)
        pairs) queue it for sending in the same transaction, so that an instance acknowledged
        is also an instance that will be forwarded; `labels` ([[labels]] rules) go on its
        study in that transaction too: a group that sees the label sees the image as soon as
        it is acknowledged. `refuse_mismatch`: raise PatientMismatch
        rather than file it under another patient or study than its own."""
        def work() -> Added:
            added = self._add(record.values, path, size, transfer_syntax, calling_aet,
                              overwrite, content_hash, refuse_mismatch)
            if routes and not added.duplicate:
                self.enqueue([(r, d, record.values["study_instance_uid"],
                               record.values["sop_instance_uid"]) for r, d in routes])
            if labels:
                insert_labels(record.values["study_instance_uid"], labels)
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

    def _series_ids(self, v: dict[str, Any]
                    ) -> tuple[tuple[int, int, int, bool, bool, bool], Filed]:
        """(series, study, patient) row ids for a record, creating rows as needed; plus whether
        the series, the study and the patient are new; and where an existing series or study is
        filed, for `_misfiled`. Cached: a known series costs no statement."""
        uid = v["series_instance_uid"]
        hit = self._cache.get(uid)
        if hit is not None:
            return (*hit[0], False, False, False), hit[1]
        p = database.obj.param
        row = database.obj.execute_sql(
            f"SELECT series.id, series.study_id, study.patient_id, study.study_instance_uid, "
            f"patient.patient_id, patient.issuer_of_patient_id FROM series JOIN study ON "
            f"study.id = series.study_id JOIN patient ON patient.id = study.patient_id "
            f"WHERE series.series_instance_uid = {p}", (uid,)).fetchone()
        new_series = new_study = new_patient = False
        study_id: int | None
        patient_id: int | None   # None only until the SELECT after a lost insert race
        if row is not None:
            ids = (row[0], row[1], row[2])
            filed = Filed(row[3], row[4], row[5], row[2])
        else:
            study_row = self._study_of(v["study_instance_uid"])
            if study_row is not None:   # a known study keeps its patient (see _misfiled)
                study_id, patient_id = study_row[0], study_row[1].patient_row
            else:
                patient_id = self._insert("patient", {
                    "patient_id": v["patient_id"],
                    "issuer_of_patient_id": v["issuer_of_patient_id"],
                    **{k: v[k] for k in PATIENT_FIELDS},
                    "patient_name_key": name_key(v["patient_name"]),
                    "patient_name_search": search_key(v["patient_name"], name=True),
                    "number_of_studies": 0,
                    "number_of_series": 0, "number_of_instances": 0},
                    "patient_id, issuer_of_patient_id")
                new_patient = patient_id is not None
                if patient_id is None:
                    patient_id = self._row(f"SELECT id FROM patient WHERE patient_id = {p} AND "
                                           f"issuer_of_patient_id = {p}",
                                           (v["patient_id"], v["issuer_of_patient_id"]))[0]
                study_id = self._insert("study", {
                    "patient_id": patient_id, "study_instance_uid": v["study_instance_uid"],
                    "referring_physician_name_key": name_key(v["referring_physician_name"]),
                    "study_description_search": search_key(v["study_description"]),
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
            filed = Filed(v["study_instance_uid"], v["patient_id"], v["issuer_of_patient_id"],
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
        return (*ids, new_series, new_study, new_patient), filed

    def _study_of(self, study_uid: str) -> tuple[int, Filed] | None:
        p = database.obj.param
        row = database.obj.execute_sql(
            f"SELECT study.id, study.patient_id, patient.patient_id, "
            f"patient.issuer_of_patient_id FROM study JOIN patient ON patient.id = "
            f"study.patient_id WHERE study.study_instance_uid = {p}", (study_uid,)).fetchone()
        return None if row is None else (row[0], Filed(study_uid, row[2], row[3], row[1]))

    def _misfiled(self, v: dict[str, Any], filed: Filed, refuse: bool) -> str:
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
                             f"transfer_syntax_uid, size FROM instance WHERE sop_instance_uid = {p}",
                             (v["sop_instance_uid"],)).fetchone()
        if row is not None:
            return self._known(row, v, path, size, ts, calling_aet, overwrite, content_hash)
        ids, filed = self._series_ids(v)
        series_id, study_id, patient_id, new_series, new_study, new_patient = ids
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
                            f"transfer_syntax_uid, size FROM instance WHERE sop_instance_uid = {p}",
                            (v["sop_instance_uid"],))
            return self._known(row, v, path, size, ts, calling_aet, overwrite, content_hash)
        self._counters.count(series_id, study_id, patient_id, new_series, new_study,
                             v["modality"] or "", new_patient, size)
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
        self._counters.total(0, 0, 0, 0, size - int(row[5] or 0))
        return Added(replaced_path=row[1])

    def repoint(self, sop_instance_uid: str, old_path: str, new_path: str, size: int,
                transfer_syntax: str) -> bool:
        """Point an instance's row at another copy of the same content (its file went
        missing); False when the row no longer points at `old_path`."""
        def work() -> bool:
            row = (Instance.select(Instance.id, Instance.size)
                   .where((Instance.sop_instance_uid == sop_instance_uid)
                          & (Instance.path == old_path)).tuples().first())
            if row is None:
                return False
            Instance.update(path=new_path, size=size, transfer_syntax_uid=transfer_syntax
                            ).where(Instance.id == row[0]).execute()
            self._counters.total(0, 0, 0, 0, size - int(row[1]))
            return True
        return bool(self.submit(work))

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

    def clear(self) -> None:
        def work() -> None:
            self._cache.clear()
            for model in (Instance, Series, Study, Patient, Damage):
                model.delete().execute()   # damage records too: found again if still there
            counters.recount(database.obj)
        self.submit(work)

    # --- reads ------------------------------------------------------------------------------

    def received_between(self, start: float, end: float) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of the instances received from `start` to `end` (epoch
        seconds, to the second as `received` keeps them)."""
        first = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end))
        with reading():
            q = (Instance.select(Instance.sop_instance_uid, Instance.path)
                 .where((Instance.received >= first) & (Instance.received <= last)))
            return [(str(row[0]), str(row[1])) for row in q.tuples()]  # type: ignore[index]

    def indexed_paths(self, prefix: str) -> set[str]:
        with reading():
            rows = Instance.select(Instance.path).where(starts_with(Instance.path, prefix))
            return {str(row[0]) for row in rows.tuples()}  # type: ignore[index]

    def counts(self) -> dict[str, int]:
        """What the index holds (its totals row: five numbers, whatever its size)."""
        with reading():
            return counters.read(database.obj)

    # --- deleting ---------------------------------------------------------------------------

    def delete(self, level: str, uids: Iterable[str],
               paths: Collection[str] | None = None) -> list[str]:
        """Remove the studies, series or instances (level STUDY, SERIES or IMAGE) with these
        UIDs, and what becomes empty above them; fix the counters. Returns the paths of the
        removed instances' files, for the caller to delete once this has committed.
        `paths`: only the instances whose row still points at one of these files."""
        wanted = list(dict.fromkeys(uids))
        return self.submit(lambda: [r[1] for r in self._delete_rows(level, wanted, paths)])

    def _delete_rows(self, level: str, wanted: list[str],
                     paths: Collection[str] | None = None, resolve: bool = True) -> list[tuple]:
        """`delete`'s work, on the writer thread inside a transaction: the removed instances'
        (id, path, series id, SOP Instance UID, size). `resolve`: their conflicts and damage
        records go too (not when they are re-filed at once: a correction)."""
        column = {"STUDY": Study.study_instance_uid, "SERIES": Series.series_instance_uid,
                  "IMAGE": Instance.sop_instance_uid}[level]
        # Rows are no longer only ever added: the series cache could name a deleted row.
        self._cache.clear()
        rows: list[Any] = []   # (id, path, series id, SOP Instance UID, size)
        for start in range(0, len(wanted), 500):   # stay below SQLite's variable limit
            q = (Instance.select(Instance.id, Instance.path, Instance.series,
                                 Instance.sop_instance_uid, Instance.size)
                 .join(Series).join(Study).where(column.in_(wanted[start:start + 500])))
            rows += list(q.tuples())
        if paths is not None:
            rows = [r for r in rows if r[1] in paths]
        series_ids = sorted({r[2] for r in rows})
        for start in range(0, len(rows), 500):
            Instance.delete().where(
                Instance.id.in_([r[0] for r in rows[start:start + 500]])).execute()
            if not resolve:
                continue
            # Deleting an instance resolves its conflicts: the copies kept aside stay on
            # disk (STORAGE/.conflicts) for a person to import if they were the right one.
            Conflict.delete().where(Conflict.sop_instance_uid.in_(
                [r[3] for r in rows[start:start + 500]])).execute()
            Damage.delete().where(Damage.sop_instance_uid.in_(
                [r[3] for r in rows[start:start + 500]])).execute()
        if level != "IMAGE":   # a study or series without instances goes too
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                empty = Series.select(Series.id).join(Study).where(column.in_(chunk)) \
                    if level == "STUDY" else Series.select(Series.id).where(column.in_(chunk))
                series_ids = sorted(set(series_ids) | {s.id for s in empty})
        gone = self._recount(series_ids)
        self._counters.total(-gone[2], -gone[1], -gone[0], -len(rows),
                             -sum(int(r[4] or 0) for r in rows))
        return rows

    def _recount(self, series_ids: list[int]) -> tuple[int, int, int]:
        """Recompute the counters of these series and of their study and patient from the rows
        that remain, and drop the series, studies and patients left empty; how many of each
        were dropped (series, studies, patients)."""
        study_ids: set[int] = set()
        dropped = [0, 0, 0]
        for start in range(0, len(series_ids), 500):
            chunk = series_ids[start:start + 500]
            study_ids |= {s.study_id for s in Series.select(Series.study).where(  # type: ignore
                Series.id.in_(chunk))}
            Series.update(number_of_instances=Instance.select(fn.COUNT(Instance.id)).where(
                Instance.series == Series.id)).where(Series.id.in_(chunk)).execute()
            dropped[0] += Series.delete().where(
                Series.id.in_(chunk) & (Series.number_of_instances == 0)).execute()
        patient_ids: set[int] = set()
        for study in Study.select().where(Study.id.in_(sorted(study_ids))):
            patient_ids.add(study.patient_id)  # type: ignore[attr-defined]
            series: list[Any] = list(
                Series.select(Series.modality, Series.number_of_instances)
                .where(Series.study == study.id).order_by(Series.id).tuples())
            if not series:
                dropped[1] += study.delete_instance()
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
                dropped[2] += patient.delete_instance()
                continue
            Patient.update(number_of_studies=len(studies),
                           number_of_series=sum(s for s, _ in studies),
                           number_of_instances=sum(n for _, n in studies)).where(
                Patient.id == patient.id).execute()
        return dropped[0], dropped[1], dropped[2]
