"""WADO-RS metadata (PS3.18 10.4.1.1.2) and the bulk data its BulkDataURIs name (F.2.6, 8.6),
under /dicom-web.

Metadata is each stored file's header as DICOM JSON (pacsd.imaging.dicom_json), built once per
file and kept in the store's derived cache (pacsd.storage.metadata), so that a series' metadata
costs a stat and a read per instance; the instance's URL is put into its BulkDataURIs as the
client reached us. As XML (PS3.19 Native DICOM Model) when asked for application/dicom+xml.

Bulk data is served as multipart/related; type="application/octet-stream", little endian: an
element's bytes read from where they lie in the file (never the whole file), Pixel Data as the
frames resource reads it (native: one part, all frames; encapsulated: one part per frame).
"""

from __future__ import annotations

import json
import logging
from itertools import chain
from pathlib import Path
from typing import Iterator

import bottle
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pacsd import query
from pacsd.errors import PacsError
from pacsd.imaging import dicom_json
from pacsd.imaging import frames as cut
from pacsd.imaging.dicom_xml import native_xml
from pacsd.imaging.header import read_file_header
from pacsd.storage import metadata as cached
from pacsd.web import multipart
from pacsd.web.dicomweb_common import DICOM_JSON, base_url, fail, representation, xml_parts
from pacsd.web.runtime import Runtime
from pacsd.web.wado_rs import answered, frame_type, instance_url, stored

log = logging.getLogger(__name__)

# How a BulkDataURI is cached (dicom_json.INSTANCE as JSON writes it); no string value can
# produce this, since a quote inside a value is escaped.
_PLACEHOLDER = '"BulkDataURI":' + json.dumps(dicom_json.INSTANCE)[:-1]
_READ = 1 << 20   # bulk data read in pieces of this (a multiple of every word size)


def instance_json_text(rt: Runtime, inst: query.StoredInstance, base: str | None = None) -> str:
    """The instance's metadata as DICOM JSON text, its BulkDataURIs pointing here (or, with
    `base`, at that text followed by the instance's path: cached.BASE for a joined text)."""
    text = cached.json_text(rt.archive.store, inst.path, inst.transfer_syntax_uid)
    if base is None:
        return text.replace(_PLACEHOLDER, '"BulkDataURI":' + json.dumps(instance_url(inst))[:-1])
    tail = json.dumps(f"/studies/{inst.study_instance_uid}/series/{inst.series_instance_uid}"
                      f"/instances/{inst.sop_instance_uid}")[1:-1]
    return text.replace(_PLACEHOLDER, '"BulkDataURI":"' + base + tail)


_UNREADABLE = (OSError, InvalidDicomError, ValueError, EOFError, PacsError)


def _unreadable(inst: query.StoredInstance, e: Exception) -> None:
    log.error("WADO-RS metadata: stored file %s of %s cannot be read: %s",
              inst.path, inst.sop_instance_uid, e)


def _readable(rt: Runtime, insts: list[query.StoredInstance]) -> Iterator[
        tuple[query.StoredInstance, str]]:
    for inst in insts:
        try:
            yield inst, instance_json_text(rt, inst)
        except _UNREADABLE as e:
            _unreadable(inst, e)


def _joined(rt: Runtime, insts: list[query.StoredInstance]) -> str | None:
    """The metadata of many instances as one text (pacsd.storage.metadata.joined_json_text:
    kept in memory, one stat per instance when nothing changed); None when a file is gone."""
    def texts() -> Iterator[str | None]:
        for inst in insts:
            try:
                yield instance_json_text(rt, inst, cached.BASE)
            except _UNREADABLE as e:
                _unreadable(inst, e)
                yield None
    first = insts[0]
    same_series = all(i.series_instance_uid == first.series_instance_uid for i in insts)
    key = ("metadata", first.study_instance_uid,
           first.series_instance_uid if same_series else None)
    try:
        text = cached.joined_json_text(rt.archive.store, key, [i.path for i in insts], texts)
    except OSError:
        return None   # a file gone: the instance by instance answer says which
    return text.replace(cached.BASE, json.dumps(base_url())[1:-1])


