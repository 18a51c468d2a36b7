"""The viewer's pixel batches, a pacsd extension under /dicom-web: the frames of many instances
of one series in one answer.

    GET /dicom-web/studies/{study}/series/{series}/pixels?instances=UID,UID,...
    Accept: multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1

WADO-RS names frames of one instance per request (PS3.18 10.4.1.1.5), so a 1,000-slice CT costs
1,000 requests; a series retrieve (10.4.1.1.1) sends whole files the browser would have to parse.
This answers with native little endian frames, as the frames resource does, for up to
MAX_INSTANCES instances: one part per frame, in the order named, each part carrying its
Content-Location (.../instances/{uid}/frames/{n}, as 8.7.3.5 has it for frames) and its
Content-Length, so the client cuts the body without scanning it. Little endian native files are
cut from one read of the file without pydicom (pacsd.imaging.frames.native_frames_fast), the
rest as the frames resource cuts or decodes them.

Bounded: at most MAX_INSTANCES named (400 beyond), at most MAX_BYTES and BATCH_SECONDS per
answer. An answer may hold fewer instances than named: those unknown, unreadable, or left when
a bound was reached. The client asks again for what it still lacks (an instance that never
comes, through the frames resource, which says why).
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import bottle
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacsd import query
from pacsd.errors import PacsError
from pacsd.imaging import frames as cut
from pacsd.imaging.header import is_valid_uid, read_file_header
from pacsd.web import multipart, visibility
from pacsd.web.dicomweb_common import check_uids
from pacsd.web.runtime import Runtime
from pacsd.web.wado_rs import instance_url

log = logging.getLogger(__name__)

MAX_INSTANCES = 200          # instances one request may name
MAX_BYTES = 256 << 20        # pixel bytes one answer holds (beyond: the rest is asked again)
BATCH_SECONDS = 5.0          # no further instance is started after this long
PART_TYPE = "application/octet-stream"
PART_CTYPE = f"{PART_TYPE}; transfer-syntax={ExplicitVRLittleEndian}"


class BatchRefused(PacsError):
    """A batch request that cannot be answered as asked (logged once by the web app)."""

    http_status = 400


def _named(text: str) -> list[str]:
    uids = list(dict.fromkeys(u.strip() for u in text.replace("%2C", ",").split(",")
                              if u.strip()))
    if not uids:
        raise BatchRefused("name the instances: ?instances=UID,UID,...")
    if len(uids) > MAX_INSTANCES:
        raise BatchRefused(f"{len(uids)} instances named; at most {MAX_INSTANCES} per request")
    bad = next((u for u in uids if not is_valid_uid(u)), None)
    if bad is not None:
        raise BatchRefused(f"{bad[:80]!r} is not a valid UID")
    return uids


def _accepts_native() -> None:
    """Only native little endian frames are made here (what the viewer windows itself)."""
    for r in multipart.parse_accept(bottle.request.get_header("Accept")):
        if r.matches(PART_TYPE) and r.transfer_syntax in (None, ExplicitVRLittleEndian):
            return
    raise bottle.HTTPError(406, f'pixel batches are sent as multipart/related; '
                                f'type="{PART_TYPE}"; transfer-syntax={ExplicitVRLittleEndian}')


def _frames(rt: Runtime, inst: query.StoredInstance) -> list[bytes]:
    path = rt.archive.store.placed(inst.path)
    ts = inst.transfer_syntax_uid
    fast = cut.native_frames_fast(path, ts)
    if fast is not None:
        return fast
    # Everything else as the frames resource does it: frame count from the header first.
    n = int(read_file_header(path).get("NumberOfFrames") or 1)
    return list(cut.read_frames(path, ts, list(range(1, n + 1)), decode=UID(ts).is_compressed))


def pixels(rt: Runtime, study: str, series: str) -> Iterator[bytes]:
    check_uids(study, series)
    uids = _named(bottle.request.query.get("instances") or "")
    _accepts_native()
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series,
            "SOPInstanceUID": "\\".join(uids)}
    with rt.archive.index.reading():
        found = {i.sop_instance_uid: i for i in query.instances(query.Request("IMAGE", keys,
                                                             scope=visibility.scope()))}
    insts = [found[u] for u in uids if u in found]
    if not insts:
        raise bottle.HTTPError(404, "none of the instances named is in this series")
    boundary = multipart.new_boundary()
    bottle.response.content_type = multipart.content_type(PART_TYPE, boundary)
    started = time.monotonic()

    def parts() -> Iterator[tuple[str, list[bytes]]]:
        sent = 0
        for k, inst in enumerate(insts):
            if k and (sent >= MAX_BYTES or time.monotonic() - started > BATCH_SECONDS):
                log.info("pixel batch of series %s ends after %d of %d instances (bounds); "
                         "the client asks again for the rest", series, k, len(insts))
                return
            try:
                frames = _frames(rt, inst)
            except (OSError, PacsError, ValueError) as e:
                # Headers are gone: this instance is left out; the client's own request for
                # it (the frames resource) gets the error as an answer.
                log.warning("pixel batch: instance %s left out: %s", inst.sop_instance_uid, e)
                continue
            where = instance_url(inst) + "/frames/"
            for n, data in enumerate(frames, 1):
                sent += len(data)
                yield (f"Content-Type: {PART_CTYPE}\r\nContent-Location: {where}{n}\r\n"
                       f"Content-Length: {len(data)}", [data])

    return multipart.stream(parts(), boundary)


def add_routes(app: bottle.Bottle, rt: Runtime) -> None:
    app.get("/studies/<study>/series/<series>/pixels",
            callback=lambda study, series: pixels(rt, study, series))
