"""The Modality Worklist's reads (issue 23): which scheduled steps a Modality Worklist C-FIND
matches (PS3.4 K.6.1, the matching of C.2.2.2), the lists the Worklist page shows, the look-ups
HL7 orders and MPPS need; and `clean_step`, the one check of a step's values, whatever brought
them (HL7, the page, the API).

A step is one ScheduledStep row: the Requested Procedure and its patient at the top level of
a worklist item, the Scheduled Procedure Step inside its Scheduled Procedure Step Sequence
(one item: pacsd schedules one step per requested procedure). `FIELDS` names each column's
attribute, VR and place.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peewee import Expression, fn

from pacsd.index.models import PerformedStep, ScheduledStep, name_key, starts_with
from pacsd.query.matching import QueryError, glob, norm_date, norm_time

OPEN = ("SCHEDULED", "ARRIVED", "READY", "STARTED")
ENDED = ("COMPLETED", "DISCONTINUED", "CANCELED", "EXPIRED")
STATUSES = OPEN + ENDED
TOP, SPS = "top", "sps"


@dataclass(frozen=True)
class Field:
    column: str
    keyword: str
    vr: str          # CODE: a code sequence kept as value^scheme^meaning
    place: str       # TOP: the worklist item; SPS: its Scheduled Procedure Step Sequence item


CODE = "CODE"
FIELDS: tuple[Field, ...] = (
    Field("patient_name", "PatientName", "PN", TOP),
    Field("patient_id", "PatientID", "LO", TOP),
    Field("issuer_of_patient_id", "IssuerOfPatientID", "LO", TOP),
    Field("patient_birth_date", "PatientBirthDate", "DA", TOP),
    Field("patient_sex", "PatientSex", "CS", TOP),
    Field("patient_weight", "PatientWeight", "DS", TOP),
    Field("patient_size", "PatientSize", "DS", TOP),
    Field("medical_alerts", "MedicalAlerts", "LO", TOP),
    Field("allergies", "Allergies", "LO", TOP),
    Field("accession_number", "AccessionNumber", "SH", TOP),
    Field("placer_order_number", "PlacerOrderNumberImagingServiceRequest", "LO", TOP),
    Field("filler_order_number", "FillerOrderNumberImagingServiceRequest", "LO", TOP),
    Field("requested_procedure_id", "RequestedProcedureID", "SH", TOP),
    Field("requested_procedure_description", "RequestedProcedureDescription", "LO", TOP),
    Field("requested_procedure_code", "RequestedProcedureCodeSequence", CODE, TOP),
    Field("requested_procedure_priority", "RequestedProcedurePriority", "SH", TOP),
    Field("reason", "ReasonForTheRequestedProcedure", "LO", TOP),
    Field("study_instance_uid", "StudyInstanceUID", "UI", TOP),
    Field("referring_physician_name", "ReferringPhysicianName", "PN", TOP),
    Field("requesting_physician", "RequestingPhysician", "PN", TOP),
    Field("admission_id", "AdmissionID", "LO", TOP),
    Field("sps_id", "ScheduledProcedureStepID", "SH", SPS),
    Field("sps_description", "ScheduledProcedureStepDescription", "LO", SPS),
    Field("modality", "Modality", "CS", SPS),
    Field("station_aet", "ScheduledStationAETitle", "AE", SPS),
    Field("station_name", "ScheduledStationName", "SH", SPS),
    Field("location", "ScheduledProcedureStepLocation", "SH", SPS),
    Field("start_date", "ScheduledProcedureStepStartDate", "DA", SPS),
    Field("start_time", "ScheduledProcedureStepStartTime", "TM", SPS),
    Field("performing_physician_name", "ScheduledPerformingPhysicianName", "PN", SPS),
    Field("protocol_code", "ScheduledProtocolCodeSequence", CODE, SPS),
    Field("status", "ScheduledProcedureStepStatus", "CS", SPS),
    Field("comments", "CommentsOnTheScheduledProcedureStep", "LT", SPS),
)
BY_COLUMN = {f.column: f for f in FIELDS}
BY_KEYWORD = {f.keyword: f for f in FIELDS}
# Columns a person may set (status aside, which has its own actions); and the page's sources.
EDITABLE = tuple(f.column for f in FIELDS if f.column != "status")
# Matched on an upper-cased copy (PS3.4 C.2.2.2.1: person names, case ignored).
_NAME_KEY = {"patient_name": ScheduledStep.patient_name_key,
             "referring_physician_name": ScheduledStep.referring_physician_name_key,
             "performing_physician_name": ScheduledStep.performing_physician_name_key}
_MAX = {"AE": 16, "CS": 16, "DA": 8, "DS": 16, "LO": 64, "LT": 10240, "PN": 64 * 5, "SH": 16,
        "TM": 16, "UI": 64, CODE: 16 + 16 + 64 + 2}


# --- values -------------------------------------------------------------------------------------

class StepRefused(QueryError):
    """Values of a step that cannot be kept (a bad date, too long, an unknown column)."""

    http_status = 400


def _check(field: Field, value: str) -> str:
    value = value.strip() if field.vr not in ("LT",) else value.rstrip()
    if any(c in value for c in "\r\n\f\x00" if field.vr != "LT") or (
            "\\" in value and field.vr != "LT"):
        raise StepRefused(f"{field.keyword}: one value, without control characters or '\\'")
    if field.vr == "DA" and value and not re.fullmatch(r"\d{8}", value):
        raise StepRefused(f"{field.keyword}: a date as YYYYMMDD, not {value!r}")
    if field.vr == "TM" and value and not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?",
                                                      value):
        raise StepRefused(f"{field.keyword}: a time as HHMMSS, not {value!r}")
    if field.vr == "DS" and value and not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?",
                                                      value):
        raise StepRefused(f"{field.keyword}: a decimal number, not {value!r}")
    if field.vr in ("CS", "AE") and value and not re.fullmatch(r"[A-Za-z0-9 _\-.]*", value):
        raise StepRefused(f"{field.keyword}: letters, digits, space, _ - or . only")
    if field.vr == "CS":
        value = value.upper()
    if field.vr == "UI" and value and not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
        raise StepRefused(f"{field.keyword}: a UID (digits and dots), not {value!r}")
    if field.vr == CODE and value and len(value.split("^")) > 3:
        raise StepRefused(f"{field.keyword}: value^scheme^meaning")
    if len(value) > _MAX[field.vr]:
        raise StepRefused(f"{field.keyword}: at most {_MAX[field.vr]} characters")
    return value


def clean_step(values: Mapping[str, Any], *, partial: bool = False) -> dict[str, str]:
    """A step's values (keyed by column or by DICOM keyword) checked per VR: column -> value.
    Unless `partial` (an update), a new step needs a Patient ID, a modality and a date; its
    Study Instance UID is made when missing (2.25.<uuid>)."""
    out: dict[str, str] = {}
    for name, value in values.items():
        field = BY_COLUMN.get(name) or BY_KEYWORD.get(name)
        if field is None:
            raise StepRefused(f"{name!r} is not a worklist field")
        out[field.column] = _check(field, "" if value is None else str(value))
    if out.get("status", "SCHEDULED") not in STATUSES:
        raise StepRefused(f"ScheduledProcedureStepStatus: one of {', '.join(STATUSES)}")
    if not partial:
        missing = [BY_COLUMN[c].keyword for c in ("patient_id", "modality", "start_date")
                   if not out.get(c)]
        if missing:
            raise StepRefused("a scheduled step needs " + ", ".join(missing))
        if not out.get("study_instance_uid"):
            out["study_instance_uid"] = new_uid()
    return out


def new_uid() -> str:
    """A UID of our own (PS3.5 B.2: 2.25 and a UUID as an integer)."""
    import uuid
    return f"2.25.{uuid.uuid4().int}"


# --- matching (PS3.4 K.2.2.1, C.2.2.2) ------------------------------------------------------

def _match(field: Field, value: str) -> Expression | None:
    """The condition for one key's value; None for universal matching."""
    value = value.strip()
    if value == "" or set(value) == {"*"}:
        return None
    col = getattr(ScheduledStep, field.column)
    if field.vr == "PN":
        col = _NAME_KEY.get(field.column, col)
        value = name_key(value)
    if field.vr == "UI":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        return col.in_(uids)
    if field.vr == "DA":
        return _range(col, value, norm_date) if "-" in value else col == norm_date(value)
    if field.vr == "TM":
        return (_range(col, value, norm_time) if "-" in value
                else starts_with(col, norm_time(value)))
    values = value.split("\\")
    if len(values) > 1 and field.vr not in ("PN", "LT", "LO"):
        return col.in_([v.strip() for v in values])
    if "*" in value or "?" in value:
        return glob(col, value.replace("[", "[[]"))
    return col == value


