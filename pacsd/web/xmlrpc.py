"""OsiriX / Horos compatible XML-RPC, served at `/RPC2` and at `/` (where OsiriX listens).

Each method takes one struct and answers a struct whose "error" is "0" on success and an
OsiriX-style code otherwise (with a "message" saying why):

    400   bad or missing parameters, or a request the predicate parser cannot read
    403   the caller is not an administrator (Delete, CMove, Retrieve)
    -1    nothing matches (DBWindowFind, DisplayStudy, DisplaySeries), an unknown node (CMove),
          or the remote node failed (Retrieve)
    -2    an unknown node (Retrieve; OsiriX's code), or the node could not be reached (CMove)
    -3    the node (Retrieve) or this archive (CMove) has nothing matching
    -4    some images could not be sent or retrieved (the counts say how many)

Bodies are parsed with defusedxml's expat parser, DTDs forbidden (so no entity expansion and
no external entity is ever read), and only up to MAX_BODY bytes. A body that is not XML-RPC
gets a fault (-32700 parse error, -32601 no such method: the de-facto fault codes of
xmlrpc-epi, also used by Python's SimpleXMLRPCServer).
"""

from __future__ import annotations

import logging
import xmlrpc.client
from typing import Any, Callable
from xml.parsers.expat import ExpatError

import bottle
from defusedxml import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser, defused_gzip_decode
from pydicom.datadict import tag_for_keyword

from pacsd import query
from pacsd.nodes import remote
from pacsd.query import predicate
from pacsd.web import osirix
from pacsd.web.app import new_app
from pacsd.web.auth import is_admin
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20        # bytes; a method call is a few hundred
MAX_ELEMENTS = 50_000     # elements in one answer ("count" still says how many matched)
PARSE_ERROR, INVALID_REQUEST, NO_METHOD, INTERNAL_ERROR = -32700, -32600, -32601, -32603


def loads(data: bytes) -> tuple[tuple[Any, ...], str | None]:
    """xmlrpc.client.loads with defusedxml's parser: no DTD, no entities, no external
    references. Raises xmlrpc.client.Fault for anything that is not a method call."""
    unmarshaller = xmlrpc.client.Unmarshaller()
    parser = DefusedExpatParser(unmarshaller, forbid_dtd=True)
    try:
        parser.feed(data)
        parser.close()
        return unmarshaller.close(), unmarshaller.getmethodname()
    except DefusedXmlException as e:
        raise xmlrpc.client.Fault(PARSE_ERROR, f"refused: {type(e).__name__} (DTDs and entities "
                                               "are not accepted)") from None
    except (ExpatError, xmlrpc.client.ResponseError, ValueError, TypeError, KeyError,
            IndexError) as e:
        raise xmlrpc.client.Fault(PARSE_ERROR, f"not an XML-RPC method call: {e}") from None


