"""OsiriX / Horos compatible XML-RPC, served at `/RPC2` and at `/` (where OsiriX listens).

The methods are Horos's (Horos/Sources/XMLRPCMethods.mm, `selectorStringForXMLRPCRequestMethodName:`
lower-cases the name, so names are case-insensitive), plus pacsd's `Ping` and `SendStudy`. Each
takes one struct and answers a struct whose "error" is "0" on success; every value is a string,
as OsiriX's (its answers are built with `[NSString stringWithFormat:@"%d", code]`).

Missing or malformed parameters answer HTTP 400, as OsiriX's `ReturnWithCode(400)` does (N2XMLRPC-
Connection writes the error's code as the HTTP status); the body here still holds
`{error: "400", message}` for clients that read it. Other codes are in the struct, with a
"message" saying why:

    403   the caller is not an administrator (Delete, CMove, Retrieve, DownloadURL, SendStudy)
    -1    nothing matches (DBWindowFind, DisplayStudy, DisplaySeries), an unknown node (CMove),
          the node's C-FIND failed (Retrieve), too many retrieves waiting
    -2    an unknown node (Retrieve; OsiriX's code), a URL host that is no node's
          (DownloadURL), the node could not be reached (SendStudy)
    -3    the node (Retrieve) or this archive (SendStudy) has nothing matching
    -4    some images could not be sent (SendStudy)

The methods that only drive OsiriX's windows (Horos's GUI methods) answer "0" and do nothing:
pacsd has no screen, and old scripts must not break.

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

from pacsd.query import predicate
from pacsd.web import osirix, visibility
from pacsd.web.app import new_app
from pacsd.web.auth import is_admin
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime
from pacsd.web.xmlrpc_remote import BadParams, RemoteMethods, err, ok, param

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



def _gui(*required: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A Horos method that only acts on OsiriX's windows: its required parameters are checked
    as Horos checks them (400 when empty), then "0"."""
    def method(p: dict[str, Any]) -> dict[str, Any]:
        for name in required:
            if not param(p, name):
                raise BadParams(f"'{name}' is missing")
        return ok()
    return method


