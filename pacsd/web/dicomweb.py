"""DICOMweb (PS3.18): QIDO-RS search, WADO-RS retrieve, STOW-RS store, under /dicom-web.

QIDO-RS goes through pacsd.query, the matching C-FIND uses, and answers from the index alone.
WADO-RS streams the stored files as they are (multipart/related, one part per file, read in
chunks); metadata comes from each file's header, never its pixels; frames are cut from the file
(and decoded only when a client asks for native frames of a compressed instance).
STOW-RS reads the body part by part and stores each instance with Archive.put, the one durable
path, so an instance is acknowledged only once its file and its index row are on disk.
"""

from __future__ import annotations

import io
import json
import os
import logging
import re
import struct
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl

import bottle
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacsd import query
from pacsd.imaging import bounds
from pacsd.errors import PacsError
from pacsd.imaging.header import is_valid_uid, read_file_header, read_full, read_header
from pacsd.web import multipart, stow
from pacsd.web.guard import client_of

log = logging.getLogger(__name__)

MOUNT = "/dicom-web"
DICOM_JSON = "application/dicom+json"
MAX_RESULTS = 10_000      # per QIDO-RS response; more are had with offset (PS3.18 8.3.4.4)
THUMBNAIL_SIZE = 128

# PS3.18 Tables 10.6.3-3 / -4 / -5: what each level returns by default (of what the index has).
STUDY_KEYS = ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances"]
INSTANCE_KEYS = ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                 "NumberOfFrames"]
LEVEL_KEYS = {"STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": INSTANCE_KEYS}
_NOT_MATCHING = {"limit", "offset", "includefield", "fuzzymatching"}
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_PIXEL_DATA = 0x7FE00010

# PS3.18 Table 8.7.3-5 (and 8.7.4): the media type of a frame in each compressed syntax.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def _fail(status: int, message: str) -> bottle.HTTPError:
    return bottle.HTTPError(status, message)


def _base_url() -> str:
    """This app's root as the client sees it (the mount point is in SCRIPT_NAME)."""
    parts = bottle.request.urlparts
    return f"{parts.scheme}://{parts.netloc}{bottle.request.script_name.rstrip('/')}"


def _url(study: str, series: str | None = None, sop: str | None = None) -> str:
    url = f"{_base_url()}/studies/{study}"
    if series:
        url += f"/series/{series}"
    if sop:
        url += f"/instances/{sop}"
    return url


def _check_uids(*uids: str | None) -> None:
    for uid in uids:
        if uid is not None and not is_valid_uid(uid):
            raise _fail(400, f"{uid[:80]!r} is not a valid UID")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# --- QIDO-RS (PS3.18 10.6) --------------------------------------------------------------------

