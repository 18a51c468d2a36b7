"""The study list and summaries the pages show, read from the index.

The list matches with `matching.condition` (the C-FIND / QIDO-RS semantics) on the indexed
columns and is sorted and paged in SQL, so a page of 50 out of half a million studies costs
what a page of 50 costs. Each function takes its own connection (`reading()`).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from peewee import Expression, fn

from pacsd.index.models import Instance, Patient, Series, Study, reading
from pacsd.query.matching import Request, StoredInstance, condition, instances

# The list's sort orders, by the name the pages use; the study's id breaks ties.
SORTS: dict[str, tuple[Any, ...]] = {
    "date": (Study.study_date, Study.study_time),
    "patient": (Patient.patient_name_key,),
    "patient_id": (Patient.patient_id,),
    "accession": (Study.accession_number,),
    "description": (Study.study_description,),
    "modalities": (Study.modalities_in_study,),
    "instances": (Study.number_of_instances,),
    "received": (Study.created,),
}
STUDY_FIELDS = (Study.study_instance_uid, Patient.patient_name, Patient.patient_id,
                Patient.patient_birth_date, Patient.patient_sex, Study.study_date,
                Study.study_time, Study.accession_number, Study.study_description,
                Study.modalities_in_study, Study.number_of_series, Study.number_of_instances,
                Study.study_id, Study.referring_physician_name, Study.institution_name,
                Study.created)
STUDY_NAMES = ("study_uid", "patient_name", "patient_id", "birth_date", "sex", "study_date",
               "study_time", "accession", "description", "modalities", "series", "instances",
               "study_id", "referring", "institution", "received")
SERIES_NAMES = ("series_uid", "number", "modality", "description", "body_part", "instances",
                "first_sop")
_LAST = 1 << 30   # where a missing number sorts: after every real one


def conditions(keys: dict[str, str], description: str = "") -> list[Expression]:
    """The list's search: DICOM matching of `keys` (keyword -> value), and `description` as a
    case-insensitive substring of the study description (what people expect of that box).
    Raises QueryError for a value that cannot be matched."""
    conds = [c for k, v in keys.items() if (c := condition(k, v)) is not None]
    if description:
        conds.append(Study.study_description.contains(description))
    return conds


def _study_dict(row: tuple) -> dict[str, Any]:
    d = dict(zip(STUDY_NAMES, row, strict=True))
    d["received"] = str(d["received"] or "")
    return d


def study_page(conds: list[Expression], sort: str, descending: bool, limit: int, offset: int
               ) -> tuple[int, list[dict[str, Any]]]:
    """How many studies match `conds` (from `conditions`), and one page of them as dicts
    (STUDY_NAMES), sorted by `sort` (a key of SORTS)."""
    order = [f.desc() if descending else f.asc() for f in SORTS[sort]]
    order.append(Study.id.desc() if descending else Study.id.asc())
    with reading():
        base = Study.select().join(Patient)
        for c in conds:
            base = base.where(c)
        total = base.count()
        rows: Any = base.select(*STUDY_FIELDS).order_by(*order).limit(limit).offset(offset)
        studies = [_study_dict(r) for r in rows.tuples()]
    return total, studies


def study_summary(uid: str) -> dict[str, Any] | None:
    """One study as the list shows it, with its series (SERIES_NAMES, in series number order,
    each with the SOP Instance UID of its first image); None if there is no such study."""
    with reading():
        row = (Study.select(*STUDY_FIELDS).join(Patient)
               .where(Study.study_instance_uid == uid).tuples().first())
        if row is None:
            return None
        study = _study_dict(row)
        first_sop = (Instance.select(Instance.sop_instance_uid)
                     .where(Instance.series == Series.id)
                     .order_by(fn.COALESCE(Instance.instance_number, _LAST), Instance.id)
                     .limit(1))
        series: Any = (Series.select(Series.series_instance_uid, Series.series_number,
                                     Series.modality, Series.series_description,
                                     Series.body_part_examined, Series.number_of_instances,
                                     first_sop.alias("first_sop"))
                       .join(Study).where(Study.study_instance_uid == uid)
                       .order_by(fn.COALESCE(Series.series_number, _LAST), Series.id).tuples())
        study["series"] = [dict(zip(SERIES_NAMES, r, strict=True)) for r in series]
    return study


def instance_path(sop_instance_uid: str) -> str | None:
    """Where the instance's file is in the store (relative), or None if it is not stored."""
    with reading():
        return (Instance.select(Instance.path)
                .where(Instance.sop_instance_uid == sop_instance_uid).scalar())


def stored_in(level: str, uid: str) -> list[StoredInstance]:
    """The stored instances of one study ("STUDY") or series ("SERIES"), by its UID."""
    key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}[level]
    with reading():
        return instances(Request(level, {key: uid}))


def patient_and_date(sop_instance_uid: str) -> tuple[str, str] | None:
    """The Patient ID and Study Date of the study holding this instance (None if not stored)."""
    with reading():
        return (Study.select(Patient.patient_id, Study.study_date).join(Patient)
                .switch(Study).join(Series).join(Instance)
                .where(Instance.sop_instance_uid == sop_instance_uid).tuples().first())


def instances_received_since(when: str) -> int:
    """How many stored instances were received at or after `when` ("YYYY-MM-DD HH:MM:SS")."""
    with reading():
        return Instance.select().where(Instance.received >= when).count()


def last_received() -> float | None:
    """When the newest stored instance was received (epoch seconds), None with nothing stored:
    MAX over the indexed column, one index probe however large the archive (/metrics asks it
    at every scrape). The column holds local time (models._now), as SQLite text or a
    PostgreSQL timestamp."""
    with reading():
        value = Instance.select(fn.MAX(Instance.received)).scalar()
    if not value:
        return None
    if isinstance(value, datetime.datetime):
        return value.timestamp()   # naive: local time, as written
    try:
        return time.mktime(time.strptime(str(value)[:19], "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return None


def sop_classes_in_studies(study_uids: list[str]) -> dict[str, list[str]]:
    """SOP Classes in Study (0008,0062) of each study named: the distinct SOP Class UIDs of its
    stored instances (PS3.18 Table 10.6.3-3 returns it with a study). Read on the SOP class
    column's index, a bounded number of studies per statement."""
    out: dict[str, list[str]] = {u: [] for u in study_uids}
    with reading():
        for i in range(0, len(study_uids), 500):
            batch = study_uids[i:i + 500]
            rows: Any = (Instance.select(Study.study_instance_uid, Instance.sop_class_uid)
                         .join(Series).join(Study)
                         .where(Study.study_instance_uid.in_(batch))
                         .group_by(Study.study_instance_uid, Instance.sop_class_uid)
                         .order_by(Study.study_instance_uid, Instance.sop_class_uid).tuples())
            for study, sop_class in rows:
                out[study].append(sop_class)
    return out
