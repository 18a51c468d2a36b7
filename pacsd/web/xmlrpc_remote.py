"""The XML-RPC methods that move images between pacsd and other nodes, as OsiriX/Horos does them
(Horos, Horos/Sources/XMLRPCMethods.mm):

* `CMove {accessionNumber, server}`: a pull. The node named `server` is C-FINDed for the
  accession number and each study found is C-MOVEd from it into pacsd. Like Horos (which hands
  it to its QueryController), the call answers "0" once the node is known and the work runs in
  the background; "-1" for an unknown node.
* `Retrieve {serverName, filterKey..filterKey9, filterValue.., retrieveMode}`: the C-FIND runs
  during the call ("-2" unknown node, "-3" nothing matches, as Horos), the retrieve in the
  background. retrieveMode as Horos's enum (DCMNetServiceDelegate.h): 0 C-MOVE, 1 C-GET,
  2 WADO: each object by WADO-URI from the node's `wado_url` (pacsd.nodes.wado_uri, as Horos's
  WADORetrieve:); a node without one is asked with C-MOVE (said in the log), as Horos does for
  any mode it does not take from the call (it uses the node's own mode).
* `DownloadURL {URL, Display}`: imports one DICOM file from a configured node's HTTP server
  (pacsd.nodes.download). Horos fetches anything; pacsd refuses other hosts ("-2"), redirects,
  oversized and non-DICOM bodies. Answers "0" once started, as Horos does.
* `SendStudy {accessionNumber | studyInstanceUID, server}`: pacsd's own (not in OsiriX): what
  pacsd's CMove did before issue 18, a push of stored studies to a node, answered when done.

Background work runs on the runtime's job pool (pacsd.web.jobs: two threads), at most
`MAX_QUEUED` waiting; each job logs one line when it ends (Jobs logs the failures).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from pydicom.datadict import tag_for_keyword

from pacsd import query
from pacsd.config import Node
from pacsd.errors import PacsError
from pacsd.nodes import download, get, remote, wado_uri
from pacsd.web import visibility
from pacsd.web.jobs import Job
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

CMOVE, CGET, WADO = 0, 1, 2     # Horos's retrieve modes (DCMNetServiceDelegate.h)
MODE_NAMES = {CMOVE: "C-MOVE", CGET: "C-GET", WADO: "WADO"}
MAX_QUEUED = 20                 # XML-RPC jobs waiting for a thread; beyond: "-1", busy
DOWNLOAD_TIMEOUT = 60.0         # seconds for one DownloadURL (or WADO retrieve) fetch, all of it


class BadParams(Exception):
    """Missing or malformed parameters: OsiriX answers HTTP 400 (ReturnWithCode(400))."""


def ok(**values: Any) -> dict[str, Any]:
    return {"error": "0", **values}


def err(code: int, message: str, **values: Any) -> dict[str, Any]:
    return {"error": str(code), "message": message, **values}


def param(p: dict[str, Any], *names: str) -> str:
    """The first non-empty parameter among `names`, as a string (OsiriX accepts both cases)."""
    for name in names:
        value = p.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def retrieve_mode(p: dict[str, Any]) -> int:
    """Horos: `[[paramDict objectForKey:@"retrieveMode"] integerValue]`; only C-GET and WADO
    override the node's mode (C-MOVE for every pacsd node); anything else is C-MOVE."""
    raw = str(p.get("retrieveMode", "") or "").strip()
    try:
        mode = int(raw) if raw else CMOVE
    except ValueError:
        mode = CMOVE   # integerValue of a non-number is 0
    return mode if mode in (CGET, WADO) else CMOVE