def _range(col: Any, value: str, norm: Any) -> Expression:
    lo, _, hi = value.partition("-")
    lo, hi = norm(lo), norm(hi)
    if not lo and not hi:
        raise QueryError(f"empty range {value!r}")
    cond = (col != "")
    if lo:
        cond &= col >= lo
    if hi:
        cond &= col <= hi + "\uffff"   # a bound like 1200 includes 1200xx
    return cond


def _date_time(date: str, time_: str) -> Expression | None:
    """Scheduled Procedure Step Start Date and Time. Both ranges: one combined range (C.2.2.2.5,
    "20261208-20261209" with "2000-0800" is from 8 pm to 8 am the next day); else each alone."""
    d, t = date.strip(), time_.strip()
    if "-" in d and "-" in t and d.strip("-") and t.strip("-"):
        (dlo, _, dhi), (tlo, _, thi) = d.partition("-"), t.partition("-")
        dlo, dhi, tlo, thi = norm_date(dlo), norm_date(dhi), norm_time(tlo), norm_time(thi)
        sd, st = ScheduledStep.start_date, ScheduledStep.start_time
        cond = sd != ""
        if dlo:
            cond &= (sd > dlo) | ((sd == dlo) & (st >= tlo))
        if dhi:
            cond &= (sd < dhi) | ((sd == dhi) & (st <= thi + "\uffff"))
        return cond
    conds = [c for c in (_match(BY_COLUMN["start_date"], d), _match(BY_COLUMN["start_time"], t))
             if c is not None]
    if not conds:
        return None
    out = conds[0]
    for c in conds[1:]:
        out &= c
    return out


