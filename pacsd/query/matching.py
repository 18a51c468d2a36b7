"""DICOM matching (PS3.4 C.2.2.2) turned into SQL on indexed columns.

One module serves C-FIND, C-MOVE/C-GET (which instances a request names) and, later, QIDO-RS.
A `Request` is a level plus keys (keyword -> raw DICOM string, "" for universal matching);
`find` yields one dict per match, keyword -> value, for every requested key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, cast

from peewee import SQL, Expression, Field, SqliteDatabase, fn
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from pacsd.dicom_status import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
from pacsd.errors import PacsError
from pacsd.index.models import (Damage, Instance, Patient, Series, Study, database, name_key,
                                starts_with)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS: dict[str, Any] = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series,
                          "IMAGE": Instance}

# How a key matches: UID (single or list), DA / TM (single or range), PN (case-insensitive,
# wildcards), ST (single, wildcards or list for code strings), IS (single or list), MODALITIES
# (see below); RETURN keys are returned, never matched (counters, the character set, image
# geometry): every key that is matched has an index.
UID, DA, TM, PN, ST, IS, RETURN, MODALITIES = "UI", "DA", "TM", "PN", "ST", "IS", "RET", "MOD"


@dataclass(frozen=True)
class Key:
    level: str
    field: Field
    kind: str
    match_field: Field | None = None   # e.g. the upper-cased copy of a person name


KEYS: dict[str, Key] = {
    # Patient level (PS3.4 C.6.1.1.2 / C.6.2.1.2)
    "PatientName": Key("PATIENT", Patient.patient_name, PN, Patient.patient_name_key),
    "PatientID": Key("PATIENT", Patient.patient_id, ST),
    "IssuerOfPatientID": Key("PATIENT", Patient.issuer_of_patient_id, ST),
    "PatientBirthDate": Key("PATIENT", Patient.patient_birth_date, DA),
    "PatientSex": Key("PATIENT", Patient.patient_sex, ST),
    "NumberOfPatientRelatedStudies": Key("PATIENT", Patient.number_of_studies, RETURN),
    "NumberOfPatientRelatedSeries": Key("PATIENT", Patient.number_of_series, RETURN),
    "NumberOfPatientRelatedInstances": Key("PATIENT", Patient.number_of_instances, RETURN),
    # Study level (C.6.1.1.3 / C.6.2.1.2)
    "StudyInstanceUID": Key("STUDY", Study.study_instance_uid, UID),
    "StudyDate": Key("STUDY", Study.study_date, DA),
    "StudyTime": Key("STUDY", Study.study_time, TM),
    "AccessionNumber": Key("STUDY", Study.accession_number, ST),
    "StudyID": Key("STUDY", Study.study_id, ST),
    "StudyDescription": Key("STUDY", Study.study_description, ST),
    "ReferringPhysicianName": Key("STUDY", Study.referring_physician_name, PN,
                                  Study.referring_physician_name_key),
    "InstitutionName": Key("STUDY", Study.institution_name, ST),
    "PatientAge": Key("STUDY", Study.patient_age, ST),
    "SpecificCharacterSet": Key("STUDY", Study.specific_character_set, RETURN),
    "ModalitiesInStudy": Key("STUDY", Study.modalities_in_study, MODALITIES),
    "NumberOfStudyRelatedSeries": Key("STUDY", Study.number_of_series, RETURN),
    "NumberOfStudyRelatedInstances": Key("STUDY", Study.number_of_instances, RETURN),
    # Series level (C.6.1.1.4)
    "SeriesInstanceUID": Key("SERIES", Series.series_instance_uid, UID),
    "Modality": Key("SERIES", Series.modality, ST),
    "SeriesNumber": Key("SERIES", Series.series_number, IS),
    "SeriesDescription": Key("SERIES", Series.series_description, ST),
    "SeriesDate": Key("SERIES", Series.series_date, DA),
    "SeriesTime": Key("SERIES", Series.series_time, TM),
    "BodyPartExamined": Key("SERIES", Series.body_part_examined, ST),
    "ProtocolName": Key("SERIES", Series.protocol_name, ST),
    "StationName": Key("SERIES", Series.station_name, ST),
    "NumberOfSeriesRelatedInstances": Key("SERIES", Series.number_of_instances, RETURN),
    # Composite object instance level (C.6.1.1.5)
    "SOPInstanceUID": Key("IMAGE", Instance.sop_instance_uid, UID),
    "SOPClassUID": Key("IMAGE", Instance.sop_class_uid, UID),
    "InstanceNumber": Key("IMAGE", Instance.instance_number, IS),
    "ContentDate": Key("IMAGE", Instance.content_date, DA),
    "ContentTime": Key("IMAGE", Instance.content_time, TM),
    "AcquisitionNumber": Key("IMAGE", Instance.acquisition_number, IS),
    "NumberOfFrames": Key("IMAGE", Instance.number_of_frames, RETURN),
    "Rows": Key("IMAGE", Instance.rows, RETURN),
    "Columns": Key("IMAGE", Instance.columns, RETURN),
    "AvailableTransferSyntaxUID": Key("IMAGE", Instance.transfer_syntax_uid, RETURN),
}

UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
               "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


class QueryError(PacsError, ValueError):
    """The request cannot be answered as asked (bad level, malformed range).

    C-FIND answers it with 0xA900 (PS3.4 Table C.4-1: Identifier does not match SOP Class), the
    web with 400. Still a ValueError, as it was before it carried its statuses."""

    dicom_status = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    http_status = 400


@dataclass
class Request:
    level: str
    keys: dict[str, str] = field(default_factory=dict)   # keyword -> value ("" = universal)
    limit: int | None = None
    offset: int = 0
    # What the caller may see (pacsd.query.scope.Scope); None: everything.
    scope: Any = None

    def __post_init__(self) -> None:
        self.level = (self.level or "").strip().upper()
        if self.level not in LEVELS:
            raise QueryError(f"Query/Retrieve Level {self.level!r} is not one of "
                             f"{', '.join(LEVELS)}")


# --- matching ---------------------------------------------------------------------------------

def _is_universal(value: str) -> bool:
    return value == "" or set(value) == {"*"}


def _glob(field_: Field, pattern: str) -> Expression:
    """Wildcard matching ('*' any run, '?' one character; C.2.2.2.4) on an indexed column.
    '[' is the only other GLOB metacharacter; it is escaped as a one-character class."""
    return glob(field_, pattern.replace("[", "[[]"))


def glob(field_: Any, pattern: str) -> Expression:
    """Case-sensitive wildcard matching of a GLOB pattern made of literals, '*', '?' and
    one-character classes '[c]' (a literal c): GLOB on SQLite, which uses the column's index for
    a literal prefix; LIKE elsewhere (PostgreSQL's "C"-collated columns: the same, and
    case-sensitive too)."""
    if isinstance(database.obj, SqliteDatabase):
        return Expression(field_, "GLOB", pattern)
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[" and i + 2 < len(pattern) and pattern[i + 2] == "]":
            ch, i = pattern[i + 1], i + 2   # [c]: the literal c
            out.append("\\" + ch if ch in "\\%_" else ch)
        elif ch in "\\%_":
            out.append("\\" + ch)
        else:
            out.append({"*": "%", "?": "_"}.get(ch, ch))
        i += 1
    return Expression(field_, "LIKE", "".join(out))


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _range(field_: Field, value: str, normalize) -> Expression:
    lo, _, hi = value.partition("-")
    lo, hi = normalize(lo), normalize(hi)
    if not lo and not hi:
        raise QueryError(f"empty range {value!r}")
    if lo and hi:
        # hi is inclusive: a bound like 1200 must include 1200xx, so extend it.
        return (field_ >= lo) & (field_ <= hi + "\uffff")
    if lo:
        return field_ >= lo
    return (field_ <= hi + "\uffff") & (field_ != "")


def norm_date(v: str) -> str:
    v = v.strip().replace(".", "")   # ACR-NEMA style 1993.08.22 (PS3.5 6.2 DA note)
    if v and not re.fullmatch(r"\d{4,8}", v):
        raise QueryError(f"{v!r} is not a date")
    return v


def norm_time(v: str) -> str:
    v = v.strip().replace(":", "")
    if v and not re.fullmatch(r"\d{2,6}(\.\d{0,6})?", v):
        raise QueryError(f"{v!r} is not a time")
    return v


def condition(keyword: str, value: str, narrowed: bool = False) -> Expression | None:
    """The SQL condition for one key, or None for universal matching. `narrowed`: other
    conditions of the query already pick the studies (see ModalitiesInStudy below)."""
    key = KEYS[keyword]
    value = value.strip()
    if _is_universal(value) or key.kind == RETURN:
        return None
    f = key.field
    if key.kind == UID:
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        return f == uids[0] if len(uids) == 1 else f.in_(uids)
    if key.kind == DA:
        return _range(f, value, norm_date) if "-" in value else f == norm_date(value)
    if key.kind == TM:
        if "-" in value:
            return _range(f, value, norm_time)
        return starts_with(f, norm_time(value))
    if key.kind == PN:
        pattern = name_key(value)
        mf = key.match_field or f
        cond = _glob(mf, pattern) if _has_wildcard(pattern) else mf == pattern
        if "=" not in pattern:
            # A name given without component groups also matches the alphabetic group of one
            # stored with them (PS3.5 6.2.1: "Yamada^Tarou=山田^太郎=やまだ^たろう").
            cond = cond | _glob(mf, pattern + "=*")
        return cond
    if key.kind == IS:
        try:
            numbers = [int(v) for v in value.split("\\") if v.strip()]
        except ValueError:
            raise QueryError(f"{keyword} {value!r} is not an integer") from None
        return f == numbers[0] if len(numbers) == 1 else f.in_(numbers)
    if key.kind == MODALITIES:
        # C.2.2.2.8: matches a study with at least one series of any listed modality.
        mods = [m.strip() for m in value.split("\\") if m.strip()]
        # An alias: at SERIES and IMAGE level the outer query has a series of its own.
        s = Series.alias("mod_series")
        cond = (_glob(s.modality, mods[0]) if len(mods) == 1 and _has_wildcard(mods[0])
                else s.modality.in_(mods))
        if narrowed:
            # EXISTS, checked per study on the (study, modality) index, so that the other
            # keys (PatientID, StudyDate) pick the rows: SQLite, without statistics, starts an
            # `IN (SELECT ...)` from every series of the modality in the archive, whatever
            # else is asked (PatientID + ModalitiesInStudy: 5 ms at a million instances).
            return cast(Expression, fn.EXISTS(s.select(SQL("1")).where(
                (s.study == Study.id) & cond)))
        # Alone, the modality's series are what picks the studies.
        return Study.id.in_(s.select(s.study).where(cond))
    # ST: single value (with wildcards) or, for a backslash list, any of them.
    values = [v for v in value.split("\\")]
    if len(values) > 1:
        return f.in_([v.strip() for v in values])
    return _glob(f, value) if _has_wildcard(value) else f == value


# --- the query --------------------------------------------------------------------------------

def _conditions(keys: dict[str, str]) -> list[Expression]:
    """The conditions of these keys; ModalitiesInStudy last, told whether others narrow."""
    conds = [c for k, v in keys.items() if k != "ModalitiesInStudy"
             and (c := condition(k, v)) is not None]
    if "ModalitiesInStudy" in keys:
        mod = condition("ModalitiesInStudy", keys["ModalitiesInStudy"], narrowed=bool(conds))
        if mod is not None:
            conds.append(mod)
    return conds


def _joined(level: str, needed: set[str]) -> Any:
    """SELECT over the level's table joined up to the highest level a key needs."""
    depth = LEVELS.index(level)
    top = min((LEVELS.index(KEYS[k].level) for k in needed), default=depth)
    q = MODELS[level].select()
    for upper in range(depth - 1, top - 1, -1):   # e.g. IMAGE -> SERIES -> STUDY
        q = q.join(MODELS[LEVELS[upper]])
    return q


