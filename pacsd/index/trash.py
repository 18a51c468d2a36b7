"""The recycle bin's rows and the history of what was done by hand (pacsd_trash, pacsd_history).

A deletion moves an instance's row out of the index into pacsd_trash, in the same transaction
that removes it (and fixes the counters), with one pacsd_history row per object deleted; a
restore puts the rows back as they were (received time, sender, content hash) and records it;
a purge forgets them. The files are moved by pacsd.storage.trash, which calls these.
Everything that writes runs on the writer thread (pacsd.index.writer).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import fn

from pacsd.errors import IndexUnavailable
from pacsd.imaging.header import Record
from pacsd.index.instances import Instances
from pacsd.index.models import Binned, Change, Instance, Patient, Series, Study, database, reading


@dataclass(frozen=True)
class BinEntry:
    """One deletion, as far as it is still in the bin."""

    deletion: int
    deleted: float
    who: str
    action: str   # delete; or a correction, whose previous versions these are
    level: str
    uid: str
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    instances: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BinnedFile:
    """One binned instance: what restoring it needs."""

    id: int
    deletion: int
    sop_instance_uid: str
    path: str
    size: int
    transfer_syntax_uid: str
    calling_aet: str
    received: str
    content_hash: str | None


@dataclass(frozen=True)
class ChangeRow:
    id: int
    at: float
    who: str
    action: str
    level: str
    uid: str
    study_uid: str
    instances: int
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMN = {"STUDY": Study.study_instance_uid, "SERIES": Series.series_instance_uid,
           "IMAGE": Instance.sop_instance_uid}
_BIN_COLUMN = {"STUDY": Binned.study_instance_uid, "SERIES": Binned.series_instance_uid,
               "IMAGE": Binned.sop_instance_uid}


class Trash(Instances):
    """The bin and the history; part of pacsd.index.Index."""

    def bin(self, level: str, uids: Iterable[str], who: str) -> list[str]:
        """Take the studies, series or instances with these UIDs out of the index and into the
        bin, in one transaction; one history row per object found. The paths of the files to
        move into the bin once this has committed."""
        wanted = list(dict.fromkeys(uids))
        column = _COLUMN[level]

        def work() -> list[str]:
            rows = _instance_rows(column, wanted)
            if not rows:
                return []
            now = time.time()
            by_object: dict[str, list[tuple]] = {}
            for r in rows:
                by_object.setdefault(r[0], []).append(r)
            for uid, items in by_object.items():
                first = items[0]
                detail = {"patient_id": first[4], "patient_name": first[5],
                          "study_date": first[6], "study_description": first[7],
                          "modalities": sorted({r[8] for r in items if r[8]}),
                          "bytes": sum(int(r[10] or 0) for r in items)}
                change = Change.insert(at=now, who=who, action="delete", level=level, uid=uid,
                                       study_uid=first[3], instances=len(items),
                                       detail=json.dumps(detail)).execute()
                _bin_rows(items, change, now)
            self._delete_rows(level, wanted)
            return [r[9] for r in rows]
        return self.submit(work)

    def revise(self, versions: Sequence[tuple[str, str, int, str, Record, str]], *, who: str,
               action: str, level: str, uid: str, study_uid: str,
               detail: dict[str, Any], unbin: Sequence[int] = (),
               keep_previous: bool = True) -> tuple[int, list[str]]:
        """A correction, in one transaction: each instance's row (SOP Instance UID, then the
        path, size, transfer syntax, header record and content hash of its new version, a file
        already durable) re-filed from its new version; the rows of the previous versions kept
        in the bin under one history row. The history row's number, and the previous versions'
        paths, for the caller to move into the bin once this has committed. `unbin`: bin rows
        (by id) whose versions these new ones are (an undo), out of the bin. Without
        `keep_previous` (a lossless re-encoding verified pixel for pixel) the previous versions
        are not kept: the caller removes their files."""
        def work() -> tuple[int, list[str]]:
            sops = [v[0] for v in versions]
            rows = _instance_rows(Instance.sop_instance_uid, sops)
            if len(rows) != len(set(sops)):
                raise IndexUnavailable("instances of the correction were deleted or changed "
                                       "meanwhile; nothing was changed, try again")
            now = time.time()
            change = Change.insert(at=now, who=who, action=action, level=level, uid=uid,
                                   study_uid=study_uid, instances=len(rows),
                                   detail=json.dumps(detail)).execute()
            if keep_previous:
                _bin_rows(rows, change, now)
            old = {r[1]: r for r in rows}
            self._delete_rows("IMAGE", sops, resolve=False)
            p = database.obj.param
            for sop, path, size, ts, record, content_hash in versions:
                r = old[sop]
                self._add(record.values, path, size, ts, r[12] or "", False, content_hash)
                database.obj.execute_sql(
                    f"UPDATE instance SET received = {p} WHERE sop_instance_uid = {p}",
                    (_text_time(r[13]) or time.strftime("%Y-%m-%d %H:%M:%S"), sop))
            for start in range(0, len(unbin), 500):
                Binned.delete().where(Binned.id.in_(list(unbin[start:start + 500]))).execute()
            self._counters.active.clear()   # not news: no stable-study hooks or routes
            return change, [r[9] for r in rows]
        return self.submit(work)

    def last_change(self, uid: str) -> ChangeRow | None:
        """The latest deletion or correction of an object (by its UID) not undone since."""
        with reading():
            q = (Change.select().where((Change.uid == uid) & (Change.action != "purge"))
                 .order_by(Change.id.desc()).limit(1))
            rows = list(q)
        if not rows or rows[0].action in ("restore", "undo"):
            return None
        c = rows[0]
        return ChangeRow(c.id, c.at, c.who, c.action, c.level, c.uid, c.study_uid, c.instances,
                         _json(c.detail))

    def _known(self, row: Any, v: dict[str, Any], path: str, size: int, ts: str,
               calling_aet: str, overwrite: bool, content_hash: str | None = None) -> Any:
        """An overwrite ([storage] overwrite) keeps the replaced copy's row in the bin, as a
        previous version, in the transaction that replaces it (Archive.put moves the file)."""
        if overwrite and row[1] != path:
            rows = _instance_rows(Instance.sop_instance_uid, [v["sop_instance_uid"]])
            if rows:
                now = time.time()
                change = Change.insert(
                    at=now, who=f"{calling_aet or 'import'} (sent again, [storage] overwrite)",
                    action="overwrite", level="IMAGE", uid=v["sop_instance_uid"],
                    study_uid=rows[0][3], instances=1,
                    detail=json.dumps({"replaced": rows[0][9]})).execute()
                _bin_rows(rows, change, now)
        return super()._known(row, v, path, size, ts, calling_aet, overwrite, content_hash)

    def unbin(self, items: Sequence[tuple[BinnedFile, Record]], who: str) -> list[str]:
        """Put binned instances back into the index, as they were, and out of the bin (their
        files already moved back); one history row per deletion they came from. An instance
        whose SOP Instance UID has been stored again meanwhile stays in the bin. The SOP
        Instance UIDs restored."""
        def work() -> list[str]:
            done: list[str] = []
            by_deletion: dict[int, list[str]] = {}
            p = database.obj.param
            for item, record in items:
                added = self._add(record.values, item.path, item.size, item.transfer_syntax_uid,
                                  item.calling_aet, False, item.content_hash)
                if added.duplicate:
                    continue
                if item.received:
                    database.obj.execute_sql(
                        f"UPDATE instance SET received = {p} WHERE sop_instance_uid = {p}",
                        (item.received, item.sop_instance_uid))
                Binned.delete().where(Binned.id == item.id).execute()
                done.append(item.sop_instance_uid)
                by_deletion.setdefault(item.deletion, []).append(item.sop_instance_uid)
            # Old images put back are not news: no stable-study hooks or routes for them.
            self._counters.active.clear()
            now = time.time()
            for deletion, sops in by_deletion.items():
                of = Change.get_or_none(Change.id == deletion)
                Change.insert(at=now, who=who, action="restore",
                              level=of.level if of else "IMAGE",
                              uid=of.uid if of else sops[0],
                              study_uid=of.study_uid if of else "", instances=len(sops),
                              detail=json.dumps({"deletion": deletion})).execute()
            return done
        return self.submit(work)

    def forget_binned(self, deletions: Sequence[int], who: str, why: str) -> list[str]:
        """Empty these deletions from the bin (their rows, one history row each); the paths
        (relative to the bin) of their files, to remove once this has committed."""
        def work() -> list[str]:
            paths: list[str] = []
            now = time.time()
            for deletion in deletions:
                rows = _tuples(Binned.select(Binned.path, Binned.size).where(
                    Binned.deletion == deletion))
                if not rows:
                    continue
                of = Change.get_or_none(Change.id == deletion)
                Binned.delete().where(Binned.deletion == deletion).execute()
                Change.insert(at=now, who=who, action="purge", level=of.level if of else "",
                              uid=of.uid if of else "", study_uid=of.study_uid if of else "",
                              instances=len(rows), detail=json.dumps(
                                  {"deletion": deletion, "why": why,
                                   "bytes": sum(int(s or 0) for _, s in rows)})).execute()
                paths += [str(r[0]) for r in rows]
            return paths
        return self.submit(work)

    # --- reads ------------------------------------------------------------------------------

    def binned(self, uid: str) -> list[BinnedFile]:
        """The binned instances of a study, series or instance UID (or of a deletion, by its
        number), oldest deletion first."""
        with reading():
            cond = ((Binned.study_instance_uid == uid) | (Binned.series_instance_uid == uid)
                    | (Binned.sop_instance_uid == uid))
            if uid.isdigit() and len(uid) < 12:   # a deletion's number (UIDs have dots)
                cond = cond | (Binned.deletion == int(uid))
            q = (Binned.select(Binned.id, Binned.deletion, Binned.sop_instance_uid, Binned.path,
                               Binned.size, Binned.transfer_syntax_uid, Binned.calling_aet,
                               Binned.received, Binned.content_hash)
                 .where(cond).order_by(Binned.deletion, Binned.id))
            return [BinnedFile(*row) for row in _tuples(q)]

    def bin_entries(self, older_than: float | None = None) -> list[BinEntry]:
        """What the bin holds, one entry per deletion, oldest first; `older_than` (epoch
        seconds): only deletions made before then."""
        with reading():
            q = (Binned.select(Binned.deletion, fn.MIN(Binned.deleted), fn.COUNT(Binned.id),
                               fn.SUM(Binned.size), fn.MIN(Binned.study_instance_uid),
                               fn.MIN(Binned.patient_id), fn.MIN(Binned.patient_name),
                               fn.MIN(Binned.study_date), fn.MIN(Binned.study_description))
                 .group_by(Binned.deletion).order_by(Binned.deletion))
            if older_than is not None:
                q = q.where(Binned.deleted < older_than)
            groups = _tuples(q)
            changes = {c.id: c for c in Change.select().where(
                Change.id.in_([g[0] for g in groups]))} if groups else {}
        out = []
        for g in groups:
            c = changes.get(g[0])
            out.append(BinEntry(g[0], float(g[1]), c.who if c else "",
                                c.action if c else "delete", c.level if c else "",
                                c.uid if c else "", g[4], g[5], g[6], g[7], g[8], int(g[2]),
                                int(g[3] or 0)))
        return out

    def bin_totals(self) -> tuple[int, int]:
        """(instances, bytes) in the bin."""
        with reading():
            n, size = _tuples(Binned.select(fn.COUNT(Binned.id), fn.SUM(Binned.size)))[0]
        return int(n or 0), int(size or 0)

    def binned_since(self, since: float) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of instances binned since `since` (recovery)."""
        with reading():
            return [(str(a), str(b)) for a, b in _tuples(Binned.select(
                Binned.sop_instance_uid, Binned.path).where(Binned.deleted >= since))]

    def live_sops(self, uids: Sequence[str]) -> set[str]:
        """Which of these SOP Instance UIDs the index holds."""
        return _among(Instance.sop_instance_uid, uids)

    def live_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of these paths an index row points at."""
        return _among(Instance.path, paths)

    def binned_among(self, paths: Sequence[str]) -> set[str]:
        """Which of these paths a bin row names (a version or a deletion)."""
        return _among(Binned.path, paths)

    def drop_binned_rows(self, paths: Sequence[str]) -> int:
        """Forget bin rows whose instance is back in the index (a restore that a crash cut
        between moving the files and committing): recovery indexed their files."""
        def work() -> int:
            n = 0
            for start in range(0, len(paths), 500):
                n += Binned.delete().where(Binned.path.in_(list(paths[start:start + 500]))
                                           ).execute()
            return n
        return int(self.submit(work))

    def retention_candidates(self, received_before: str, modalities: tuple[str, ...],
                             calling_aets: tuple[str, ...], limit: int
                             ) -> list[dict[str, Any]]:
        """The studies a retention rule takes ([[retention]]): first received before
        `received_before` ("YYYY-MM-DD HH:MM:SS"), with a series of one of `modalities` and an
        instance from one of `calling_aets` (each when given); oldest first, at most `limit`."""
        q = (Study.select(Study.study_instance_uid, Patient.patient_id, Patient.patient_name,
                          Study.study_date, Study.study_description, Study.modalities_in_study,
                          Study.number_of_instances, Study.created)
             .join(Patient).where(Study.created < received_before))
        if modalities:
            q = q.where(fn.EXISTS(Series.select(Series.id).where(
                (Series.study == Study.id) & Series.modality.in_(list(modalities)))))
        if calling_aets:
            q = q.where(fn.EXISTS(Instance.select(Instance.id).join(Series).where(
                (Series.study == Study.id) & Instance.calling_aet.in_(list(calling_aets)))))
        keys = ("study_instance_uid", "patient_id", "patient_name", "study_date",
                "study_description", "modalities", "instances", "received")
        with reading():
            rows = _tuples(q.order_by(Study.created, Study.id).limit(limit))
        return [dict(zip(keys, (*row[:7], str(row[7])))) for row in rows]

    def compressible(self, received_before: str, modalities: tuple[str, ...], after_id: int,
                     syntaxes: tuple[str, ...], limit: int) -> list[tuple[int, str, str, str]]:
        """(id, SOP Instance UID, path, content hash) of images stored in one of `syntaxes`, of
        a study first received at or before `received_before` (to the second: a rule of age 0
        takes what arrived this very second too), of `modalities` when given, by id from
        `after_id`."""
        q = (Instance.select(Instance.id, Instance.sop_instance_uid, Instance.path,
                             Instance.content_hash)
             .join(Series).join(Study)
             .where((Instance.id > after_id) & Instance.transfer_syntax_uid.in_(list(syntaxes))
                    & Instance.rows.is_null(False) & (Study.created <= received_before)))
        if modalities:
            q = q.where(Series.modality.in_(list(modalities)))
        with reading():
            return [(int(a), str(b), str(c), str(d or "")) for a, b, c, d in
                    _tuples(q.order_by(Instance.id).limit(limit))]

    def history(self, uid: str | None = None, limit: int = 200) -> list[ChangeRow]:
        """What was done by hand, newest first; with `uid`, to that object or within it."""
        with reading():
            q = Change.select().order_by(Change.id.desc()).limit(limit)
            if uid:
                q = q.where((Change.uid == uid) | (Change.study_uid == uid))
            rows = list(q)
        return [ChangeRow(c.id, c.at, c.who, c.action, c.level, c.uid, c.study_uid, c.instances,
                          _json(c.detail)) for c in rows]


_ROW = (Instance.sop_instance_uid, Series.series_instance_uid, Study.study_instance_uid,
        Patient.patient_id, Patient.patient_name, Study.study_date, Study.study_description,
        Series.modality, Instance.path, Instance.size, Instance.transfer_syntax_uid,
        Instance.calling_aet, Instance.received, Instance.content_hash)


def _instance_rows(column: Any, wanted: list[str]) -> list[tuple]:
    """(the value of `column`, then _ROW) of the instances whose `column` is in `wanted`."""
    rows: list[tuple] = []
    for start in range(0, len(wanted), 500):
        q = (Instance.select(column, *_ROW).join(Series).join(Study).join(Patient)
             .where(column.in_(wanted[start:start + 500])))
        rows += _tuples(q)
    return rows


def _bin_rows(rows: list[tuple], change: int, now: float) -> None:
    """Keep these instances' rows (as _instance_rows gives them) in the bin under `change`."""
    for start in range(0, len(rows), 200):
        Binned.insert_many([dict(
            deletion=change, deleted=now, sop_instance_uid=r[1], series_instance_uid=r[2],
            study_instance_uid=r[3], patient_id=r[4], patient_name=r[5], study_date=r[6],
            study_description=r[7], modality=r[8], path=r[9], size=r[10],
            transfer_syntax_uid=r[11], calling_aet=r[12], received=_text_time(r[13]),
            content_hash=r[14]) for r in rows[start:start + 200]]).execute()


def _among(column: Any, values: Sequence[str]) -> set[str]:
    """Which of `values` the column holds (by chunks: SQLite's variable limit)."""
    found: set[str] = set()
    with reading():
        for start in range(0, len(values), 500):
            found |= {str(r[0]) for r in _tuples(column.model.select(column).where(
                column.in_(list(values[start:start + 500]))))}
    return found


def _tuples(query: Any) -> list[tuple]:
    """A query's rows as tuples (peewee's stubs do not say so)."""
    return list(query.tuples())


def _text_time(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    return str(value)


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
