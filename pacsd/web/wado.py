"""WADO-URI (PS3.18 chapter 9): GET /wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…

One stored instance, either as its DICOM file (application/dicom, streamed from disk unchanged)
or rendered as JPEG / PNG by pacsd.imaging.render (one frame, optionally windowed and scaled).
The instance is found through the index, never by a path built from a UID.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import bottle
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsd.imaging import render, transcode
from pacsd.errors import PacsError
from pacsd.imaging.header import is_valid_uid
from pacsd.query import Request, StoredInstance, instances
from pacsd.web.app import new_app
from pacsd.web import visibility
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

DICOM = "application/dicom"
IMAGES = {"image/jpeg": "jpeg", "image/png": "png"}
EXTENSIONS = {"jpeg": "jpg", "png": "png"}
# Stored uncompressed, asked for in another uncompressed little endian syntax: re-encoded in
# memory by pacsd.imaging.transcode (PS3.18 9.1.2.1.6 allows any syntax the server supports;
# big endian, retired, is read but never made); every other change of syntax is refused with 406.
CONVERTIBLE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
CONVERTIBLE_FROM = CONVERTIBLE | {ExplicitVRBigEndian}
IMAGE_ONLY = ("rows", "columns", "windowCenter", "windowWidth", "frameNumber", "imageQuality",
              "region")
CACHE = "private, max-age=3600"   # patient data: never in shared caches


def fail(status: int, message: str) -> bottle.HTTPError:
    return bottle.HTTPError(status, message)


def _int_param(q: Any, name: str, lo: int, hi: int) -> int | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise fail(400, f"{name} must be an integer, not {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise fail(400, f"{name} must be between {lo} and {hi}, not {value}")
    return value


def _float_param(q: Any, name: str) -> float | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise fail(400, f"{name} must be a number, not {raw[:40]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise fail(400, f"{name} must be a finite number")
    return value


def _content_type(raw: str | None) -> str | None:
    """The first type of the comma list (PS3.18 9.1.2.1.5, most preferred first) that we can
    produce; None when none was asked for."""
    if not raw:
        return None
    asked = [t.split(";")[0].strip().lower() for t in raw.split(",") if t.strip()]
    for t in asked:
        if t == DICOM or t in IMAGES:
            return t
        if t in ("image/*", "*/*"):
            return "image/jpeg"
    raise fail(406, f"contentType {raw[:100]!r}: pacsd serves {DICOM}, "
                    f"{', '.join(IMAGES)}")


def _lookup(rt: Runtime, study: str, series: str, obj: str) -> StoredInstance:
    req = Request("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series,
                            "SOPInstanceUID": obj}, scope=visibility.scope())
    with rt.archive.index.reading():
        found = instances(req)
    if not found:
        raise fail(404, f"no object {obj} in series {series} of study {study}")
    if found[0].damaged:   # pacsd.storage.integrity: never sent as if it were good
        raise fail(500, f"the stored file of object {obj} was found damaged (missing or "
                        "changed since it was stored): it is not sent (see `pacsd verify`)")
    return found[0]


def _stream(rt: Runtime, inst: StoredInstance, transfer_syntax: str | None) -> Any:
    path = rt.archive.store.placed(inst.path)
    bottle.response.content_type = DICOM
    bottle.response.set_header("Content-Disposition",
                               f'attachment; filename="{inst.sop_instance_uid}.dcm"')
    bottle.response.set_header("Cache-Control", CACHE)
    if transfer_syntax and transfer_syntax != inst.transfer_syntax_uid:
        if not (transfer_syntax in CONVERTIBLE and inst.transfer_syntax_uid in CONVERTIBLE_FROM):
            raise fail(406, f"object {inst.sop_instance_uid} is stored as "
                            f"{inst.transfer_syntax_uid}; it can be served only in that "
                            "transfer syntax (omit transferSyntax, or ask for it)")
        body = _convert(path, transfer_syntax)
        bottle.response.set_header("Content-Length", str(len(body)))
        return body
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PacsError(f"the stored file of {inst.sop_instance_uid} is missing") from None
    bottle.response.set_header("Content-Length", str(os.fstat(f.fileno()).st_size))
    return f   # bottle streams it in 64 KiB chunks (or the server's wsgi.file_wrapper)


def _convert(path: Any, transfer_syntax: str) -> bytes:
    """Re-encode an uncompressed file in a little endian syntax, in memory (within the pixel
    budget of pacsd.imaging.bounds)."""
    try:
        ds = transcode.transcode(str(path), UID(transfer_syntax))
    except transcode.TranscodeError as e:
        raise PacsError(f"cannot convert the stored file: {e}") from None
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()

    @app.get("/wado")
    def wado() -> Any:
        q = bottle.request.query
        if q.get("requestType") != "WADO":
            raise fail(400, "requestType=WADO is required (PS3.18 9.1.2.1.1)")
        uids = {}
        for name in ("studyUID", "seriesUID", "objectUID"):
            value = (q.get(name) or "").strip()
            if not value:
                raise fail(400, f"{name} is required")
            if not is_valid_uid(value):
                raise fail(400, f"{name} {value[:80]!r} is not a valid UID (PS3.5 9.1)")
            uids[name] = value
        anonymize = q.get("anonymize")
        if anonymize is not None:
            if anonymize != "yes":
                raise fail(400, "anonymize may only be 'yes'")
            # PS3.18 9.1.2.1.10 lets a server refuse; a partial de-identification would be
            # worse than none (PS3.15 Annex E needs UID remapping, burned-in text review…).
            # (An HTTPResponse, not an HTTPError: the root app has no plain-text 501 page.)
            raise bottle.HTTPResponse(
                "501 Not Implemented: anonymize=yes is not supported: pacsd does not "
                "de-identify objects; ask without it, or de-identify on the client\n",
                status=501, headers={"Content-Type": "text/plain; charset=utf-8"})
        content_type = _content_type(q.get("contentType"))
        transfer_syntax = (q.get("transferSyntax") or "").strip() or None
        if transfer_syntax is not None and not is_valid_uid(transfer_syntax):
            raise fail(400, f"transferSyntax {transfer_syntax[:80]!r} is not a valid UID")
        if content_type == DICOM:
            given = [p for p in IMAGE_ONLY if q.get(p)]
            if given:
                raise fail(400, f"{', '.join(given)} apply only to rendered images, not to "
                                f"{DICOM} (PS3.18 9.1.2)")
        elif content_type is not None and transfer_syntax:
            raise fail(400, f"transferSyntax applies only to {DICOM}")
        if q.get("region"):
            raise fail(400, "region is not supported")
        rows = _int_param(q, "rows", 1, render.MAX_SIDE)
        columns = _int_param(q, "columns", 1, render.MAX_SIDE)
        frame = _int_param(q, "frameNumber", 1, 2 ** 31 - 1)
        quality = _int_param(q, "imageQuality", 1, 100)
        center, width = _float_param(q, "windowCenter"), _float_param(q, "windowWidth")
        if (center is None) != (width is None):
            raise fail(400, "windowCenter and windowWidth go together")
        if width is not None and width <= 0:
            raise fail(400, "windowWidth must be positive")

        inst = _lookup(rt, uids["studyUID"], uids["seriesUID"], uids["objectUID"])
        if content_type == DICOM:
            return _stream(rt, inst, transfer_syntax)
        fmt = IMAGES[content_type or "image/jpeg"]
        try:
            body = render.render(rt.archive.store.placed(inst.path), frame=frame or 1, rows=rows,
                                 columns=columns, fmt=fmt, quality=quality or 90,
                                 window=None if center is None or width is None
                                 else (center, width))
        except render.NotAnImage:
            if content_type is not None:
                raise
            # No contentType and not an image: the object itself (PS3.18 9.1.2.1.5 default).
            return _stream(rt, inst, transfer_syntax)
        except FileNotFoundError:
            raise PacsError(f"the stored file of {inst.sop_instance_uid} is missing") from None
        bottle.response.content_type = f"image/{fmt}"
        bottle.response.set_header("Content-Length", str(len(body)))
        bottle.response.set_header(
            "Content-Disposition",
            f'inline; filename="{inst.sop_instance_uid}.{EXTENSIONS[fmt]}"')
        bottle.response.set_header("Cache-Control", CACHE)
        return body

    return app