class RemoteMethods:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.cfg

    def _start(self, title: str, work: Callable[[Job], str]) -> dict[str, Any]:
        queued = sum(1 for j in self.rt.jobs.recent() if j.kind == "xmlrpc"
                     and j.state == "queued")
        if queued >= MAX_QUEUED:
            log.warning("XML-RPC %s refused: %d jobs already waiting", title, queued)
            return err(-1, f"busy: {queued} retrieves already waiting; try again later")
        job = self.rt.jobs.start("xmlrpc", title, work)
        return ok(job=job.id)

    # --- CMove: pull a study by accession number -----------------------------------------

    def cmove(self, p: dict[str, Any]) -> dict[str, Any]:
        accession = param(p, "accessionNumber")
        server = param(p, "server")
        if not accession or not server:
            raise BadParams("give 'accessionNumber' and 'server' (a node's name)")
        node = self.rt.accounts.node(server)
        if node is None:
            log.info("XML-RPC CMove: unknown node %r", server)
            return err(-1, f"unknown node {server!r}: add it to [[nodes]]")

        def work(job: Job) -> str:
            studies = self._find_studies(node, {"AccessionNumber": accession})
            if not studies:
                raise RuntimeError(f"{node.aet} has no study with that accession number")
            return self._pull(job, "CMove", node, studies, CMOVE)
        return self._start(f"XML-RPC CMove from {node.name} ({node.aet})", work)

    # --- Retrieve: C-FIND now, retrieve in the background --------------------------------

    def retrieve(self, p: dict[str, Any]) -> dict[str, Any]:
        server = param(p, "serverName")
        if not server:
            raise BadParams("'serverName' is missing")
        filters: dict[str, str] = {}
        for i in range(1, 10):
            suffix = "" if i == 1 else str(i)
            key, value = param(p, "filterKey" + suffix), param(p, "filterValue" + suffix)
            if key and value:
                if tag_for_keyword(key) is None or key == "QueryRetrieveLevel":
                    raise BadParams(f"filterKey{suffix} {key!r} is not a DICOM keyword")
                filters[key] = value
        if not filters:
            raise BadParams("give 'filterKey' and 'filterValue' (e.g. PatientID and its value)")
        mode = retrieve_mode(p)
        node = self.rt.accounts.node(server)
        if node is None:
            log.info("XML-RPC Retrieve: unknown node %r", server)
            return err(-2, f"unknown node {server!r}: add it to [[nodes]]")
        try:
            studies = self._find_studies(node, filters)
        except (remote.RemoteError, ValueError) as e:
            log.warning("XML-RPC Retrieve: C-FIND on %s failed: %s", node.aet, e)
            return err(-1, str(e))
        if not studies:
            log.info("XML-RPC Retrieve: %s has no study matching", node.aet)
            return err(-3, f"{node.aet} has no study matching")
        if mode == WADO and not node.wado_url:
            log.info("XML-RPC Retrieve: WADO retrieve is not available (node %s has no "
                     "wado_url); %s is asked with C-MOVE", node.name, node.aet)
        return self._start(f"XML-RPC Retrieve from {node.name} ({node.aet})",
                           lambda job: self._pull(job, "Retrieve", node, studies, mode))

    def _find_studies(self, node: Node, keys: dict[str, str]) -> list[str]:
        matches = remote.find(self.cfg, node, "STUDY", {"StudyInstanceUID": "", **keys})
        return [s for s in dict.fromkeys(m.get("StudyInstanceUID", "") for m in matches) if s]

    def _pull(self, job: Job, method: str, node: Node, studies: list[str], mode: int) -> str:
        note = ""
        if mode == WADO and node.wado_url:
            done, failed = wado_uri.wado_here(
                self.cfg, node, studies, self.rt.archive, self.cfg.http_download_max_mb << 20,
                DOWNLOAD_TIMEOUT, progress=job.progress)
            used = WADO
        elif mode == CGET:
            done = failed = 0
            for uid in studies:
                counts = get.get_here(self.cfg, node, {"StudyInstanceUID": uid},
                                      self.rt.archive)
                done += counts["stored"]
                failed += counts["failed"] + counts["refused"]
                job.progress(done, failed, None)
            used = CGET
        else:
            done, failed = remote.move_studies(self.cfg, node, studies, progress=job.progress)
            used = CMOVE
            if mode == WADO:
                note = " (WADO asked; the node has no wado_url)"
        message = (f"{len(studies)} study(ies) by {MODE_NAMES[used]}: {done} image(s) "
                   f"received, {failed} failed{note}")
        job.progress(done, failed, done + failed)
        log.info("XML-RPC %s from %s: %s", method, node.aet, message)
        return message

    # --- DownloadURL ---------------------------------------------------------------------

    def download_url(self, p: dict[str, Any]) -> dict[str, Any]:
        url = param(p, "URL")
        if not url:
            raise BadParams("'URL' is missing")
        nodes = [n for n, _ in self.rt.accounts.snapshot().nodes]
        try:
            parts = download.check_url(url, nodes)
        except download.DownloadRefused as e:
            # The URL itself is not logged: it may carry patient identifiers (WADO UIDs).
            log.warning("XML-RPC DownloadURL refused: %s", e)
            if isinstance(e, download.NotANodeHost):
                return err(-2, f"refused: {e}")
            raise BadParams(f"refused: {e}") from None
        max_bytes = self.cfg.http_download_max_mb << 20
        incoming = Path(self.cfg.data) / "incoming"

        def work(job: Job) -> str:
            incoming.mkdir(parents=True, exist_ok=True)
            try:
                path = download.fetch(parts, incoming, max_bytes, DOWNLOAD_TIMEOUT)
            except download.DownloadRefused as e:
                job.failed = 1
                raise RuntimeError(f"refused: {e}") from None
            try:
                stored = self.rt.archive.put_file(path)
            except PacsError as e:
                job.failed = 1
                raise RuntimeError(f"not stored: {e}") from None
            finally:
                path.unlink(missing_ok=True)
            job.progress(1, 0, 1)
            log.info("XML-RPC DownloadURL from %s: 1 image stored", parts.hostname)
            log.debug("DownloadURL stored %s", stored.sop_instance_uid)
            return "1 image stored"
        return self._start(f"XML-RPC DownloadURL from {parts.hostname}", work)

    # --- SendStudy: pacsd's push (what CMove did before) ---------------------------------

    def send_study(self, p: dict[str, Any]) -> dict[str, Any]:
        accession = param(p, "accessionNumber", "AccessionNumber")
        study_uid = param(p, "studyInstanceUID", "StudyInstanceUID")
        server = param(p, "server")
        if not (accession or study_uid) or not server:
            raise BadParams("give 'server' and 'accessionNumber' or 'studyInstanceUID'")
        node = self.rt.accounts.node(server)
        if node is None:
            return err(-1, f"unknown node {server!r}: add it to [[nodes]]")
        keys = {"AccessionNumber": accession} if accession else {}
        if study_uid:
            keys["StudyInstanceUID"] = study_uid
        with self.rt.archive.index.reading():
            studies = [m["StudyInstanceUID"] for m in query.find(
                query.Request("STUDY", keys, scope=visibility.scope()), ["StudyInstanceUID"])]
            instances = query.instances(query.Request(
                "STUDY", {"StudyInstanceUID": "\\".join(studies)})) if studies else []
        if not instances:
            return err(-3, "no stored image matches", completed=0, failed=0)
        try:
            completed, failed = remote.send(self.cfg, node, instances, self.rt.archive.store)
        except remote.RemoteError as e:
            return err(-2, str(e), completed=0, failed=len(instances))
        log.info("XML-RPC SendStudy: %d study(ies) to %s: %d sent, %d failed", len(studies),
                 node.aet, completed, failed)
        if failed:
            return err(-4, f"{failed} of {len(instances)} image(s) could not be sent",
                       completed=completed, failed=failed)
        return ok(completed=completed, failed=0)

