"""The Worklist page's JSON API (issue 23): the scheduled steps of a day for clinics without a
RIS, added, changed and cancelled by hand; with what the modalities reported (MPPS) and the study
that came of each. And, for the viewer, the order a study was made for.

  GET    /api/worklist?day=YYYYMMDD|all&modality=&status=open|ended|STATUS&q=&limit=
  GET    /api/worklist/<id>
  POST   /api/worklist                  a new step (values keyed by column or DICOM keyword)
  PUT    /api/worklist/<id>             (or PATCH) change some of its values
  POST   /api/worklist/<id>/cancel      status CANCELED
  POST   /api/worklist/<id>/status      {"status": one of BY_HAND}
  GET    /api/studies/<uid>/order       the step a study was made for, and its MPPS

The values are checked by pacsd.query.worklist.clean_step, as those of HL7 orders are. Who: any
user who sees every study; a user limited by [[groups]] sees only some studies, while a worklist
names every patient scheduled (403). The order of one study is shown to whoever may see it.
Each change is an audit record (`schedule`, `schedule-change`: pacsd.web.audit).
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

import bottle

from pacsd.query import studies
from pacsd.query import worklist as wl
from pacsd.web import visibility
from pacsd.web.api import check_uid, fail, json_body, json_response, parse_date, web_caller
from pacsd.web.app import new_app, utf8_query
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

# The statuses a person may set. STARTED is the modality's (an MPPS in progress), EXPIRED
# housekeeping's; COMPLETED by hand is for a modality that reports nothing and images that
# came without the accession number.
BY_HAND = ("SCHEDULED", "ARRIVED", "READY", "COMPLETED", "DISCONTINUED", "CANCELED")
REQUIRED = ("patient_id", "modality", "start_date", "study_instance_uid")
MAX_LIMIT = 500
_PERFORMED = ("status", "calling_aet", "study_instance_uid", "modality", "station_aet",
              "started", "finished", "images")
# What the viewer shows of a study's order.
_ORDER = ("id", "status", "accession_number", "requested_procedure_id",
          "requested_procedure_description", "requested_procedure_code", "sps_description",
          "modality", "station_aet", "station_name", "start_date", "start_time",
          "referring_physician_name", "requesting_physician")


def _allowed() -> None:
    if visibility.restricted():
        raise fail(403, "the Worklist is for users who see every study (yours are limited "
                        "by [[groups]])")


def _source() -> str:
    """"web" for the Worklist page (the Referer browsers send with its requests), else "api"."""
    ref = bottle.request.get_header("Referer") or ""
    try:
        path = urlsplit(ref).path
    except ValueError:
        path = ""
    return "web" if path.endswith("/app/worklist") else "api"


def _note(step: dict[str, Any], detail: str) -> None:
    """What the audit record says (pacsd.web.audit reads it after the answer): the patient,
    the study the step is for, what was done."""
    bottle.request.environ["pacsd.audit"] = {
        "patients": [(str(step.get("patient_id") or ""), str(step.get("patient_name") or ""))],
        "studies": [s for s in (step.get("study_instance_uid"),) if s],
        "detail": detail}


# --- answers ----------------------------------------------------------------------------------

def _performed(row: dict[str, Any], full: bool) -> dict[str, Any]:
    series = [s for s in str(row.get("series") or "").split("\\") if s]
    out = {"uid": row["sop_instance_uid"], **{k: row.get(k) for k in _PERFORMED},
           "series": len(series)}
    if full:
        out.update(series_uids=series, description=row.get("description") or "",
                   discontinued_reason=row.get("discontinued_reason") or "",
                   updated=row.get("updated"))
    return out


def _candidates(row: dict[str, Any], performed: list[dict[str, Any]]) -> list[str]:
    """Where the step's images may be: the study it was linked to, the UID it gave the
    modality, the UIDs its performed steps name."""
    found = [row.get("linked_study") or "", row.get("study_instance_uid") or ""]
    found += [p.get("study_instance_uid") or "" for p in performed]
    return [u for u in dict.fromkeys(found) if u]


def _item(row: dict[str, Any], performed: list[dict[str, Any]], stored: set[str],
          full: bool = False) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if not k.endswith("_key")}
    out["performed"] = [_performed(p, full) for p in performed]
    out["study"] = next((u for u in _candidates(row, performed) if u in stored), "")
    return out


def _stored(uids: list[str]) -> set[str]:
    return set(studies.patients_of_studies(uids)) if uids else set()


def _int_param(q: Any, name: str, default: int, high: int) -> int:
    try:
        return max(1, min(high, int(q.get(name) or default)))
    except ValueError:
        raise fail(400, f"{name} must be an integer") from None


def list_steps(rt: Runtime) -> dict[str, Any]:
    _allowed()
    q = utf8_query()
    day_text = (q.get("day") or "").strip()
    day = None if day_text.lower() == "all" else (parse_date(day_text, "day") or wl.today())
    modality = (q.get("modality") or "").strip().upper()
    if not re.fullmatch(r"[A-Z0-9_]{0,16}", modality):
        raise fail(400, "modality: letters and digits, as CT or MR")
    status = (q.get("status") or "").strip()
    if status and status not in ("open", "ended") and status.upper() not in wl.STATUSES:
        raise fail(400, f"status: open, ended or one of {', '.join(wl.STATUSES)}")
    text = (q.get("q") or "").strip()[:64]
    limit = _int_param(q, "limit", MAX_LIMIT, MAX_LIMIT)
    with rt.archive.index.reading():
        rows = wl.steps(day=day, modality=modality or None, status=status or None,
                        text=text or None, limit=limit)
        performed = wl.performed_of_steps([int(r["id"]) for r in rows])
        stored = _stored([u for r in rows for u in _candidates(r, performed[int(r["id"])])])
        modalities = wl.modalities_scheduled(day) if day else []
    return {"day": day or "", "modalities": modalities,
            "items": [_item(r, performed[int(r["id"])], stored) for r in rows]}


def _step(rt: Runtime, step_id: str) -> dict[str, Any]:
    if not re.fullmatch(r"\d{1,18}", step_id):
        raise fail(404, "no such worklist item")
    with rt.archive.index.reading():
        row = wl.step(int(step_id))
    if row is None:
        raise fail(404, "no such worklist item")
    return row


def one_step(rt: Runtime, step_id: str) -> dict[str, Any]:
    _allowed()
    row = _step(rt, step_id)
    with rt.archive.index.reading():
        performed = wl.performed_of(step_id=int(row["id"]))
        stored = _stored(_candidates(row, performed))
    return _item(row, performed, stored, full=True)


# --- changes ----------------------------------------------------------------------------------

def _values(body: dict[str, Any], partial: bool) -> dict[str, str]:
    """The body's values checked (clean_step): column -> value; 400 with its message."""
    for name, value in body.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
            raise fail(400, f"{str(name)[:64]!r}: a text or a number")
    try:
        values = wl.clean_step(body, partial=partial)
    except wl.StepRefused as e:
        # The message may quote what was typed (a birth date...): DEBUG only.
        log.debug("worklist values refused for %s: %s", web_caller(), e)
        raise fail(400, str(e)) from None
    status = values.get("status")
    if status is not None and status not in BY_HAND:
        raise fail(400, f"ScheduledProcedureStepStatus: set by hand, one of {', '.join(BY_HAND)}")
    return values


