"""The study list and summaries the pages show, read from the index.

The list's search is what people expect of a search box, not DICOM matching (C-FIND and
QIDO-RS keep that, in pacsd.query.matching): names and descriptions are compared on their
search keys (pacsd.index.models.search_key: case, accents and PN separators ignored), IDs
without regard to case. It is sorted and paged in SQL, so a page of 50 out of half a million
studies costs what a page of 50 costs. Each function takes its own connection (`reading()`).
"""

from __future__ import annotations

import datetime
import re
import time
from typing import Any

from peewee import SQL, Expression, NodeList, SqliteDatabase, Value, fn

from pacsd.index.models import (
    Instance,
    Patient,
    Series,
    Study,
    database,
    reading,
    search_key,
    starts_with,
)
from pacsd.query.matching import QueryError, Request, StoredInstance, condition, instances

# The list's sort orders, by the name the pages use; the study's id breaks ties.
SORTS: dict[str, tuple[Any, ...]] = {
    "date": (Study.study_date, Study.study_time),
    # On the search keys, so that Ö sorts beside O on both engines (whatever the database's
    # collation); the name as stored breaks ties (MÜLLER beside Müller, always in one order).
    "patient": (Patient.patient_name_search, Patient.patient_name),
    "patient_id": (Patient.patient_id,),
    "accession": (Study.accession_number,),
    "description": (Study.study_description_search, Study.study_description),
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


def conditions(keys: dict[str, str], description: str = "", name: str = "",
               patient_id: str = "", accession: str = "") -> list[Expression]:
    """The list's search: DICOM matching of `keys` (keyword -> value: dates, modalities), and
    the search box's fields: `name` (name_words), `description` (description_words),
    `patient_id` (id_prefix) and `accession` (contains_ignoring_case). Raises QueryError for
    a value that cannot be matched."""
    conds = [c for k, v in keys.items() if (c := condition(k, v)) is not None]
    of_patient = name_words(name) + id_prefix(patient_id)
    if of_patient:
        # The patients first, each tested once (a third as many rows as studies), rather
        # than the patient of every study the plan walks in date order: a name search at
        # 100,000 studies: 316 ms as a join, 50 ms as this subquery, for two words.
        conds.append(Study.patient.in_(Patient.select(Patient.id).where(*of_patient)))
    # An accession part, likewise: it picks a handful of studies, which the subquery finds
    # reading the table once in its own order; tested on each study the plan walks in date
    # order, the table is read row by row through the date index (100 of 100,000 studies:
    # 104 ms instead of 319 ms). Not the description: a word such as "ct" picks a large
    # share of the studies, and then the walk fills its page at once (115 ms instead of 160).
    conds += description_words(description)
    if accession.strip():
        by_study = Study.alias("searched")
        conds.append(Study.id.in_(by_study.select(by_study.id).where(
            *contains_ignoring_case(by_study.accession_number, accession))))
    return conds


MAX_WORDS = 8   # per search field: a name has 3 groups of at most 5 components


def _words(key: str) -> list[str]:
    """The distinct words of a search key; QueryError (400) past MAX_WORDS, which bounds the
    SQL a request makes (SQLite's parser refuses a few hundred nested conditions)."""
    words = list(dict.fromkeys(key.split()))
    if len(words) > MAX_WORDS:
        raise QueryError(f"a search field takes at most {MAX_WORDS} words")
    return words


# Scripts written without spaces between words (CJK ideographs, kana): a word typed in them
# may sit anywhere in a stored word ("太郎" in "山田太郎").
_UNSPACED = re.compile("[\u2e80-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff]")


def _like(field: Any, pattern: str) -> Expression:
    """`field LIKE pattern`, with backslash as the escape on both engines (SQLite has none
    unless told). peewee writes SQLite's LIKE as GLOB (case-sensitive, other wildcards) and
    its ILIKE as LIKE; the patterns here are lower case, matched against lower-case text."""
    op = "ILIKE" if isinstance(database.obj, SqliteDatabase) else "LIKE"
    return Expression(field, op, NodeList((Value(pattern), SQL("ESCAPE '\\'"))))


def _literal(text: str) -> str:
    """`text` for a LIKE pattern: its % and _ (and the escape itself) taken literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def name_words(text: str) -> list[Expression]:
    """A patient name search: every word typed begins a word of the name, in any order, with
    case and accents ignored ("mul ha", "hans muller" and "MÜLLER" all find MÜLLER^HANS; "ller"
    does not: a radiologist typing "lee" means Lee, not Kleefeld). A word in CJK or kana may be
    anywhere in a word of the name, as those scripts write a name without spaces."""
    conds = []
    for word in _words(search_key(text, name=True)):
        w = _literal(word)
        if _UNSPACED.search(word):
            conds.append(_like(Patient.patient_name_search, f"%{w}%"))
        else:
            conds.append(_like(Patient.patient_name_search, f"{w}%")
                         | _like(Patient.patient_name_search, f"% {w}%"))
    return conds


def description_words(text: str) -> list[Expression]:
    """A study description search: every word typed is somewhere in the description, in any
    order, with case and accents ignored ("hjarna" finds "HJÄRNA UTAN KONTRAST", "abdomen ct"
    finds "CT THORAX/ABDOMEN")."""
    return [_like(Study.study_description_search, f"%{_literal(w)}%")
            for w in _words(search_key(text))]


def id_prefix(text: str) -> list[Expression]:
    """The Patient ID begins with `text`, upper and lower case alike ("pid40" finds PID40-003):
    an ID is typed from its start, and the prefix is a range on the index of LOWER(patient_id)
    (schema 7), so it costs what an exact look-up costs. IDs are ASCII in practice; SQLite's
    and PostgreSQL's LOWER() (with the "C" collation) both fold ASCII."""
    text = text.strip()
    return [starts_with(fn.LOWER(Patient.patient_id), text.lower())] if text else []


def contains_ignoring_case(field: Any, text: str) -> list[Expression]:
    """`text` anywhere in an ID, upper and lower case alike: the last digits of an accession
    number read from a paper slip find its study (a scan of the study table, as any substring
    is; the study list benchmark measures it)."""
    text = text.strip()
    return [_like(fn.LOWER(field), f"%{_literal(text.lower())}%")] if text else []


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



def patients_of_studies(study_uids: list[str]) -> dict[str, tuple[str, str]]:
    """{Study Instance UID: (Patient ID, Patient's Name)} of the stored studies named (for the
    audit trail: one statement per 500 studies, on the study UID's index)."""
    out: dict[str, tuple[str, str]] = {}
    with reading():
        for i in range(0, len(study_uids), 500):
            rows: Any = (Study.select(Study.study_instance_uid, Patient.patient_id,
                                      Patient.patient_name).join(Patient)
                         .where(Study.study_instance_uid.in_(study_uids[i:i + 500])).tuples())
            for uid, pid, name in rows:
                out[uid] = (pid or "", str(name or ""))
    return out


def studies_of_series(series_uids: list[str]) -> list[str]:
    """The Study Instance UIDs of the stored series named (the audit trail of series routes)."""
    with reading():
        rows: Any = (Study.select(Study.study_instance_uid).join(Series, on=(Series.study == Study.id))
                     .where(Series.series_instance_uid.in_(series_uids[:500])).distinct().tuples())
        return [r[0] for r in rows]


def stored_patients(patient_id: str) -> list[dict[str, Any]]:
    """The stored patients with this Patient ID, whatever their issuer: issuer, name, birth
    date, sex and number of studies (HL7 ADT updates and merges compare before correcting)."""
    with reading():
        rows: Any = (Patient.select(Patient.issuer_of_patient_id, Patient.patient_name,
                                    Patient.patient_birth_date, Patient.patient_sex,
                                    Patient.number_of_studies)
                     .where(Patient.patient_id == patient_id).order_by(Patient.id).tuples())
        return [{"issuer": issuer or "", "PatientName": str(name or ""),
                 "PatientBirthDate": born or "", "PatientSex": sex or "",
                 "studies": int(studies or 0)} for issuer, name, born, sex, studies in rows]