def _keyword(name: str) -> str:
    """A keyword from a query parameter naming an attribute by keyword or by tag (ggggeeee)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
    elif "." in name:
        raise _fail(400, f"{name!r}: attributes inside sequences cannot be matched here")
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword:
        raise _fail(400, f"{name!r} is not a DICOM attribute keyword or tag")
    return keyword


def _int_param(params: list[tuple[str, str]], name: str) -> int | None:
    values = [v for k, v in params if k == name]
    if not values:
        return None
    try:
        n = int(values[-1])
    except ValueError:
        raise _fail(400, f"{name} must be an integer, not {values[-1]!r}") from None
    if n < 0:
        raise _fail(400, f"{name} must not be negative")
    return n


def _requested(keywords: list[str]) -> list[DataElement]:
    elems = []
    for kw in dict.fromkeys(keywords):
        tag = tag_for_keyword(kw)
        if tag is not None:
            elems.append(DataElement(tag, dictionary_VR(tag).split(" ")[0], None))
    return elems


def search(rt: Any, level: str, scope: dict[str, str]) -> Any:
    """One QIDO-RS search at `level` ("STUDY", "SERIES", "IMAGE") within `scope` (UIDs from
    the path); the query parameters come from the request."""
    _check_uids(*scope.values())
    if not any(r.matches(DICOM_JSON) or r.matches("application/json")
               for r in multipart.parse_accept(bottle.request.get_header("Accept"))):
        raise _fail(406, "search results are available as application/dicom+json only")
    params = parse_qsl(bottle.request.environ.get("QUERY_STRING", ""), keep_blank_values=True)
    depth = query.LEVELS.index(level)
    keys: dict[str, list[str]] = {}
    include: list[str] = []
    warnings = []
    for name, value in params:
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include += [k for k, key in query.KEYS.items()
                                if query.LEVELS.index(key.level) <= depth]
                elif item:
                    include.append(_keyword(item))
        elif name == "fuzzymatching":
            if value.strip().lower() == "true":
                warnings.append("The fuzzymatching parameter is not supported. Only literal "
                                "matching has been performed.")
        elif name not in _NOT_MATCHING:
            kw = _keyword(name)
            if kw not in query.KEYS:
                warnings.append(f"{kw} is not supported as a matching key; it was ignored.")
                continue
            if query.LEVELS.index(query.KEYS[kw].level) > depth:
                warnings.append(f"{kw} is below the {level.lower()} level; it was ignored.")
                continue
            if query.KEYS[kw].kind in (query.UID, query.MODALITIES):
                value = value.replace(",", "\\")   # PS3.18 8.3.4.1: a list, comma-separated
            keys.setdefault(kw, []).append(value)
    limit = _int_param(params, "limit")
    offset = _int_param(params, "offset") or 0
    cap = MAX_RESULTS if limit is None else min(limit, MAX_RESULTS)
    matching = {k: "\\".join(v) for k, v in keys.items()}
    matching.update(scope)
    # Defaults of the level and of the levels the path does not fix (PS3.18 10.6.3.3).
    defaults = list(LEVEL_KEYS[level])
    if level in ("SERIES", "IMAGE") and "StudyInstanceUID" not in scope:
        defaults = STUDY_KEYS + defaults
    if level == "IMAGE" and "SeriesInstanceUID" not in scope:
        defaults = SERIES_KEYS + defaults
    wanted = [k for k in dict.fromkeys(defaults + list(scope) + list(keys) + include)
              if k in query.KEYS and query.LEVELS.index(query.KEYS[k].level) <= depth]
    returned = [k for k in wanted if k != "SpecificCharacterSet"]
    # The UIDs that make up each result's RetrieveURL.
    uids = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"][:depth]
    if rt.hooks is not None and rt.hooks.has("on_query"):
        env = bottle.request.environ
        verdict = rt.hooks.decide("on_query", {
            "source": "QIDO-RS", "user": getattr(env.get("pacsd.user"), "name", ""),
            "peer_address": client_of(env), "level": level,
            "keys": dict(matching)})
        if verdict.refused:
            log.warning("QIDO-RS from %s refused by plugin %s: %s", client_of(env),
                        ", ".join(verdict.by), verdict.reason)
            raise _fail(403, f"refused: {verdict.reason}")
        if isinstance(verdict.value, dict) and isinstance(verdict.value.get("keys"), dict):
            matching = {str(k): str(v) for k, v in verdict.value["keys"].items()}
    req = query.Request(level, matching, limit=cap + (limit is None or limit > cap), offset=offset)
    try:
        with rt.archive.index.reading():
            matches = list(query.find(req, list(dict.fromkeys(returned + uids))))
    except query.QueryError as e:
        raise _fail(400, str(e)) from None
    if len(matches) > cap:
        matches = matches[:cap]
        warnings.append("There are additional results that can be requested.")
    elems = _requested(returned)
    results = []
    for m in matches:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"   # what JSON carries: Unicode
        query.fill_dataset(ds, elems, m)
        ds.add_new(0x00080056, "CS", "ONLINE")   # Instance Availability
        ds.add_new(0x00081190, "UR", _url(*(m.get(u) or "" for u in uids)))
        results.append(ds.to_json_dict(suppress_invalid_tags=True))
    for text in warnings:
        bottle.response.add_header("Warning", f'299 pacsd: "{text}"')
    if not results:
        bottle.response.status = 204   # PS3.18 10.6.3.1: zero results
        return ""
    bottle.response.content_type = DICOM_JSON
    return _dumps(results)


# --- WADO-RS (PS3.18 10.4) --------------------------------------------------------------------

def _stored(rt: Any, study: str, series: str | None = None, sop: str | None = None
            ) -> list[query.StoredInstance]:
    _check_uids(study, series, sop)
    keys = {"StudyInstanceUID": study}
    level = "STUDY"
    if series:
        keys["SeriesInstanceUID"], level = series, "SERIES"
    if sop:
        keys["SOPInstanceUID"], level = sop, "IMAGE"
    with rt.archive.index.reading():
        insts = query.instances(query.Request(level, keys))
    if not insts:
        raise _fail(404, f"no such {level.lower().replace('image', 'instance')}")
    return insts


def _wanted_syntaxes() -> set[str] | None:
    """Transfer syntaxes acceptable for application/dicom parts (None: any, as stored)."""
    ranges = [r for r in multipart.parse_accept(bottle.request.get_header("Accept"))
              if r.matches("application/dicom")]
    if not ranges:
        raise _fail(406, 'instances are sent as multipart/related; type="application/dicom"')
    syntaxes = set()
    for r in ranges:
        ts = r.transfer_syntax
        if ts is None or ts == "*":
            # We send what was stored: pacsd never transcodes on retrieve (see README).
            return None
        syntaxes.add(ts)
    return syntaxes


def retrieve(rt: Any, insts: list[query.StoredInstance]) -> Iterator[bytes]:
    """The stored files, unchanged, as one multipart/related body, streamed."""
    syntaxes = _wanted_syntaxes()
    if syntaxes is not None:
        other = {i.transfer_syntax_uid for i in insts} - syntaxes
        if other:
            raise _fail(406, f"stored in {', '.join(sorted(other))}; pacsd does not transcode "
                        "(ask with transfer-syntax=*)")
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type("application/dicom", boundary)
    store = rt.archive.store
    heads = [f"Content-Type: application/dicom; transfer-syntax={i.transfer_syntax_uid}"
             for i in insts]
    try:
        sizes = [os.stat(store.path(i.path)).st_size for i in insts]
    except OSError as e:
        log.error("WADO-RS: a stored file cannot be read: %s", e)
        raise _fail(500, "a stored file cannot be read; see the server log") from None
    # A known length: no chunked encoding, each file goes out in one write, unchanged.
    bottle.response.content_length = multipart.stream_length(heads, sizes, boundary)

    def parts() -> Iterator[tuple[str, Iterator[bytes]]]:
        for inst, head, size in zip(insts, heads, sizes, strict=True):
            path = store.path(inst.path)
            try:
                f = open(path, "rb", buffering=0)
            except OSError as e:
                # Headers are gone already: end the body short; the client sees fewer bytes
                # than the Content-Length and knows the retrieve is incomplete.
                log.error("WADO-RS: stored file %s of %s cannot be read: %s", inst.path,
                          inst.sop_instance_uid, e)
                raise
            with f:
                # One read per file up to 4 MiB (no buffer in between), bounded for big ones.
                yield head, multipart.file_chunks(f, min(max(size, 1), 4 << 20))

    return multipart.stream(parts(), boundary)


def _without_bulk(ds: Dataset, threshold: int = 1024) -> None:
    """Drop binary elements longer than `threshold` (not read from disk), at any depth."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = raw.VR
        if vr is None:   # implicit VR, not yet converted
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr.split(" ")[0] in _BULK_VRS:
            length = getattr(raw, "length", None)
            if length is None:
                value = raw.value
                length = len(value) if isinstance(value, (bytes, bytearray)) else 0
            if length > threshold:
                del ds[tag]
        elif vr == "SQ":
            for item in ds[tag].value or []:
                _without_bulk(item, threshold)