def _unique_uid(rt: Runtime, uid: str, step_id: int | None) -> None:
    """A Study Instance UID names one step (the modality copies it into its images)."""
    with rt.archive.index.reading():
        other = wl.step_of_study(uid)
    if other is not None and other["study_instance_uid"] == uid and other["id"] != step_id:
        raise fail(409, f"StudyInstanceUID {uid} is already that of worklist item {other['id']}")


def create(rt: Runtime) -> bottle.HTTPResponse:
    _allowed()
    values = _values(json_body(), partial=False)
    _unique_uid(rt, values["study_instance_uid"], None)
    values["source"] = _source()
    step_id = rt.archive.index.add_step(values)
    row = _step(rt, str(step_id))
    _note(row, f"worklist item {step_id} added: {row['modality']} {row['start_date']} "
               f"{row['start_time']}".rstrip())
    log.info("worklist item %d (%s on %s) added by %s", step_id, row["modality"],
             row["start_date"], web_caller())
    return json_response(one_step(rt, str(step_id)), 201)


def edit(rt: Runtime, step_id: str) -> dict[str, Any]:
    _allowed()
    row = _step(rt, step_id)
    values = _values(json_body(), partial=True)
    changed = {k: v for k, v in values.items() if row.get(k) != v}
    if not changed:
        return one_step(rt, step_id)
    emptied = [wl.BY_COLUMN[c].keyword for c in REQUIRED if c in changed and not changed[c]]
    if emptied:
        raise fail(400, "a scheduled step needs " + ", ".join(emptied))
    if "study_instance_uid" in changed:
        _unique_uid(rt, changed["study_instance_uid"], int(row["id"]))
    rt.archive.index.update_step(int(row["id"]), changed)
    _note({**row, **changed}, f"worklist item {row['id']} changed: " + ", ".join(
        wl.BY_COLUMN[c].keyword for c in changed))
    log.info("worklist item %s changed by %s (%s)", row["id"], web_caller(),
             ", ".join(sorted(changed)))
    return one_step(rt, step_id)


