"""What the DICOMweb services (PS3.18) share: the DICOM JSON and XML media types and the choice
between them, URLs as the client sees them (the mount point is in SCRIPT_NAME), UID checks, and
their way of failing.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import bottle

from pacsd.imaging.header import is_valid_uid
from pacsd.storage import metadata
from pacsd.web import multipart

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"


def fail(status: int, message: str) -> bottle.HTTPError:
    return bottle.HTTPError(status, message)


def base_url() -> str:
    """This app's root as the client sees it (the mount point is in SCRIPT_NAME); worked out
    once per request (a search builds one URL per result)."""
    env = bottle.request.environ
    known = env.get("pacsd.base_url")
    if known is not None:
        return str(known)
    parts = bottle.request.urlparts
    netloc = parts.netloc
    # A Host header without the port while we listen on another than the scheme's default
    # (dicomweb-client leaves it out): the URLs we hand out (RetrieveURL, BulkDataURI) must name
    # the port that was reached. Not behind a proxy, whose Host is its own (X-Forwarded-*).
    port = str(env.get("SERVER_PORT") or "")
    if (":" not in netloc.rsplit("]", 1)[-1] and port
            and port != ("443" if parts.scheme == "https" else "80")
            and not any(k.startswith("HTTP_X_FORWARDED_") or k == "HTTP_FORWARDED"
                        for k in env)):
        netloc += f":{port}"
    base = f"{parts.scheme}://{netloc}{bottle.request.script_name.rstrip('/')}"
    env["pacsd.base_url"] = base
    return base


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


dumps = metadata.dumps   # DICOM JSON as pacsd writes it, here and in the metadata cache


def representation(what: str) -> str:
    """"json" or "xml": what the Accept header takes first, DICOM JSON or the Native DICOM
    Model (PS3.18 8.7.3.4: application/dicom+xml, as multipart/related parts); an absent
    header or */* gets JSON. Otherwise 406."""
    for r in multipart.parse_accept(bottle.request.get_header("Accept")):
        if r.part_type == DICOM_XML:
            return "xml"
        if r.matches(DICOM_JSON) or r.matches("application/json"):
            return "json"
    raise fail(406, f'{what} is available as {DICOM_JSON} or multipart/related; '
                    f'type="{DICOM_XML}"')


def xml_parts(documents: Iterator[tuple[str, str]]) -> Iterator[bytes]:
    """(Content-Location, XML document) pairs as a multipart/related answer of
    application/dicom+xml parts (PS3.18 8.7.3.4); sets the response's Content-Type."""
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type(DICOM_XML, boundary)
    return multipart.stream(
        ((f"Content-Type: {DICOM_XML}; charset=utf-8"
          + (f"\r\nContent-Location: {where}" if where else ""), [doc.encode("utf-8")])
         for where, doc in documents), boundary)