def instance_metadata(path: Path, inst: query.StoredInstance) -> dict[str, Any]:
    """A stored file's data set as DICOM JSON (PS3.18 F.2), without its bulk data."""
    ds = read_file_header(path, defer_size=1024)   # a deflated one: inflated that far only
    _without_bulk(ds)
    ds.add_new(0x00083002, "UI", inst.transfer_syntax_uid)   # Available Transfer Syntax UID
    return ds.to_json_dict(suppress_invalid_tags=True)


def metadata(rt: Any, insts: list[query.StoredInstance]) -> Iterator[str]:
    if not any(r.matches(DICOM_JSON) or r.matches("application/json")
               for r in multipart.parse_accept(bottle.request.get_header("Accept"))):
        raise _fail(406, "metadata is available as application/dicom+json only")
    bottle.response.content_type = DICOM_JSON
    store = rt.archive.store

    def body() -> Iterator[str]:
        sep = "["
        for inst in insts:
            try:
                item = instance_metadata(store.path(inst.path), inst)
            except (OSError, InvalidDicomError, ValueError, EOFError, PacsError) as e:
                log.error("WADO-RS metadata: stored file %s of %s cannot be read: %s",
                          inst.path, inst.sop_instance_uid, e)
                continue
            yield sep + _dumps(item)
            sep = ","
        yield "[]" if sep == "[" else "]"
    return body()