def set_status(rt: Runtime, step_id: str, status: str | None = None) -> dict[str, Any]:
    """POST .../cancel (CANCELED) or .../status {"status": ...}: a status set by hand."""
    _allowed()
    row = _step(rt, step_id)
    if status is None:
        status = str(json_body().get("status") or "").strip().upper()
        if status not in BY_HAND:
            raise fail(400, f"status: one of {', '.join(BY_HAND)}")
    elif row["status"] in ("COMPLETED", "DISCONTINUED"):   # cancel: only what was not done
        raise fail(409, f"worklist item {row['id']} was performed ({row['status']}): it can no "
                        "longer be cancelled")
    if row["status"] != status:
        rt.archive.index.update_step(int(row["id"]), {"status": status})
        log.info("worklist item %s %s by %s", row["id"], status, web_caller())
    _note(row, f"worklist item {row['id']} {row['status']} -> {status}")
    return one_step(rt, step_id)


# --- a study's order (the viewer) ---------------------------------------------------------------

def study_order(rt: Runtime, uid: str) -> dict[str, Any]:
    """The step a study was made for (its Study Instance UID, or linked by its accession) and
    the performed steps reported for it; {"order": null} for a study no step names."""
    check_uid(uid)
    visibility.check_study(None, uid)
    with rt.archive.index.reading():
        row = wl.step_of_study(uid)
        performed = wl.performed_of(study_uid=uid)
        if row is not None:
            seen = {p["sop_instance_uid"] for p in performed}
            performed += [p for p in wl.performed_of(step_id=int(row["id"]))
                          if p["sop_instance_uid"] not in seen]
    order = {k: row.get(k) for k in _ORDER} if row is not None else None
    return {"order": order, "performed": [_performed(p, False) for p in performed],
            "worklist": not visibility.restricted()}


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    app.route("/api/worklist", "GET", lambda: list_steps(rt))
    app.route("/api/worklist", "POST", lambda: create(rt))
    app.route("/api/worklist/<step_id>", "GET", lambda step_id: one_step(rt, step_id))
    app.route("/api/worklist/<step_id>", ["PUT", "PATCH"], lambda step_id: edit(rt, step_id))
    app.route("/api/worklist/<step_id>/cancel", "POST",
              lambda step_id: set_status(rt, step_id, "CANCELED"))
    app.route("/api/worklist/<step_id>/status", "POST", lambda step_id: set_status(rt, step_id))
    app.route("/api/studies/<uid>/order", "GET", lambda uid: study_order(rt, uid))
    return app
