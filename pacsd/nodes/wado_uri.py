"""WADO-URI as a client: fetch a node's studies object by object from its `wado_url`, for
XML-RPC `Retrieve` with retrieveMode 2 (OsiriX's WADORetrieveMode).

As Horos does it (DCMTKQueryNode.mm, WADORetrieve:): a C-FIND down to the IMAGE level, then one
`GET wado_url?requestType=WADO&studyUID=&seriesUID=&objectUID=&contentType=application/dicom`
per object (WADO-URI, PS3.18 chapter 9). Unlike Horos, the query walks the levels (PS3.4 C.4.1.2.1: a
hierarchical query names one unique key per level above the one asked), and every GET goes
through pacsd.nodes.download.fetch, DownloadURL's bounded fetch: the node's own host only, no
redirects, a size cap, a time bound, a DICOM Part 10 body. Each file goes to `Archive.put_file`,
as DownloadURL's does.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from pacsd.config import Config, Node
from pacsd.errors import PacsError
from pacsd.imaging.header import is_valid_uid
from pacsd.nodes import download, remote
from pacsd.storage.archive import Archive

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 5   # a node whose WADO server is down is not asked for every object
Progress = Callable[[int, int, "int | None"], None]


def object_urls(cfg: Config, node: Node, study: str) -> list[str]:
    """The WADO-URI of each object of `study` on `node`, from C-FINDs at SERIES then IMAGE
    level; objects whose UIDs are not UIDs are left out."""
    urls: list[str] = []
    series = remote.find(cfg, node, "SERIES", {"StudyInstanceUID": study,
                                               "SeriesInstanceUID": ""})
    for uid in dict.fromkeys(s.get("SeriesInstanceUID", "") for s in series):
        if not is_valid_uid(uid):
            continue
        images = remote.find(cfg, node, "IMAGE", {"StudyInstanceUID": study,
                                                  "SeriesInstanceUID": uid,
                                                  "SOPInstanceUID": ""})
        for sop in dict.fromkeys(i.get("SOPInstanceUID", "") for i in images):
            if is_valid_uid(sop):
                urls.append(node.wado_url + "?" + urllib.parse.urlencode({
                    "requestType": "WADO", "studyUID": study, "seriesUID": uid,
                    "objectUID": sop, "contentType": "application/dicom"}))
    return urls


def wado_here(cfg: Config, node: Node, studies: list[str], archive: Archive, max_bytes: int,
              timeout: float, progress: Progress | None = None) -> tuple[int, int]:
    """Fetch every object of `studies` from `node` by WADO-URI into `archive`: (stored,
    failed). Each GET is bounded by `max_bytes` and `timeout` seconds; after
    MAX_FAILURES_IN_A_ROW failed GETs in a row the rest count as failed."""
    if not node.wado_url:
        raise ValueError(f"node {node.name!r} has no wado_url")
    incoming = Path(cfg.data) / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    urls = [u for study in studies for u in object_urls(cfg, node, study)]
    done = failed = in_a_row = 0
    for n, url in enumerate(urls):
        if in_a_row >= MAX_FAILURES_IN_A_ROW:
            failed += len(urls) - n
            log.warning("WADO retrieve from %s: %d failures in a row; %d object(s) not asked",
                        node.aet, in_a_row, len(urls) - n)
            break
        try:
            # check_url again: the node's host, whatever the C-FIND answered.
            path = download.fetch(download.check_url(url, [node]), incoming, max_bytes, timeout)
            try:
                archive.put_file(path)
            finally:
                path.unlink(missing_ok=True)
            done, in_a_row = done + 1, 0
        except PacsError as e:   # DownloadRefused, or what the archive refused
            failed, in_a_row = failed + 1, in_a_row + 1
            log.debug("WADO retrieve from %s: %s: %s", node.aet, url, e)
            if failed == 1:
                log.warning("WADO retrieve from %s: an object failed: %s", node.aet, e)
        if progress is not None:
            progress(done, failed, len(urls))
    return done, failed
