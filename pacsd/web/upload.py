"""Upload from the browser (the study list's drop zone and Upload… buttons): POST /api/upload.

The page sends the files of a folder, a CD (DICOMDIR tree) or a ZIP it unpacked itself, a few
at a time, as multipart/related parts of type application/dicom, the body STOW-RS takes
(PS3.18 10.5). Each part goes through stow.store_part and so through Archive.put, the one
durable path: stored only once its file and its index row are on disk, the bytes kept as sent.

Why a route of its own rather than STOW-RS itself: a person dropping a CD wants one line per
file in the order dropped (stored, already there, skipped, failed and why), which the Store
Instances Response (stored / failed sequences, no duplicates, nothing skipped) cannot say.
What is not an image is skipped, not failed: a file without "DICM" at offset 128 (a CD's
viewer, autorun.inf, a README), one whose File Meta group cannot be read, and the DICOMDIR
itself (the CD's index: the images it points to are in the same drop).

Who may upload: whoever may store with STOW-RS, that is any user who is logged in (Auth). The
route is a POST under /api: the Guard's same-origin check and Auth's X-Requested-With apply.
"""

from __future__ import annotations

import logging
from typing import Any

import bottle

from pacsd.errors import InvalidDataset, PacsError
from pacsd.web import multipart, stow, visibility
from pacsd.web.app import new_app
from pacsd.web.dicomweb_common import url
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

MAX_PARTS = 1000       # files in one request; the page sends far fewer (BATCH_FILES in studies)
MAX_FILES = 10_000     # files in one drop or ZIP, as the page counts them (it says so)
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"   # the DICOMDIR's SOP Class (PS3.10 8.6)
REASON_MAX = 300


def limits(rt: Runtime) -> dict[str, int]:
    """What the page needs to size its batches (GET /api/upload)."""
    return {"max_body_bytes": rt.cfg.http_max_body_mb << 20, "max_parts": MAX_PARTS,
            "max_files": MAX_FILES}


def _one(rt: Runtime, view: memoryview, headers: dict[str, str]) -> dict[str, Any]:
    """One part: stored, duplicate, skipped or failed, and why."""
    part_type = multipart.parse_media_type(headers.get("content-type", "application/dicom"))
    if part_type.media_type not in ("application/dicom", "application/octet-stream"):
        return {"status": "skipped", "reason": f"a part of type {part_type.media_type[:80]}"}
    if len(view) < 132 or view[128:132].tobytes() != b"DICM":
        return {"status": "skipped", "reason": "not a DICOM file (no DICM at offset 128)"}
    try:
        meta, _ = stow.split_part10(view)
    except InvalidDataset as e:
        return {"status": "skipped", "reason": str(e)[:REASON_MAX]}
    if str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY:
        return {"status": "skipped", "reason": "a DICOMDIR (the index of a CD), not an image"}
    result: dict[str, Any] = {}
    try:
        stored = stow.store_part(rt, view, None, result, url)
    except PacsError as e:
        log.log(logging.WARNING if e.log_each else logging.DEBUG,
                "upload: instance %s refused: %s",
                result.get("ReferencedSOPInstanceUID") or "?", e)
        return {"status": "failed", "reason": str(e)[:REASON_MAX],
                "sop": result.get("ReferencedSOPInstanceUID", "")}
    # A restricted user ([[groups]]) is not told that a study beyond their scope already
    # held the image: for them it is stored, which it is.
    seen = visibility.scope()
    duplicate = stored.duplicate and (seen is None or seen.allows(stored.study_instance_uid))
    answer: dict[str, Any] = {"status": "duplicate" if duplicate else "stored",
                              "sop": stored.sop_instance_uid,
                              "study": stored.study_instance_uid}
    if duplicate:
        answer["reason"] = "already stored, the same content"
    elif stored.warning:
        answer["reason"] = stored.comment
    return answer


def upload(rt: Runtime) -> dict[str, Any]:
    environ = bottle.request.environ
    ctype = multipart.parse_media_type(environ.get("CONTENT_TYPE", ""))
    if ctype.media_type != "multipart/related":
        raise bottle.HTTPError(415, 'the upload takes multipart/related; type="application/dicom"')
    boundary = ctype.params.get("boundary")
    if not boundary:
        raise bottle.HTTPError(400, "the multipart body has no boundary parameter")
    length = environ.get("CONTENT_LENGTH")
    try:
        total = int(length) if length else None
    except ValueError:
        raise bottle.HTTPError(400, "bad Content-Length") from None
    results: list[dict[str, Any]] = []
    truncated = False
    try:
        for headers, view in multipart.read_parts(environ["wsgi.input"].read, total, boundary):
            if len(results) >= MAX_PARTS:
                # Those before are stored and said so; the page never sends this many.
                log.warning("upload from %s: more than %d files in one request, the rest "
                            "refused", client_of(environ), MAX_PARTS)
                truncated = True
                break
            results.append(_one(rt, view, headers))
    except multipart.MalformedBody as e:
        if not results:
            raise bottle.HTTPError(e.http_status, str(e)) from None
        log.warning("upload: body cut short after %d part(s): %s", len(results), e)
    except Exception as e:
        if type(e).__name__ == "MaxSizeExceeded":   # cheroot: a chunked body over the cap
            raise bottle.HTTPError(413, "the request body is larger than [http] max_body_mb"
                                   ) from None
        raise
    counts = {s: sum(1 for r in results if r["status"] == s)
              for s in ("stored", "duplicate", "skipped", "failed")}
    # For the audit trail (pacsd.web.audit): what this request stored, as STOW-RS says it.
    environ["pacsd.audit"] = {
        "studies": sorted({r["study"] for r in results if r["status"] in ("stored", "duplicate")}),
        "count": counts["stored"] + counts["duplicate"]}
    user = environ.get("pacsd.user")
    log.info("upload by %s from %s: %d stored, %d duplicate, %d skipped, %d failed",
             user.name if user else "open access", client_of(environ), counts["stored"],
             counts["duplicate"], counts["skipped"], counts["failed"])
    return {"results": results, **counts, "truncated": truncated}


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    app.route("/api/upload", "GET", lambda: limits(rt))
    app.route("/api/upload", "POST", lambda: upload(rt))
    return app