def select(req: Request, return_keys: list[str]) -> tuple[Any, list[str]]:
    """The SELECT for a request, and the keys (in order) its rows hold."""
    depth = LEVELS.index(req.level)
    # A key below the query level is not a matching key (C.2.2.1.1); it is returned empty.
    usable = {k for k in set(req.keys) | set(return_keys)
              if k in KEYS and LEVELS.index(KEYS[k].level) <= depth}
    scoped = req.scope is not None and req.level != "PATIENT"
    q = _joined(req.level, usable | ({"StudyInstanceUID"} if scoped else set()))
    wanted = [k for k in dict.fromkeys(return_keys) if k in usable]
    fields = [KEYS[k].field for k in wanted]
    q = q.select(*fields) if fields else q.select(MODELS[req.level].id)
    for cond in _conditions({k: v for k, v in req.keys.items() if k in usable}):
        q = q.where(cond)
    if req.scope is not None:
        q = q.where(req.scope.condition() if scoped else req.scope.patient_condition())
    q = q.order_by(MODELS[req.level].id)
    if req.limit is not None:
        q = q.limit(req.limit)
    if req.offset:
        q = q.offset(req.offset)
    return q, wanted


def find(req: Request, return_keys: list[str], is_cancelled=lambda: False
         ) -> Iterator[dict[str, Any]]:
    """Yield, for each entity at `req.level` matching every key, {keyword: value} for the
    `return_keys` this index knows (keys of the level and above). Caller holds a connection."""
    q, wanted = select(req, return_keys)
    for row in q.tuples().iterator():
        if is_cancelled():
            return
        yield dict(zip(wanted, row, strict=True))


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    # Where it belongs: WADO-RS names each part by its URL (PS3.18 8.7.3.5, Content-Location).
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    # Its file was found missing or changed (pacsd.storage.integrity): never sent.
    damaged: bool = False