def _code(field: Field, item: Mapping[str, str]) -> Expression | None:
    """A code sequence key (C.2.2.2.6, sequence matching): its item's Code Value and Coding
    Scheme Designator, each single value or wildcard, against the stored value^scheme^meaning."""
    value = (item.get("CodeValue") or "").strip()
    scheme = (item.get("CodingSchemeDesignator") or "").strip()
    if value in ("", "*") and scheme in ("", "*"):
        return None
    col = getattr(ScheduledStep, field.column)
    pattern = (value or "*").replace("[", "[[]") + "^" + (scheme or "*").replace("[", "[[]") + "*"
    return glob(col, pattern)


@dataclass
class WorklistQuery:
    """A Modality Worklist C-FIND identifier's matching keys: top-level and Scheduled
    Procedure Step keys (keyword -> DICOM string, "" universal), and the code sequences'
    item keys (keyword -> {CodeValue, CodingSchemeDesignator})."""

    top: dict[str, str]
    sps: dict[str, str]
    codes: dict[str, dict[str, str]]


def find_steps(q: WorklistQuery, limit: int) -> list[dict[str, Any]]:
    """The steps a worklist query matches, earliest first, at most `limit`: rows as dicts
    (column -> value, plus "id"). Only open steps unless the query asks for a status."""
    conds: list[Any] = []
    for keyword, value in [*q.top.items(), *q.sps.items()]:
        field = BY_KEYWORD.get(keyword)
        if field is None or field.vr == CODE or keyword in (
                "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"):
            continue
        c = _match(field, value)
        if c is not None:
            conds.append(c)
    when = _date_time(q.sps.get("ScheduledProcedureStepStartDate", ""),
                      q.sps.get("ScheduledProcedureStepStartTime", ""))
    if when is not None:
        conds.append(when)
    for keyword, item in q.codes.items():
        field = BY_KEYWORD.get(keyword)
        if field is not None and field.vr == CODE:
            c = _code(field, item)
            if c is not None:
                conds.append(c)
    if not q.sps.get("ScheduledProcedureStepStatus", "").strip("* "):
        conds.append(ScheduledStep.status.in_(OPEN))
    query: Any = ScheduledStep.select()
    for c in conds:
        query = query.where(c)
    query = query.order_by(ScheduledStep.start_date, ScheduledStep.start_time,
                           ScheduledStep.id).limit(limit)
    return list(query.dicts())


def code_item(text: str) -> dict[str, str] | None:
    """value^scheme^meaning -> the Code Sequence item's CodeValue, CodingSchemeDesignator,
    CodeMeaning; None when there is no code."""
    if not text:
        return None
    value, scheme, meaning = (text.split("^") + ["", "", ""])[:3]
    return {"CodeValue": value, "CodingSchemeDesignator": scheme or "L", "CodeMeaning": meaning}


