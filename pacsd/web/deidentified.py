"""De-identified export on the web side (issue 22): the choices read from a request, the
burned-in warning before a download, and the README.txt at the end of a de-identified ZIP.

The de-identification itself is pacsd.imaging.deidentify; the routes that use this are the
ZIP and send routes of api.py (`?deidentify=1&longitudinal=1&clean=1`, or the same keys in a
send's JSON body) and GET /api/studies/<uid>/deidentify (what the warning will say).
"""

from __future__ import annotations

import re
from typing import Any

from pacsd.errors import PacsError
from pacsd.imaging.deidentify import Deidentifier, Options, burned_in_reason, readme_text
from pacsd.imaging.header import read_file_header
from pacsd.query import studies

PSEUDONYM_MAX = 64   # a PN component group, an LO
HEADER = "X-Pacsd-Burned-In"   # the warning on a de-identified ZIP's response, in one line
_TRUE = ("1", "true", "yes", "on")


class BadExportRequest(PacsError):
    """A de-identified export asked with a value pacsd cannot use."""

    http_status = 400


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value or "").strip().lower() in _TRUE


def _pseudonym(value: Any, name: str) -> str | None:
    text = str(value or "").strip()
    if not text:
        return None
    if len(text) > PSEUDONYM_MAX or re.search(r"[\\\x00-\x1f\x7f]", text):
        raise BadExportRequest(f"{name} must be at most {PSEUDONYM_MAX} characters, without "
                               "backslashes or control characters")
    return text


def wanted(values: Any) -> Deidentifier | None:
    """A Deidentifier for this export when `values` (a query string or a JSON body) ask for
    one (deidentify=1; longitudinal=1, clean=1, patient_name, patient_id), else None."""
    if not _flag(values.get("deidentify")):
        return None
    return Deidentifier(Options(
        retain_longitudinal=_flag(values.get("longitudinal")),
        clean_descriptors=_flag(values.get("clean") or values.get("clean_descriptors")),
        patient_name=_pseudonym(values.get("patient_name"), "patient_name"),
        patient_id=_pseudonym(values.get("patient_id"), "patient_id")))


def preview(store: Any, study_uid: str, series_uid: str | None = None) -> list[dict[str, Any]]:
    """The series of a study (or the one series) whose pixels may carry identifying text:
    modality US, SC or DX (from the index), or BurnedInAnnotation YES in the header of its
    first instance. Known before anything is sent, for the response header and the page."""
    study = studies.study_summary(study_uid)
    out: list[dict[str, Any]] = []
    for s in (study or {}).get("series", []):
        if series_uid and s["series_uid"] != series_uid:
            continue
        flag = ""
        path = studies.instance_path(s["first_sop"]) if s.get("first_sop") else None
        if path is not None:
            try:
                flag = str(read_file_header(store.placed(path)).get("BurnedInAnnotation", "")
                           or "")
            except Exception:  # noqa: BLE001 (an unreadable header: the modality decides)
                flag = ""
        reason = burned_in_reason(s.get("modality") or "", flag)
        if reason:
            out.append({"series_uid": s["series_uid"], "series_number": s.get("number"),
                        "modality": s.get("modality") or "",
                        "series_description": s.get("description") or "",
                        "instances": s.get("instances"), "reason": reason})
    return out


def header_value(series: list[dict[str, Any]]) -> str:
    """The warning in one header line (ASCII): "US series 3 (12 instance(s)); SC series 4"."""
    parts = [f"{s['modality'] or '?'} series "
             f"{'?' if s['series_number'] is None else s['series_number']}"
             f" ({s['instances']} instance(s))" for s in series]
    text = "; ".join(parts)
    return re.sub(r"[^\x20-\x7e]", "?", text)[:2000]


def readme(deid: Deidentifier) -> list[tuple[str, bytes]]:
    """README.txt for the end of a de-identified ZIP: how it was made, and the warning."""
    return [("README.txt", readme_text(deid).encode("utf-8"))]