def _read_body() -> bytes:
    env = bottle.request.environ
    try:
        length = int(env.get("CONTENT_LENGTH") or -1)
    except ValueError:
        raise bottle.HTTPError(400, "bad Content-Length") from None
    if length > MAX_BODY:
        raise bottle.HTTPError(413, f"XML-RPC bodies are limited to {MAX_BODY} bytes")
    stream = env["wsgi.input"]
    limit = length if length >= 0 else MAX_BODY + 1
    chunks, got = [], 0
    while got < limit:
        chunk = stream.read(min(1 << 16, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > MAX_BODY:
        raise bottle.HTTPError(413, f"XML-RPC bodies are limited to {MAX_BODY} bytes")
    data = b"".join(chunks)
    if env.get("HTTP_CONTENT_ENCODING", "").strip().lower() == "gzip":
        try:
            data = defused_gzip_decode(data, limit=MAX_BODY)
        except ValueError:
            raise bottle.HTTPError(413, "gzip body too large or invalid") from None
        except OSError:
            raise bottle.HTTPError(400, "invalid gzip body") from None
    return data


def ok(**values: Any) -> dict[str, Any]:
    return {"error": "0", **values}


def err(code: int, message: str, **values: Any) -> dict[str, Any]:
    return {"error": str(code), "message": message, **values}


def _param(p: dict[str, Any], *names: str) -> str:
    """The first non-empty parameter among `names`, as a string (OsiriX accepts both cases)."""
    for name in names:
        value = p.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


class Methods:
    """The XML-RPC methods; each takes the call's struct and returns the answer struct."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.cfg
        self.table: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "ping": self.ping, "dbwindowfind": self.find_object,
            "findobject": self.find_object, "displaystudy": self.display_study,
            "displayseries": self.display_series, "cmove": self.cmove,
            "retrieve": self.retrieve,
        }

    def admin(self) -> bool:
        return is_admin(bottle.request.environ)

    # --- Ping -------------------------------------------------------------------------------

    def ping(self, p: dict[str, Any]) -> dict[str, Any]:
        """What the watchdog calls: cheap, touches nothing."""
        return ok()

    # --- DBWindowFind / FindObject ----------------------------------------------------------

    def find_object(self, p: dict[str, Any]) -> dict[str, Any]:
        request, table = p.get("request"), p.get("table")
        execute = str(p.get("execute") or "Select").strip().capitalize()
        if not isinstance(request, str) or not request.strip():
            return err(400, "'request' (a predicate such as \"patientID == 'X'\") is missing")
        if table not in predicate.TABLES:
            return err(400, f"'table' must be one of {', '.join(predicate.TABLES)}")
        if execute not in ("Select", "Open", "Nothing", "Delete"):
            return err(400, "'execute' must be Select, Open, Nothing or Delete")
        if execute == "Delete" and not self.admin():
            return err(403, "Delete needs an administrator")
        try:
            cond = predicate.parse(table, request)
        except predicate.PredicateError as e:
            return err(e.http_status, f"request: {e}")
        found = predicate.find(table, cond, MAX_ELEMENTS, uids=execute == "Delete")
        count, uids = found.count, found.uids
        elements = [osirix.ELEMENT[table](r) for r in found.rows]
        if not count:
            return err(-1, "nothing matches", elements=[], count=0)
        answer = ok(elements=elements, count=count)
        if count > MAX_ELEMENTS:
            answer["truncated"] = "1"
        if execute == "Delete":
            answer["deleted"] = self.rt.archive.delete(predicate.LEVEL[table], uids)
            log.warning("XML-RPC DBWindowFind Delete from %s: %d %s(s), %d image(s)",
                        client_of(bottle.request.environ), count, table.lower(), answer["deleted"])
        return answer

    # --- DisplayStudy / DisplaySeries (headless: answer what OsiriX would open) -------------

    def _display(self, table: str, p: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """The rows whose columns hold exactly the values given; each parameter is named by
        its DICOM keyword, or by it with a lower-case initial."""
        keys = {}
        for keyword in names:
            value = _param(p, keyword, keyword[0].lower() + keyword[1:])
            if value:
                keys[keyword] = value
        if not keys:
            return err(400, "give at least one of the identifying parameters")
        rows = predicate.first_rows(table, predicate.exact(keys), MAX_ELEMENTS)
        elements = [osirix.ELEMENT[table](r) for r in rows]
        if not elements:
            return err(-1, "nothing matches", elements=[])
        return ok(elements=elements)

    def display_study(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._display("Study", p, ("PatientID", "StudyInstanceUID", "AccessionNumber",
                                          "StudyID"))

    def display_series(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._display("Series", p, ("PatientID", "StudyInstanceUID",
                                           "SeriesInstanceUID"))

    # --- CMove: send a stored study to a configured node ------------------------------------

    def cmove(self, p: dict[str, Any]) -> dict[str, Any]:
        accession = _param(p, "accessionNumber", "AccessionNumber")
        study_uid = _param(p, "studyInstanceUID", "StudyInstanceUID")
        server = _param(p, "server")
        if not (accession or study_uid) or not server:
            return err(400, "give 'server' and 'accessionNumber' or 'studyInstanceUID'")
        if not self.admin():
            return err(403, "CMove needs an administrator")
        node = self.rt.accounts.node(server)
        if node is None:
            return err(-1, f"unknown node {server!r}: add it to [[nodes]]")
        keys = {"AccessionNumber": accession} if accession else {}
        if study_uid:
            keys["StudyInstanceUID"] = study_uid
        with self.rt.archive.index.reading():
            studies = [m["StudyInstanceUID"] for m in query.find(
                query.Request("STUDY", keys), ["StudyInstanceUID"])]
            instances = query.instances(query.Request(
                "STUDY", {"StudyInstanceUID": "\\".join(studies)})) if studies else []
        if not instances:
            return err(-3, "no stored image matches", completed=0, failed=0)
        try:
            completed, failed = remote.send(self.cfg, node, instances, self.rt.archive.store)
        except remote.RemoteError as e:
            return err(-2, str(e), completed=0, failed=len(instances))
        log.info("XML-RPC CMove: %d study(ies) to %s: %d sent, %d failed", len(studies),
                 node.aet, completed, failed)
        if failed:
            return err(-4, f"{failed} of {len(instances)} image(s) could not be sent",
                       completed=completed, failed=failed)
        return ok(completed=completed, failed=0)

    # --- Retrieve: C-FIND a node, then C-MOVE what it has to us -----------------------------

    def retrieve(self, p: dict[str, Any]) -> dict[str, Any]:
        server = _param(p, "serverName")
        if not server:
            return err(400, "'serverName' is missing")
        filters: dict[str, str] = {}
        for i in range(1, 10):
            suffix = "" if i == 1 else str(i)
            key, value = _param(p, "filterKey" + suffix), _param(p, "filterValue" + suffix)
            if key and value:
                if tag_for_keyword(key) is None or key == "QueryRetrieveLevel":
                    return err(400, f"filterKey{suffix} {key!r} is not a DICOM keyword")
                filters[key] = value
        if not filters:
            return err(400, "give 'filterKey' and 'filterValue' (e.g. PatientID and its value)")
        if not self.admin():
            return err(403, "Retrieve needs an administrator")
        node = self.rt.accounts.node(server)
        if node is None:
            return err(-2, f"unknown node {server!r}: add it to [[nodes]]")
        try:
            matches = remote.find(self.cfg, node, "STUDY", {"StudyInstanceUID": "", **filters})
            studies = list(dict.fromkeys(m.get("StudyInstanceUID", "") for m in matches))
            studies = [s for s in studies if s]
            if not studies:
                return err(-3, f"{node.aet} has no study matching", studies=0)
            completed, failed = remote.move_studies(self.cfg, node, studies)
        except remote.RemoteError as e:
            return err(-1, str(e))
        log.info("XML-RPC Retrieve from %s: %d study(ies), %d image(s), %d failed", node.aet,
                 len(studies), completed, failed)
        if failed:
            return err(-4, f"{failed} image(s) could not be retrieved", studies=len(studies),
                       completed=completed, failed=failed)
        return ok(studies=len(studies), completed=completed, failed=0)

    # --- dispatch ---------------------------------------------------------------------------

    def call(self, method: str | None, params: tuple[Any, ...]) -> dict[str, Any]:
        handler = self.table.get((method or "").lower())
        if handler is None:
            raise xmlrpc.client.Fault(NO_METHOD, f"no method {method!r}; known: Ping, "
                                                 "DBWindowFind (FindObject), DisplayStudy, "
                                                 "DisplaySeries, CMove, Retrieve")
        if params and not isinstance(params[0], dict):
            return err(400, f"{method} takes one struct parameter")
        return handler(dict(params[0]) if params else {})


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    methods = Methods(rt)

    def rpc() -> bytes:
        data = _read_body()
        method = None
        try:
            params, method = loads(data)
            answer: Any = (methods.call(method, params),)
            body = xmlrpc.client.dumps(answer, methodresponse=True, allow_none=False)
        except xmlrpc.client.Fault as fault:
            log.info("XML-RPC %s from %s: fault %s: %s", method, client_of(bottle.request.environ),
                     fault.faultCode, fault.faultString)
            body = xmlrpc.client.dumps(fault, methodresponse=True)
        except Exception as e:  # noqa: BLE001 - the caller gets a fault, the log the details
            log.exception("XML-RPC %s failed", method)
            body = xmlrpc.client.dumps(xmlrpc.client.Fault(INTERNAL_ERROR, f"{method}: {e}"),
                                       methodresponse=True)
        bottle.response.content_type = "text/xml; charset=utf-8"
        return body.encode("utf-8")

    app.route("/RPC2", "POST", rpc)
    app.route("/", "POST", rpc)
    return app
