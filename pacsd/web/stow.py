"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related; type="application/dicom".

The body is read part by part (at most one part in memory, plus a read chunk, and never
copied); each part is a Part 10 file whose data set bytes are kept exactly as sent and stored
with Archive.put, the one durable path. The answer is the Store Instances Response Module (Annex I) as DICOM JSON.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from typing import Any, Callable, cast

import bottle
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_preamble
from pydicom.tag import Tag

from pacsd.compat.pydicom import read_file_meta
from pacsd.errors import InvalidDataset, PacsError
from pacsd.imaging.header import is_valid_uid
from pacsd.storage.archive import Stored
from pacsd.web import multipart
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
Url = Callable[..., str]   # (study, series, sop) -> the RetrieveURL


def split_part10(view: memoryview) -> tuple[Dataset, int]:
    """The File Meta group of a Part 10 file and where its data set starts."""
    head = io.BytesIO(bytes(view[:65536]))
    try:
        read_preamble(head, False)
        meta = read_file_meta(head)
    except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error) as e:
        raise InvalidDataset(f"not a DICOM Part 10 file: {e}") from None
    if "TransferSyntaxUID" not in meta:
        raise InvalidDataset("the File Meta group has no Transfer Syntax UID")
    return meta, head.tell()


def store_part(rt: Runtime, view: memoryview, study: str | None, result: dict[str, Any],
               url: Url) -> Stored:
    """Store one Part 10 file; fill `result` with what the response says of it. Also the
    browser's upload (upload.py): it reports duplicates, which STOW-RS does not."""
    meta, offset = split_part10(view)
    ts = str(meta.TransferSyntaxUID)
    result["ReferencedSOPClassUID"] = str(meta.get("MediaStorageSOPClassUID", "") or "")
    result["ReferencedSOPInstanceUID"] = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    # The data set exactly as sent, not copied: the part is held once, in the reader's buffer
    # (Archive.put reads the header from it and writes it out as it is). Released before the
    # reader moves on to the next part.
    with view[offset:] as data:
        # A view where put says bytes: it reads any buffer without a copy (header, hash, write).
        stored = rt.archive.put(cast(bytes, data), transfer_syntax=ts, study=study,
                                sop_class=result["ReferencedSOPClassUID"] or None,
                                sop_instance=result["ReferencedSOPInstanceUID"] or None)
    result["RetrieveURL"] = url(stored.study_instance_uid, stored.series_instance_uid,
                                stored.sop_instance_uid)
    result["study"] = stored.study_instance_uid
    if stored.warning:   # stored with a reservation (PS3.18 I.2.2: Warning Reason)
        result["WarningReason"] = stored.warning
        log.info("STOW-RS: instance %s stored with warning 0x%04X: %s",
                 stored.sop_instance_uid, stored.warning, stored.comment)
    return stored


def stow(rt: Runtime, study: str | None, url: Url) -> str:
    if study is not None and not is_valid_uid(study):
        raise bottle.HTTPError(400, f"{study[:80]!r} is not a valid UID")
    ctype = multipart.parse_media_type(bottle.request.environ.get("CONTENT_TYPE", ""))
    if ctype.media_type != "multipart/related" or ctype.part_type not in (
            "application/dicom", "*/*"):
        raise bottle.HTTPError(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    boundary = ctype.params.get("boundary")
    if not boundary:
        raise bottle.HTTPError(400, "the multipart body has no boundary parameter")
    environ = bottle.request.environ
    length = environ.get("CONTENT_LENGTH")
    try:
        total = int(length) if length else None
    except ValueError:
        raise bottle.HTTPError(400, "bad Content-Length") from None
    stream = environ["wsgi.input"]
    results: list[dict[str, Any]] = []
    try:
        for headers, view in multipart.read_parts(stream.read, total, boundary):
            result: dict[str, Any] = {}
            results.append(result)
            part_type = multipart.parse_media_type(headers.get("content-type",
                                                               "application/dicom"))
            try:
                if part_type.media_type != "application/dicom":
                    raise InvalidDataset(f"a part of type {part_type.media_type}")
                store_part(rt, view, study, result, url)
            except PacsError as e:
                result["FailureReason"] = e.dicom_status
                result["error"] = str(e)
                result["http_status"] = e.http_status
                log.log(logging.WARNING if e.log_each else logging.DEBUG,
                        "STOW-RS: instance %s refused: %s",
                        result.get("ReferencedSOPInstanceUID") or "?", result["error"])
    except multipart.MalformedBody as e:
        if not results:
            raise bottle.HTTPError(e.http_status, str(e)) from None
        log.warning("STOW-RS: body cut short after %d part(s): %s", len(results), e)
    except Exception as e:
        if type(e).__name__ == "MaxSizeExceeded":   # cheroot: a chunked body over the cap
            raise bottle.HTTPError(413, "the request body is larger than [http] max_body_mb"
                                   ) from None
        raise
    if not results:
        raise bottle.HTTPError(400, "the multipart body has no parts")
    return _stow_response(results, url)


def _stow_response(results: list[dict[str, Any]], url: Url) -> str:
    """The Store Instances Response Module (PS3.18 10.5.3.1, Annex I) and its HTTP status."""
    ok = [r for r in results if "FailureReason" not in r]
    failed = [r for r in results if "FailureReason" in r]
    ds = Dataset()
    studies = {r["study"] for r in ok}
    # For the audit trail (pacsd.web.audit): what this request stored.
    bottle.request.environ["pacsd.audit"] = {"studies": sorted(studies), "count": len(ok)}
    if len(studies) == 1:
        ds.add_new(0x00081190, "UR", url(studies.pop()))
    if ok:
        ds.ReferencedSOPSequence = [_item(r, ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID",
                                              "RetrieveURL", "WarningReason")) for r in ok]
    if failed:
        ds.FailedSOPSequence = [_item(r, ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID",
                                          "FailureReason")) for r in failed]
    log.info("STOW-RS: %d stored, %d failed", len(ok), len(failed))
    # PS3.18 10.5.3.1 (Table 10.5.3-1, "some common status codes"): 200 all stored, 202 some,
    # 409 none "due to a conflict in the request". A full disk is no conflict in the request
    # but a passing state of the server: when that alone stored nothing, 507 Insufficient
    # Storage (RFC 4918 11.5), a 5xx, so that clients keep the instances and retry later;
    # FailureReason 0xA700 (Out of Resources, PS3.4 B.2.3) per instance in the body as usual.
    if not ok and all(r.get("http_status") == 507 for r in failed):
        bottle.response.status = 507
    else:
        warned = any("WarningReason" in r for r in ok)
        bottle.response.status = 200 if not failed and not warned else 202 if ok else 409
    bottle.response.content_type = DICOM_JSON
    return json.dumps(ds.to_json_dict(suppress_invalid_tags=True), ensure_ascii=False,
                      separators=(",", ":"))


def _item(result: dict[str, Any], keywords: tuple[str, ...]) -> Dataset:
    item = Dataset()
    for kw in keywords:
        value = result.get(kw)
        if value in (None, "") and kw != "FailureReason":
            continue
        vr = {"RetrieveURL": "UR", "FailureReason": "US", "WarningReason": "US"}.get(kw, "UI")
        item.add_new(Tag(kw), vr, value)
    return item
