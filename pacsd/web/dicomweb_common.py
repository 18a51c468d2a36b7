"""What the DICOMweb services (PS3.18) share: the DICOM JSON media type, URLs as the client
sees them (the mount point is in SCRIPT_NAME), UID checks, and their way of failing.
"""

from __future__ import annotations

import json
from typing import Any

import bottle

from pacsd.imaging.header import is_valid_uid
from pacsd.web import multipart

DICOM_JSON = "application/dicom+json"


def fail(status: int, message: str) -> bottle.HTTPError:
    return bottle.HTTPError(status, message)


def base_url() -> str:
    """This app's root as the client sees it (the mount point is in SCRIPT_NAME)."""
    parts = bottle.request.urlparts
    return f"{parts.scheme}://{parts.netloc}{bottle.request.script_name.rstrip('/')}"


def url(study: str, series: str | None = None, sop: str | None = None) -> str:
    url = f"{base_url()}/studies/{study}"
    if series:
        url += f"/series/{series}"
    if sop:
        url += f"/instances/{sop}"
    return url


def check_uids(*uids: str | None) -> None:
    for uid in uids:
        if uid is not None and not is_valid_uid(uid):
            raise fail(400, f"{uid[:80]!r} is not a valid UID")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def without_empty_values(obj: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON with no "Value" on an attribute that has none (PS3.18 F.2.5: an empty
    attribute carries only its "vr"); pydicom writes an empty sequence as "Value": []. In place,
    at any depth; returns `obj`."""
    for attr in obj.values():
        value = attr.get("Value")
        if value is None:
            continue
        if not value or value in ([None], [""]):
            del attr["Value"]
        elif attr.get("vr") == "SQ":
            for item in value:
                if isinstance(item, dict):
                    without_empty_values(item)
    return obj


def accepts_json() -> bool:
    """Whether the request's Accept header takes DICOM JSON (or plain JSON)."""
    return any(r.matches(DICOM_JSON) or r.matches("application/json")
               for r in multipart.parse_accept(bottle.request.get_header("Accept")))