class Methods:
    """The XML-RPC methods; each takes the call's struct and returns the answer struct."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.cfg
        moves = RemoteMethods(rt)
        admin = self.admin_only
        # Horos's table (selectorStringForXMLRPCRequestMethodName:), lower-cased names.
        self.table: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "killosirix": self.kill_osirix,
            "downloadurl": admin("DownloadURL", moves.download_url),
            "displaystudy": self.display_study, "displayseries": self.display_series,
            "dbwindowfind": self.find_object, "findobject": self.find_object,
            "switchtodefaultdbifneeded": _gui(), "selectdefaultdatabase": _gui(),
            "opendb": _gui("path"), "opendatabase": _gui("path"),
            "selectalbum": _gui("name"), "closeallwindows": _gui(),
            "getdisplayed2dviewerseries": lambda p: ok(elements=[]),
            "getdisplayed2dviewerstudies": lambda p: ok(elements=[]),
            "close2dviewerwithseriesuid": _gui("uid"),
            "close2dviewerwithstudyuid": _gui("uid"),
            "retrieve": admin("Retrieve", moves.retrieve),
            "cmove": admin("CMove", moves.cmove),
            "displaystudylistbypatientname": _gui("PatientName"),
            "displaystudylistbypatientid": _gui("PatientID"),
            "pathtofrontdcm": lambda p: ok(currentDCMPath=""),
            # pacsd's own
            "ping": self.ping, "sendstudy": admin("SendStudy", moves.send_study),
        }

    def admin_only(self, name: str, method: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def checked(p: dict[str, Any]) -> dict[str, Any]:
            if not self.admin():
                return err(403, f"{name} needs an administrator")
            return method(p)
        return checked

    def admin(self) -> bool:
        return is_admin(bottle.request.environ)

    # --- Ping, KillOsiriX ---------------------------------------------------------------------

    def ping(self, p: dict[str, Any]) -> dict[str, Any]:
        """What the watchdog calls: cheap, touches nothing."""
        return ok()

    def kill_osirix(self, p: dict[str, Any]) -> dict[str, Any]:
        """OsiriX quits; pacsd does not let a network call stop it (its service manager and
        `pacsd stop` do that): answered "0", logged."""
        log.warning("XML-RPC KillOsiriX from %s ignored: stop pacsd with its service manager",
                    client_of(bottle.request.environ))
        return ok()

    # --- DBWindowFind / FindObject ----------------------------------------------------------

    def find_object(self, p: dict[str, Any]) -> dict[str, Any]:
        request, table = p.get("request"), p.get("table")
        execute = str(p.get("execute") or "Select").strip().capitalize()
        if not isinstance(request, str) or not request.strip():
            raise BadParams("'request' (a predicate such as \"patientID == 'X'\") is missing")
        if table not in predicate.TABLES:
            raise BadParams(f"'table' must be one of {', '.join(predicate.TABLES)}")
        if execute not in ("Select", "Open", "Nothing", "Delete"):
            raise BadParams("'execute' must be Select, Open, Nothing or Delete")
        if execute == "Delete" and not self.admin():
            return err(403, "Delete needs an administrator")
        try:
            cond = predicate.parse(table, request)
        except predicate.PredicateError as e:
            if e.http_status == 400:
                raise BadParams(f"request: {e}") from None
            return err(e.http_status, f"request: {e}")
        cond = predicate.within(cond, visibility.scope())
        found = predicate.find(table, cond, MAX_ELEMENTS, uids=execute == "Delete")
        count, uids = found.count, found.uids
        elements = [osirix.ELEMENT[table](r) for r in found.rows]
        if not count:
            return err(-1, "nothing matches", elements=[], count=0)
        answer = ok(elements=elements, count=count)
        if count > MAX_ELEMENTS:
            answer["truncated"] = "1"
        if execute == "Delete":
            user = bottle.request.environ.get("pacsd.user")
            answer["deleted"] = self.rt.archive.delete(
                predicate.LEVEL[table], uids,
                who=f"XML-RPC from {client_of(bottle.request.environ)}"
                    + (f" ({user.name})" if user else ""))
            log.warning("XML-RPC DBWindowFind Delete from %s: %d %s(s), %d image(s)",
                        client_of(bottle.request.environ), count, table.lower(), answer["deleted"])
        return answer

    # --- DisplayStudy / DisplaySeries (headless: answer what OsiriX would open) -------------

    def _display(self, table: str, p: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        """The rows whose columns hold exactly the values given; each parameter is named by
        its DICOM keyword, or by it with a lower-case initial."""
        keys = {}
        for keyword in names:
            value = param(p, keyword, keyword[0].lower() + keyword[1:])
            if value:
                keys[keyword] = value
        if not keys:
            raise BadParams("give at least one of the identifying parameters")
        rows = predicate.first_rows(table, predicate.within(predicate.exact(keys),
                                                            visibility.scope()), MAX_ELEMENTS)
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

    # --- dispatch ---------------------------------------------------------------------------

    def call(self, method: str | None, params: tuple[Any, ...]) -> dict[str, Any]:
        handler = self.table.get((method or "").strip().lower())
        if handler is None:
            raise xmlrpc.client.Fault(NO_METHOD, f"no method {method!r}; see the manual's "
                                                 "Compatibility page for the list")
        if params and not isinstance(params[0], dict):
            raise BadParams(f"{method} takes one struct parameter")
        return handler(dict(params[0]) if params else {})


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    methods = Methods(rt)

    def rpc() -> bytes:
        data = _read_body()
        method = None
        try:
            params, method = loads(data)
            try:
                answer: Any = (methods.call(method, params),)
            except BadParams as e:
                # OsiriX: HTTP 400 (ReturnWithCode(400)); the struct in the body for those who
                # read it.
                log.info("XML-RPC %s from %s: 400: %s", method,
                         client_of(bottle.request.environ), e)
                bottle.response.status = 400
                answer = (err(400, str(e)),)
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