# --- the pages, HL7 and MPPS ----------------------------------------------------------------

def steps(*, day: str | None = None, modality: str | None = None,
          status: str | None = None, text: str | None = None, limit: int = 500
          ) -> list[dict[str, Any]]:
    """Steps for the Worklist page: of a day (YYYYMMDD), a modality, a status ("open": the
    open ones; "ended": the ended ones; or one status), whose patient name, ID or accession
    contains `text`; earliest first."""
    query: Any = ScheduledStep.select()
    if day:
        query = query.where(ScheduledStep.start_date == norm_date(day))
    if modality:
        query = query.where(ScheduledStep.modality == modality.upper())
    if status == "open":
        query = query.where(ScheduledStep.status.in_(OPEN))
    elif status == "ended":
        query = query.where(ScheduledStep.status.in_(ENDED))
    elif status:
        query = query.where(ScheduledStep.status == status.upper())
    if text:
        t = text.strip()
        pattern = "*" + t.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]") + "*"
        # Case ignored, as the study list does; the table is small (ended steps go after
        # [worklist] keep_days), so no index is needed for it.
        query = query.where(glob(ScheduledStep.patient_name_key, pattern.upper())
                            | glob(fn.UPPER(ScheduledStep.patient_id), pattern.upper())
                            | glob(fn.UPPER(ScheduledStep.accession_number), pattern.upper()))
    query = query.order_by(ScheduledStep.start_date, ScheduledStep.start_time,
                           ScheduledStep.id).limit(limit)
    return list(query.dicts())


def step(step_id: int) -> dict[str, Any] | None:
    row: Any = ScheduledStep.select().where(ScheduledStep.id == step_id).dicts().first()
    return dict(row) if row else None


def step_of_study(study_uid: str) -> dict[str, Any] | None:
    """The step whose Study Instance UID a modality used, or that a study was linked to."""
    row: Any = (ScheduledStep.select()
           .where((ScheduledStep.study_instance_uid == study_uid)
                  | (ScheduledStep.linked_study == study_uid))
           .order_by(ScheduledStep.id.desc()).dicts().first())
    return dict(row) if row else None


def order_steps(*, placer: str = "", filler: str = "", accession: str = "") -> list[dict[str, Any]]:
    """The steps of one order (an HL7 order's placer or filler order number, else its
    accession number), oldest first; [] when none is given or none matches."""
    if placer:
        where = ScheduledStep.placer_order_number == placer
    elif filler:
        where = ScheduledStep.filler_order_number == filler
    elif accession:
        where = ScheduledStep.accession_number == accession
    else:
        return []
    rows: Any = ScheduledStep.select().where(where).order_by(ScheduledStep.id).dicts()
    return list(rows)


def modalities_scheduled(day: str) -> list[str]:
    """The modalities with steps on a day (the page's tabs)."""
    rows: Any = (ScheduledStep.select(ScheduledStep.modality).distinct()
            .where(ScheduledStep.start_date == norm_date(day)).tuples())
    return sorted(str(r[0]) for r in rows if r[0])


def performed(uid: str) -> dict[str, Any] | None:
    row: Any = PerformedStep.select().where(PerformedStep.sop_instance_uid == uid).dicts().first()
    return dict(row) if row else None


def performed_of(*, study_uid: str | None = None, step_id: int | None = None
                 ) -> list[dict[str, Any]]:
    """The performed steps reported for a study, or on a scheduled step, newest first."""
    query: Any = PerformedStep.select()
    if study_uid is not None:
        query = query.where(PerformedStep.study_instance_uid == study_uid)
    if step_id is not None:
        query = query.where(PerformedStep.step == step_id)
    return list(query.order_by(PerformedStep.updated.desc()).limit(100).dicts())


def performed_of_steps(step_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The performed steps reported on each scheduled step named, newest first (the Worklist
    page's list: one statement per 500 steps, on the step column's index)."""
    out: dict[int, list[dict[str, Any]]] = {i: [] for i in step_ids}
    for start in range(0, len(step_ids), 500):
        rows: Any = (PerformedStep.select()
                     .where(PerformedStep.step.in_(step_ids[start:start + 500]))
                     .order_by(PerformedStep.updated.desc()).dicts())
        for row in rows:
            out.setdefault(int(row["step"]), []).append(dict(row))
    return out


def today() -> str:
    return time.strftime("%Y%m%d")
