"""WADO-RS (PS3.18 10.4): instances, frames, rendered images and thumbnails, under /dicom-web
(metadata and bulk data: wado_metadata.py).

Instances are streamed as stored (multipart/related, one part per file, read in chunks);
frames are cut from the file by pacsd.imaging.frames (and decoded only when a client asks for
native frames of a compressed instance); rendered images are pacsd.imaging.render's.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import bottle
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacsd import query
from pacsd.imaging import frames as cut
from pacsd.web import multipart, visibility
from pacsd.web.dicomweb_common import check_uids, fail, url
from pacsd.web.runtime import Runtime
from pacsd.web.guard import client_of

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 128

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


def instance_url(inst: query.StoredInstance) -> str:
    return url(inst.study_instance_uid, inst.series_instance_uid, inst.sop_instance_uid)


# --- instances (PS3.18 10.4.1.1.1) ---------------------------------------------------------

def stored(rt: Runtime, study: str, series: str | None = None, sop: str | None = None,
           sound: bool = True) -> list[query.StoredInstance]:
    """The stored instances a URL names; with `sound`, those whose file is to be sent: one
    found damaged (pacsd.storage.integrity) is left out, with a Warning header, and if none
    is left the answer is 500."""
    insts = _named_instances(rt, study, series, sop)
    bad = [i.sop_instance_uid for i in insts if i.damaged] if sound else []
    if not bad:
        return insts
    log.warning("WADO-RS from %s: %d instance(s) not sent, their stored files were found "
                "damaged: %s", client_of(bottle.request.environ), len(bad), ", ".join(bad[:3]))
    good = [i for i in insts if not i.damaged]
    if not good:
        raise fail(500, f"the stored file of {bad[0]} was found damaged (missing or changed "
                        "since it was stored): it is not sent (see `pacsd verify`)")
    bottle.response.set_header("Warning", f'299 pacsd "{len(bad)} instance(s) left out: '
                                          'their stored files were found damaged"')
    return good


def _named_instances(rt: Runtime, study: str, series: str | None, sop: str | None
                     ) -> list[query.StoredInstance]:
    check_uids(study, series, sop)
    keys = {"StudyInstanceUID": study}
    level = "STUDY"
    if series:
        keys["SeriesInstanceUID"], level = series, "SERIES"
    if sop:
        keys["SOPInstanceUID"], level = sop, "IMAGE"
    with rt.archive.index.reading():
        insts = query.instances(query.Request(level, keys, scope=visibility.scope()))
    if not insts:
        raise fail(404, f"no such {level.lower().replace('image', 'instance')}")
    return insts


def _wanted_syntaxes() -> set[str] | None:
    """Transfer syntaxes acceptable for application/dicom parts (None: any, as stored)."""
    ranges = [r for r in multipart.parse_accept(bottle.request.get_header("Accept"))
              if r.matches("application/dicom")]
    if not ranges:
        raise fail(406, 'instances are sent as multipart/related; type="application/dicom"')
    syntaxes = set()
    for r in ranges:
        ts = r.transfer_syntax
        if ts is None or ts == "*":
            # We send what was stored: pacsd never transcodes on retrieve (see the manual, web.md).
            return None
        syntaxes.add(ts)
    return syntaxes


def retrieve(rt: Runtime, insts: list[query.StoredInstance]) -> Iterator[bytes]:
    """The stored files, unchanged, as one multipart/related body, streamed."""
    syntaxes = _wanted_syntaxes()
    if syntaxes is not None:
        other = {i.transfer_syntax_uid for i in insts} - syntaxes
        if other:
            raise fail(406, f"stored in {', '.join(sorted(other))}; pacsd does not transcode "
                        "(ask with transfer-syntax=*)")
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type("application/dicom", boundary)
    store = rt.archive.store
    # Each part says which instance it is (PS3.18 8.7.3.5, 10.4.1.2: Content-Location).
    heads = [f"Content-Type: application/dicom; transfer-syntax={i.transfer_syntax_uid}\r\n"
             f"Content-Location: {instance_url(i)}" for i in insts]
    try:
        sizes = [os.stat(store.placed(i.path)).st_size for i in insts]
    except OSError as e:
        log.error("WADO-RS: a stored file cannot be read: %s", e)
        raise fail(500, "a stored file cannot be read; see the server log") from None
    # A known length: no chunked encoding, each file goes out in one write, unchanged.
    bottle.response.content_length = multipart.stream_length(heads, sizes, boundary)

    def parts() -> Iterator[tuple[str, Iterator[bytes]]]:
        for inst, head, size in zip(insts, heads, sizes, strict=True):
            path = store.placed(inst.path)
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


# --- frames (PS3.18 10.4.1.1.5 / 8.7.3.3.2) ---------------------------------------------------

def frame_type(ts: str) -> tuple[str, str, bool]:
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
        raise fail(406, f"frames of transfer syntax {ts} cannot be retrieved as stored (ask "
                    f'for type="application/octet-stream"; '
                    f"transfer-syntax={ExplicitVRLittleEndian} to have them decoded)")
    raise fail(406, f"frames are stored as {media} (transfer syntax {ts}); pacsd decodes them "
                f'only for type="application/octet-stream"; '
                f"transfer-syntax={ExplicitVRLittleEndian}")


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.replace("%2C", ",").split(",") if n.strip()]
    except ValueError:
        raise fail(400, f"{text!r} is not a list of frame numbers") from None
    if not numbers or min(numbers) < 1:
        raise fail(400, "frame numbers start at 1")
    return numbers


def answered(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The frames, with what makes them unavailable as the HTTP error it carries (raised as
    bottle's, as it always was: a refusal the client caused, not logged as our warning)."""
    try:
        yield from chunks
    except (cut.NoSuchFrame, cut.FramesUnavailable) as e:
        raise fail(e.http_status, str(e)) from None