def instances(req: Request) -> list[StoredInstance]:
    """The stored instances a retrieve request names (C.4.2.2 / C.4.3.2: unique keys at and
    above the level; any other keys given are matched as in C-FIND)."""
    depth = LEVELS.index(req.level)
    given = {k: v for k, v in req.keys.items()
             if k in KEYS and LEVELS.index(KEYS[k].level) <= depth and not _is_universal(v)}
    unique = UNIQUE_KEYS[req.level]
    if unique not in given:
        raise QueryError(f"a {req.level} level retrieve needs {unique}")
    q = _joined("IMAGE", set(given) | {"SOPInstanceUID", "StudyInstanceUID"}).select(
        Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
        Instance.path, Study.study_instance_uid, Series.series_instance_uid)
    for cond in _conditions(given):
        q = q.where(cond)
    if req.scope is not None:
        q = q.where(req.scope.condition())
    q = q.order_by(Instance.series, Instance.instance_number, Instance.id)
    found = [StoredInstance(*row) for row in q.tuples()]  # type: ignore[misc]
    bad = damaged([i.sop_instance_uid for i in found])
    return [replace(i, damaged=True) if i.sop_instance_uid in bad else i for i in found] \
        if bad else found


def damaged(sops: list[str]) -> set[str]:
    """Which of these instances' files were found damaged (one look at an empty table, as it
    nearly always is)."""
    if not sops or Damage.select(Damage.sop_instance_uid).limit(1).first() is None:
        return set()
    bad: set[str] = set()
    for start in range(0, len(sops), 500):
        rows: Any = Damage.select(Damage.sop_instance_uid).where(
            Damage.sop_instance_uid.in_(sops[start:start + 500])).tuples()
        bad |= {str(r[0]) for r in rows}
    return bad


# --- matches as data sets (C-FIND responses, QIDO-RS results) ---------------------------------

_INT_VRS = {"US", "UL", "SS", "SL", "UV", "SV"}
# What a C-FIND response carries of its own, whatever the request says about them.
FILLED_ELSEWHERE = ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle")


def fill_dataset(ds: Dataset, requested: list[DataElement], match: dict[str, Any]) -> Dataset:
    """Put each requested element into `ds` with its value from `match` (empty if unknown,
    C.2.2.1.2), typed by the element's VR."""
    for elem in requested:
        if elem.keyword in FILLED_ELSEWHERE:
            continue
        vr = elem.VR
        value = match.get(elem.keyword)
        if value is None or value == "" or vr == "SQ":
            ds[elem.tag] = DataElement(elem.tag, vr, [] if vr == "SQ" else None)
        elif vr in _INT_VRS:
            ds[elem.tag] = DataElement(elem.tag, vr, int(value))
        elif isinstance(value, str) and "\\" in value and vr not in ("LO", "LT", "ST", "UT", "PN"):
            ds[elem.tag] = DataElement(elem.tag, vr, value.split("\\"))
        else:
            ds[elem.tag] = DataElement(elem.tag, vr, str(value))
    return ds
