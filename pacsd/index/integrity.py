"""What the integrity checks (pacsd.storage.integrity) read and write in the index: the
instances in id order from a cursor, the cursors themselves (pacsd_meta, shared by the nodes),
and the damaged files (pacsd_damage). Writes run on the writer thread (pacsd.index.writer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peewee import fn

from pacsd.index.models import Damage, Instance, Meta_, Patient, Series, Study, reading
from pacsd.index.writer import Writer


@dataclass(frozen=True)
class Checkable:
    """An instance as a check sees it."""

    id: int
    sop_instance_uid: str
    path: str
    content_hash: str | None
    size: int


@dataclass(frozen=True)
class Damaged:
    sop_instance_uid: str
    path: str
    problem: str
    expected: str
    actual: str
    found: float
    study_instance_uid: str = ""
    patient_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_COLUMNS = (Instance.id, Instance.sop_instance_uid, Instance.path, Instance.content_hash,
            Instance.size)


class Integrity(Writer):
    """Part of pacsd.index.Index."""

    def checkable_after(self, after_id: int, limit: int) -> list[Checkable]:
        """Instances with an id above `after_id`, in id order (the primary key: no index
        more on the hot path)."""
        with reading():
            q = (Instance.select(*_COLUMNS).where(Instance.id > after_id)
                 .order_by(Instance.id).limit(limit))
            return [Checkable(*row) for row in _tuples(q)]

    def checkable_in(self, level: str, uid: str, issuer: str | None = None
                     ) -> list[Checkable]:
        """The instances of a patient (by Patient ID, and Issuer when given), study, series
        or instance."""
        column = {"PATIENT": Patient.patient_id, "STUDY": Study.study_instance_uid,
                  "SERIES": Series.series_instance_uid, "IMAGE": Instance.sop_instance_uid}[level]
        with reading():
            q = (Instance.select(*_COLUMNS).join(Series).join(Study).join(Patient)
                 .where(column == uid).order_by(Instance.id))
            if issuer is not None:
                q = q.where(Patient.issuer_of_patient_id == issuer)
            return [Checkable(*row) for row in _tuples(q)]

    def checkable(self, sops: Sequence[str]) -> list[Checkable]:
        found: list[Checkable] = []
        with reading():
            for start in range(0, len(sops), 500):
                q = Instance.select(*_COLUMNS).where(
                    Instance.sop_instance_uid.in_(list(sops[start:start + 500])))
                found += [Checkable(*row) for row in _tuples(q)]
        return found

    def last_instance_id(self) -> int:
        with reading():
            return int(_tuples(Instance.select(fn.MAX(Instance.id)))[0][0] or 0)

    def cursor(self, name: str) -> float | None:
        with reading():
            row = Meta_.get_or_none(Meta_.key == name)
        return None if row is None else float(row.value)

    def set_cursor(self, name: str, value: float) -> None:
        self.submit(lambda: Meta_.insert(key=name, value=repr(value)).on_conflict(
            conflict_target=[Meta_.key], update={Meta_.value: repr(value)}).execute())

    def record_damage(self, item: Checkable, problem: str, actual: str = "") -> bool:
        """Record a damaged file, if its instance still points at it; whether it is newly
        damaged (not recorded before with the same problem)."""
        def work() -> bool:
            live = Instance.select(Instance.id).where(
                (Instance.sop_instance_uid == item.sop_instance_uid)
                & (Instance.path == item.path)).exists()
            if not live:
                return False
            before = Damage.get_or_none(Damage.sop_instance_uid == item.sop_instance_uid)
            if before is not None and before.problem == problem and before.actual == actual:
                return False
            Damage.insert(sop_instance_uid=item.sop_instance_uid, path=item.path,
                          problem=problem, expected=item.content_hash or "", actual=actual,
                          found=time.time()).on_conflict(
                conflict_target=[Damage.sop_instance_uid],
                update={Damage.path: item.path, Damage.problem: problem,
                        Damage.actual: actual, Damage.found: time.time()}).execute()
            return True
        return bool(self.submit(work))

    def clear_damage(self, sops: Sequence[str]) -> int:
        """Forget the damage of these instances (their files were found sound)."""
        if not sops:
            return 0

        def work() -> int:
            n = 0
            for start in range(0, len(sops), 500):
                n += Damage.delete().where(
                    Damage.sop_instance_uid.in_(list(sops[start:start + 500]))).execute()
            return n
        return int(self.submit(work))

    def damage(self) -> list[Damaged]:
        """Every damaged file on record, with its study and patient."""
        with reading():
            q = (Damage.select(Damage.sop_instance_uid, Damage.path, Damage.problem,
                               Damage.expected, Damage.actual, Damage.found,
                               Study.study_instance_uid, Patient.patient_id)
                 .join(Instance, on=(Instance.sop_instance_uid == Damage.sop_instance_uid))
                 .join(Series).join(Study).join(Patient).order_by(Damage.found))
            return [Damaged(*row) for row in _tuples(q)]

    def damage_count(self) -> int:
        with reading():
            return int(Damage.select().count())


def _tuples(query: Any) -> list[tuple]:
    """A query's rows as tuples (peewee's stubs do not say so)."""
    return list(query.tuples())