# --- frames (PS3.18 10.4.1.1.5 / 8.7.3.3.2) ---------------------------------------------------

def _frame_type(ts: str) -> tuple[str, str, bool]:
    """(multipart type, part Content-Type, decode?) for frames stored in `ts`, by the Accept
    header. Compressed frames are sent as stored, unless the client names octet-stream with
    transfer-syntax=1.2.840.10008.1.2.1 explicitly: then they are decoded to native little
    endian pixels (PS3.18 8.7.3.3.2 lets the origin server transcode; `*` keeps the bitstream)."""
    uid = UID(ts)
    native = not uid.is_compressed   # uncompressed and deflated: sent as Explicit VR LE
    media = "application/octet-stream" if native else FRAME_MEDIA.get(ts)
    out_ts = ExplicitVRLittleEndian if native else ts
    for r in multipart.parse_accept(bottle.request.get_header("Accept")):
        want = r.transfer_syntax
        if media is not None and r.matches(media) and want in (None, "*", out_ts):
            return media, f"{media}; transfer-syntax={out_ts}", False
        if r.part_type == "application/octet-stream":
            if media is not None and want in ("*", out_ts):
                return r.part_type, f"application/octet-stream; transfer-syntax={out_ts}", False
            if not native and want == ExplicitVRLittleEndian:
                return (r.part_type, f"application/octet-stream; transfer-syntax={want}",
                        True)
    if media is None:
        raise _fail(406, f"frames of transfer syntax {ts} cannot be retrieved as stored (ask "
                    f'for type="application/octet-stream"; '
                    f"transfer-syntax={ExplicitVRLittleEndian} to have them decoded)")
    raise _fail(406, f"frames are stored as {media} (transfer syntax {ts}); pacsd decodes them "
                f'only for type="application/octet-stream"; '
                f"transfer-syntax={ExplicitVRLittleEndian}")


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.replace("%2C", ",").split(",") if n.strip()]
    except ValueError:
        raise _fail(400, f"{text!r} is not a list of frame numbers") from None
    if not numbers or min(numbers) < 1:
        raise _fail(400, "frame numbers start at 1")
    return numbers


