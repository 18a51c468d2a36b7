"""The counters of the index (PS3.4 C.3.4 Number of Patient/Study/Series Related ...), the
index's totals (pacsd_totals: what `/status` shows, read without counting rows) and the
studies' activity (when each last received an instance: pacsd.nodes.routing turns quiet ones
stable).

An item written through the writer (pacsd.index.writer) counts what it added in a `Counters` of
its own; the writer merges it into its batch's once the item's savepoint holds, and `apply`s
the batch's at its end, in id order, so that two nodes' batches touching the same studies lock
them in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pacsd.index import backends
from pacsd.index.models import database


@dataclass
class Counters:
    """Additions to the counters (PS3.4 C.3.4 Number of ... Related ...): one item's, merged
    into its batch's once the item's savepoint holds; the batch's are applied at its end in id
    order."""

    series: dict[int, int] = field(default_factory=dict)
    # study id -> [instances, series, modalities of its new series]
    studies: dict[int, list[Any]] = field(default_factory=dict)
    # patient id -> [instances, series, studies]
    patients: dict[int, list[int]] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)   # study UIDs that received an instance
    # added to the index's totals (negative: removed): patients, studies, series, instances, bytes
    totals: list[int] = field(default_factory=lambda: [0] * 5)

    def merge(self, other: Counters) -> None:
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
        self.totals = [a + b for a, b in zip(self.totals, other.totals)]

    def count(self, series_id: int, study_id: int, patient_id: int, new_series: bool,
              new_study: bool, modality: str, new_patient: bool = False, size: int = 0) -> None:
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
        self.total(int(new_patient), int(new_study), int(new_series), 1, size)

    def total(self, patients: int, studies: int, series: int, instances: int, size: int) -> None:
        for i, n in enumerate((patients, studies, series, instances, size)):
            self.totals[i] += n


def apply(c: Counters, lock_rows: bool) -> None:
    """Add the batch's counts, locking rows in id order: series, studies, patients.
    `lock_rows`: read a study's modalities FOR UPDATE (PostgreSQL, several nodes)."""
    db = database.obj
    p = db.param
    for sid in sorted(c.series):
        db.execute_sql("UPDATE series SET number_of_instances = number_of_instances + "
                       f"{p} WHERE id = {p}", (c.series[sid], sid))
    lock = " FOR UPDATE" if lock_rows else ""
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
    if any(c.totals):   # last: every writer locks its rows in the same order
        db.execute_sql(f"UPDATE pacsd_totals SET patients = patients + {p}, studies = studies "
                       f"+ {p}, series = series + {p}, instances = instances + {p}, bytes = "
                       f"bytes + {p} WHERE id = 1", tuple(c.totals))
    now = backends.now_epoch_sql(db)
    for uid in sorted(c.active):   # when the study last grew (pacsd.nodes.routing: stable)
        db.execute_sql(f"INSERT INTO pacsd_study_activity (study_uid, last_received) VALUES "
                       f"({p}, {now}) ON CONFLICT (study_uid) DO UPDATE SET "
                       "last_received = excluded.last_received", (uid,))


# The totals counted from the rows: made by the migration to schema 8 and by `recount`.
COUNT = ("SELECT (SELECT COUNT(*) FROM patient), (SELECT COUNT(*) FROM study), "
          "(SELECT COUNT(*) FROM series), (SELECT COUNT(*) FROM instance), "
          "(SELECT COALESCE(SUM(size), 0) FROM instance)")


def recount(db: Any) -> tuple[int, ...]:
    """Set the totals row from a count of every row (a full scan: once, when the row is made,
    and when `pacsd doctor --fix`-like tools ask); the totals."""
    totals = tuple(int(x) for x in db.execute_sql(COUNT).fetchone())
    p = db.param
    db.execute_sql(f"INSERT INTO pacsd_totals (id, patients, studies, series, instances, bytes) "
                   f"VALUES (1, {p}, {p}, {p}, {p}, {p}) ON CONFLICT (id) DO UPDATE SET "
                   "patients = excluded.patients, studies = excluded.studies, series = "
                   "excluded.series, instances = excluded.instances, bytes = excluded.bytes",
                   totals)
    return totals


def read(db: Any) -> dict[str, int]:
    """The totals, as `/status` shows them."""
    row = db.execute_sql("SELECT patients, studies, series, instances, bytes FROM pacsd_totals "
                         "WHERE id = 1").fetchone()
    names = ("patients", "studies", "series", "instances", "bytes")
    return dict(zip(names, (int(x) for x in row))) if row else dict.fromkeys(names, 0)