def metadata(rt: Runtime, insts: list[query.StoredInstance]
             ) -> str | Iterator[str] | Iterator[bytes]:
    form = representation("metadata")
    if form == "xml":   # PS3.18 10.4.3: one NativeDicomModel part per instance
        return xml_parts((instance_url(inst), native_xml(json.loads(text)))
                         for inst, text in _readable(rt, insts))
    bottle.response.content_type = DICOM_JSON
    if len(insts) > 1:
        text = _joined(rt, insts)
        if text is not None:
            return text

    def body() -> Iterator[str]:
        sep = "["
        for _inst, text in _readable(rt, insts):
            yield sep + text
            sep = ","
        yield "[]" if sep == "[" else "]"
    return body()


# --- bulk data --------------------------------------------------------------------------------

def _file_range(path: Path, offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(_READ, length))
            if not chunk:
                return   # the client sees fewer bytes than the Content-Length
            length -= len(chunk)
            yield chunk


def _pixel_bulk(rt: Runtime, inst: query.StoredInstance) -> Iterator[bytes]:
    """Pixel Data as the frames resource reads it, every frame: native pixels in one part (the
    value, little endian), encapsulated frames one part each, as stored."""
    path = rt.archive.store.placed(inst.path)
    ts = inst.transfer_syntax_uid
    part_type, part_ctype, decode = frame_type(ts)
    n_frames = int(read_file_header(path).get("NumberOfFrames") or 1)
    chunks = answered(cut.read_frames(path, ts, list(range(1, n_frames + 1)), decode))
    first = next(chunks)   # no pixels, too many: an answer, not a cut body
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type(part_type, boundary)
    where = f"{instance_url(inst)}/bulkdata/{dicom_json.PIXEL_DATA:08X}"
    head = f"Content-Type: {part_ctype}\r\nContent-Location: {where}"
    if decode or not UID(ts).is_compressed:
        return multipart.stream([(head, chain([first], chunks))], boundary)
    return multipart.stream(((head, [frame]) for frame in chain([first], chunks)), boundary)


def bulkdata(rt: Runtime, inst: query.StoredInstance, path_text: str) -> Iterator[bytes]:
    try:
        steps = dicom_json.parse_path(path_text)
    except ValueError as e:
        raise fail(400, str(e)) from None
    if steps == (dicom_json.PIXEL_DATA,):
        return _pixel_bulk(rt, inst)
    if not any(r.matches("application/octet-stream")
               for r in multipart.parse_accept(bottle.request.get_header("Accept"))):
        raise fail(406, 'bulk data is sent as multipart/related; type="application/octet-stream"')
    path = rt.archive.store.placed(inst.path)
    ts = UID(inst.transfer_syntax_uid)
    vr, offset, length, value = dicom_json.bulk_element(path, ts, steps)
    chunks = iter([value]) if value is not None else _file_range(path, offset, length)
    chunks = dicom_json.little_endian(chunks, vr, ts.is_little_endian or ts.is_deflated)
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type("application/octet-stream", boundary)
    head = (f"Content-Type: application/octet-stream\r\n"
            f"Content-Location: {instance_url(inst)}/bulkdata/{path_text}")
    bottle.response.content_length = multipart.stream_length([head], [length], boundary)
    return multipart.stream([(head, chunks)], boundary)


# --- the routes -------------------------------------------------------------------------------

def add_routes(app: bottle.Bottle, rt: Runtime) -> None:
    """Metadata and bulk data resources (PS3.18 10.4.1), on the DICOMweb app."""
    S, SE, I = "/studies/<study>", "/series/<series>", "/instances/<sop>"   # noqa: E741
    # Metadata comes from what was read when the file was sound: served for damaged ones too.
    app.get(S + "/metadata", callback=lambda study: metadata(rt, stored(rt, study,
                                                                        sound=False)))
    app.get(S + SE + "/metadata", callback=lambda study, series: metadata(
        rt, stored(rt, study, series, sound=False)))
    app.get(S + SE + I + "/metadata", callback=lambda study, series, sop: metadata(
        rt, stored(rt, study, series, sop, sound=False)))
    app.get(S + SE + I + "/bulkdata/<path:path>", callback=lambda study, series, sop, path:
            bulkdata(rt, stored(rt, study, series, sop)[0], path))