def read_frames(path: Path, ts: str, numbers: list[int], decode: bool = False
                ) -> Iterator[bytes]:
    """The bytes of each frame: for native pixel data a slice (little endian), for
    encapsulated pixel data the frame's fragments as stored, or with `decode` the frame
    decoded to native little endian pixels (pacsd.imaging.render.decode_frame). Only those bytes are
    read."""
    uid = UID(ts)
    if decode and uid.is_compressed:
        from pacsd.imaging.render import decode_frame   # lazily: decoders load only when asked
        ds = read_file_header(path)
        bounds.check_pixels(ds)   # (decode_frame checks again, with each frame's bitstream)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        bad = [n for n in numbers if n > n_frames]
        if bad:
            raise _fail(404, f"frame {bad[0]} does not exist: the instance has {n_frames}")
        for n in numbers:
            yield decode_frame(path, n).tobytes()
        return
    with open(path, "rb") as f:
        ds = read_header(f, defer_size=None)   # leaves f at the Pixel Data element
        # Frames are read into memory (native) or decoded: the same budget as a decode.
        bounds.check_pixels(ds)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        bad = [n for n in numbers if n > n_frames]
        if bad:
            raise _fail(404, f"frame {bad[0]} does not exist: the instance has {n_frames}")
        if uid.is_deflated:   # no seeking inside a deflated stream: read it whole (rare)
            full = read_full(path)
            pixels, offset, length = io.BytesIO(full.PixelData), 0, len(full.PixelData)
            f = pixels  # type: ignore[assignment]
            little = True
        else:
            header = f.read(8 if uid.is_implicit_VR else 12)
            little = uid.is_little_endian
            fmt = "<" if little else ">"
            if len(header) < 8 or struct.unpack(fmt + "HH", header[:4]) != (0x7FE0, 0x0010):
                raise _fail(404, "the instance has no Pixel Data")
            length = struct.unpack(fmt + "I", header[-4:])[0]
            offset = f.tell()
        if uid.is_compressed:
            ext = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            for n in numbers:
                f.seek(offset)
                yield get_frame(f, n - 1, number_of_frames=n_frames, extended_offsets=ext)
            return
        bits = int(ds.get("BitsAllocated") or 8)
        samples = int(ds.get("SamplesPerPixel") or 1)
        pixels_per_frame = int(ds.Rows) * int(ds.Columns) * samples
        if (pixels_per_frame * bits) % 8:
            raise _fail(406, "frames of bit-packed pixel data that do not end on a byte "
                        "boundary cannot be retrieved")
        size = pixels_per_frame * bits // 8
        for n in numbers:
            f.seek(offset + (n - 1) * size)
            data = f.read(size)
            if len(data) < size or (n * size > length):
                raise _fail(404, f"frame {n} lies beyond the stored Pixel Data")
            if not little and bits in (16, 32):
                import numpy as np
                data = np.frombuffer(data, f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
            yield data


def frames(rt: Any, inst: query.StoredInstance, numbers_text: str) -> Iterator[bytes]:
    numbers = _frame_numbers(numbers_text)
    part_type, part_ctype, decode = _frame_type(inst.transfer_syntax_uid)
    path = rt.archive.store.path(inst.path)
    chunks = read_frames(path, inst.transfer_syntax_uid, numbers, decode)
    first = next(chunks)   # errors (no such frame, no pixels) become answers, not cut bodies
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type(part_type, boundary)

    def all_frames() -> Iterator[bytes]:
        yield first
        yield from chunks
    return multipart.stream(((f"Content-Type: {part_ctype}", [data])
                             for data in all_frames()), boundary)


# --- rendered and thumbnail (PS3.18 10.4.1.1.3, 10.4.1.1.4) ------------------------------------

def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _fail(400, f"{name} must be numbers separated by commas") from None


def rendered(rt: Any, inst: query.StoredInstance, frame: int = 1,
             thumbnail: bool = False) -> bytes:
    from pacsd.imaging.render import render   # lazily: decoding libraries load only when asked
    q = bottle.request.query
    accept = q.get("accept") or bottle.request.get_header("Accept") or "image/jpeg"
    fmt = None
    for r in multipart.parse_accept(accept):
        if r.matches("image/jpeg"):
            fmt = "jpeg"
        elif r.matches("image/png"):
            fmt = "png"
        if fmt:
            break
    if fmt is None:
        raise _fail(406, "rendered images are available as image/jpeg or image/png")
    window = None
    if q.get("window"):
        w = _floats(q.get("window"), "window")
        if len(w) < 2:
            raise _fail(400, "window is center,width[,function]")
        window = (w[0], w[1])
    rows = columns = THUMBNAIL_SIZE if thumbnail else None
    if q.get("viewport"):
        v = _floats(q.get("viewport"), "viewport")
        if len(v) < 2 or min(v[:2]) < 1:
            raise _fail(400, "viewport is width,height")
        columns, rows = int(v[0]), int(v[1])
    quality = 90
    if q.get("quality"):
        try:
            quality = max(1, min(100, int(q.get("quality"))))
        except ValueError:
            raise _fail(400, "quality must be an integer 1..100") from None
    image = render(rt.archive.store.path(inst.path), frame=frame, rows=rows, columns=columns,
                   window=window, fmt=fmt, quality=quality)
    bottle.response.content_type = f"image/{fmt}"
    return image


def _middle(insts: list[query.StoredInstance]) -> query.StoredInstance:
    return insts[len(insts) // 2]


# --- the app ----------------------------------------------------------------------------------

def make_app(rt: Any) -> bottle.Bottle:
    from pacsd.web import new_app
    app = new_app()
    S, SE, I = "/studies/<study>", "/series/<series>", "/instances/<sop>"   # noqa: E741

    # QIDO-RS
    app.get("/studies", callback=lambda: search(rt, "STUDY", {}))
    app.get("/series", callback=lambda: search(rt, "SERIES", {}))
    app.get("/instances", callback=lambda: search(rt, "IMAGE", {}))
    app.get(S + "/series", callback=lambda study: search(
        rt, "SERIES", {"StudyInstanceUID": study}))
    app.get(S + "/instances", callback=lambda study: search(
        rt, "IMAGE", {"StudyInstanceUID": study}))
    app.get(S + SE + "/instances", callback=lambda study, series: search(
        rt, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series}))

    # WADO-RS
    app.get(S, callback=lambda study: retrieve(rt, _stored(rt, study)))
    app.get(S + SE, callback=lambda study, series: retrieve(rt, _stored(rt, study, series)))
    app.get(S + SE + I, callback=lambda study, series, sop: retrieve(
        rt, _stored(rt, study, series, sop)))
    app.get(S + "/metadata", callback=lambda study: metadata(rt, _stored(rt, study)))
    app.get(S + SE + "/metadata", callback=lambda study, series: metadata(
        rt, _stored(rt, study, series)))
    app.get(S + SE + I + "/metadata", callback=lambda study, series, sop: metadata(
        rt, _stored(rt, study, series, sop)))
    app.get(S + SE + I + "/frames/<numbers>", callback=lambda study, series, sop, numbers:
            frames(rt, _stored(rt, study, series, sop)[0], numbers))
    app.get(S + SE + I + "/rendered", callback=lambda study, series, sop: rendered(
        rt, _stored(rt, study, series, sop)[0]))
    app.get(S + SE + I + "/frames/<frame:int>/rendered", callback=lambda study, series, sop,
            frame: rendered(rt, _stored(rt, study, series, sop)[0], frame))
    app.get(S + SE + I + "/thumbnail", callback=lambda study, series, sop: rendered(
        rt, _stored(rt, study, series, sop)[0], thumbnail=True))
    app.get(S + SE + I + "/frames/<frame:int>/thumbnail", callback=lambda study, series, sop,
            frame: rendered(rt, _stored(rt, study, series, sop)[0], frame, thumbnail=True))
    app.get(S + SE + "/thumbnail", callback=lambda study, series: rendered(
        rt, _middle(_stored(rt, study, series)), thumbnail=True))
    app.get(S + "/thumbnail", callback=lambda study: rendered(
        rt, _middle(_stored(rt, study)), thumbnail=True))

    # STOW-RS
    app.post("/studies", callback=lambda: stow.stow(rt, None, _url))
    app.post(S, callback=lambda study: stow.stow(rt, study, _url))
    return app