def frames(rt: Runtime, inst: query.StoredInstance, numbers_text: str) -> Iterator[bytes]:
    numbers = _frame_numbers(numbers_text)
    part_type, part_ctype, decode = frame_type(inst.transfer_syntax_uid)
    path = rt.archive.store.placed(inst.path)
    chunks = answered(cut.read_frames(path, inst.transfer_syntax_uid, numbers, decode))
    first = next(chunks)   # errors (no such frame, no pixels) become answers, not cut bodies
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type(part_type, boundary)
    where = instance_url(inst) + "/frames/"

    def all_frames() -> Iterator[bytes]:
        yield first
        yield from chunks
    return multipart.stream(
        ((f"Content-Type: {part_ctype}\r\nContent-Location: {where}{n}", [data])
         for n, data in zip(numbers, all_frames())), boundary)


# --- rendered and thumbnail (PS3.18 10.4.1.1.3, 10.4.1.1.4) ------------------------------------

def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise fail(400, f"{name} must be numbers separated by commas") from None


def rendered(rt: Runtime, inst: query.StoredInstance, frame: int = 1,
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
        raise fail(406, "rendered images are available as image/jpeg or image/png")
    window = None
    if q.get("window"):
        w = _floats(q.get("window"), "window")
        if len(w) < 2:
            raise fail(400, "window is center,width[,function]")
        window = (w[0], w[1])
    rows = columns = THUMBNAIL_SIZE if thumbnail else None
    if q.get("viewport"):
        v = _floats(q.get("viewport"), "viewport")
        if len(v) < 2 or min(v[:2]) < 1:
            raise fail(400, "viewport is width,height")
        columns, rows = int(v[0]), int(v[1])
    quality = 90
    if q.get("quality"):
        try:
            quality = max(1, min(100, int(q.get("quality"))))
        except ValueError:
            raise fail(400, "quality must be an integer 1..100") from None
    image = render(rt.archive.store.placed(inst.path), frame=frame, rows=rows, columns=columns,
                   window=window, fmt=fmt, quality=quality)
    bottle.response.content_type = f"image/{fmt}"
    return image


def _middle(insts: list[query.StoredInstance]) -> query.StoredInstance:
    return insts[len(insts) // 2]


# --- the routes -------------------------------------------------------------------------------

def add_routes(app: bottle.Bottle, rt: Runtime) -> None:
    """WADO-RS's resources (PS3.18 10.4.1), on the DICOMweb app."""
    S, SE, I = "/studies/<study>", "/series/<series>", "/instances/<sop>"   # noqa: E741
    app.get(S, callback=lambda study: retrieve(rt, stored(rt, study)))
    app.get(S + SE, callback=lambda study, series: retrieve(rt, stored(rt, study, series)))
    app.get(S + SE + I, callback=lambda study, series, sop: retrieve(
        rt, stored(rt, study, series, sop)))
    app.get(S + SE + I + "/frames/<numbers>", callback=lambda study, series, sop, numbers:
            frames(rt, stored(rt, study, series, sop)[0], numbers))
    app.get(S + SE + I + "/rendered", callback=lambda study, series, sop: rendered(
        rt, stored(rt, study, series, sop)[0]))
    app.get(S + SE + I + "/frames/<frame:int>/rendered", callback=lambda study, series, sop,
            frame: rendered(rt, stored(rt, study, series, sop)[0], frame))
    app.get(S + SE + I + "/thumbnail", callback=lambda study, series, sop: rendered(
        rt, stored(rt, study, series, sop)[0], thumbnail=True))
    app.get(S + SE + I + "/frames/<frame:int>/thumbnail", callback=lambda study, series, sop,
            frame: rendered(rt, stored(rt, study, series, sop)[0], frame, thumbnail=True))
    app.get(S + SE + "/thumbnail", callback=lambda study, series: rendered(
        rt, _middle(stored(rt, study, series)), thumbnail=True))
    app.get(S + "/thumbnail", callback=lambda study: rendered(
        rt, _middle(stored(rt, study)), thumbnail=True))
