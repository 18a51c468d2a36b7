"""The web side's audit trail: a WSGI middleware, inside Auth, that turns each request into an
audit record (pacsd.audit) by its route, with the outcome from the response's status; and the
admin's search of the trail, GET /api/audit.

Which request is which action:
  login, logout          POST /app/login (the name from the body; failures too), /app/logout;
                         HTTP Basic: Auth reports each fresh check (`basic_login`)
  query                  QIDO-RS searches, the study list (/api/studies), the Worklist
                         (/api/worklist), XML-RPC finds
  view                   WADO-URI, WADO-RS (studies, metadata, frames, rendered, thumbnails,
                         the viewer's pixel batches), a study's summary, an instance's tags:
                         one record per user, address and study every VIEW_WINDOW_S, not one
                         per frame (a viewer asks hundreds)
  download               the ZIP of a study or series
  send                   a study or series sent to a node; XML-RPC SendStudy / CMove
  store                  STOW-RS (the studies and count noted by stow.py)
  delete, restore, correction, undo, empty-bin   the admin routes of those names
  import                 a retrieve from a node (admin page, XML-RPC Retrieve / DownloadURL)
  schedule, schedule-change   a Worklist item added; changed, cancelled or its status set
Outcome: 2xx/3xx ok, 4xx refused, 5xx (or an exception) failed. Patients are looked up (one
indexed query) only before a change (deletions, corrections); for the rest the audit writer
fills them in off the request's path.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

import bottle

from pacsd.audit import ACTIONS, AuditRecord, Auditor, Search, folder_of, search, when
from pacsd.web.api import fail
from pacsd.web.app import new_app
from pacsd.web.auth import is_admin
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime

VIEW_WINDOW_S = 300.0
BODY_MAX = 64 << 10     # bodies read for the record (login, admin JSON, XML-RPC): small ones
UID = r"([0-9.]{1,64})"
_METHOD = re.compile(rb"<methodName>\s*([A-Za-z0-9_.]{1,64})\s*</methodName>")
_DELETE = re.compile(rb"<name>\s*execute\s*</name>\s*<value>\s*(?:<string>)?\s*delete\b", re.I)
# XML-RPC methods -> actions; those not named (Ping, the GUI no-ops) are not audited.
XMLRPC = {"dbwindowfind": "query", "findobject": "query", "displaystudy": "query",
          "displayseries": "query", "retrieve": "import", "downloadurl": "import",
          "cmove": "send", "sendstudy": "send"}
# (method, path pattern) -> (action, what the UID names). Checked in order, first match wins.
ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [(m, re.compile(f"(?:{p})\\Z"), a, k) for
    m, p, a, k in [
        ("POST", r"/app/login", "login", ""),
        ("POST", r"/app/logout", "logout", ""),
        ("GET", r"/dicom-web/(?:studies|series|instances)", "query", ""),
        ("GET", rf"/dicom-web/studies/{UID}/(?:series|instances)", "query", "study"),
        ("GET", rf"/dicom-web/studies/{UID}/series/[0-9.]+/instances", "query", "study"),
        ("GET", rf"/dicom-web/studies/{UID}(?:/.*)?", "view", "study"),
        ("POST", r"/dicom-web/studies(?:/[0-9.]+)?", "store", ""),
        ("POST", r"/api/upload", "store", ""),
        ("GET", rf"/api/studies/{UID}/weasis(?:\.xml)?", "view", "study"),
        ("GET", rf"/api/studies/{UID}/deidentify", "view", "study"),
        ("GET", r"/wado", "view", ""),
        ("GET", r"/api/studies", "query", ""),
        ("GET", rf"/api/studies/{UID}", "view", "study"),
        ("GET", rf"/api/studies/{UID}/zip", "download", "study"),
        ("GET", rf"/api/series/{UID}/zip", "download", "series"),
        ("GET", rf"/api/instances/{UID}/tags", "view", "instance"),
        ("POST", rf"/api/studies/{UID}/send", "send", "study"),
        ("POST", rf"/api/series/{UID}/send", "send", "series"),
        ("DELETE", rf"/api/studies/{UID}", "delete", "study"),
        ("DELETE", rf"/api/series/{UID}", "delete", "series"),
        ("POST", r"/api/trash/restore", "restore", ""),
        ("POST", r"/api/trash/empty", "empty-bin", ""),
        ("POST", r"/api/patients/([^/]{1,64})/update", "correction", "patient"),
        ("POST", r"/api/patients/merge", "correction", ""),
        ("POST", rf"/api/studies/{UID}/(?:update|move)", "correction", "study"),
        ("POST", rf"/api/series/{UID}/move", "correction", "series"),
        ("POST", r"/api/undo", "undo", ""),
        ("POST", r"/api/nodes/([^/]{1,64})/retrieve", "import", "node"),
        # Share links (pacsd.web.share): opening one is a log-in as its holder (who then
        # appears as "share link HASH" in the records of what they view and download).
        ("GET", r"/share/([^/]{1,200})", "login", "share"),
        ("POST", r"/share/([^/]{1,200})", "login", "share"),
        ("POST", rf"/api/studies/{UID}/share", "share", "study"),
        ("POST", r"/api/shares/([^/]{1,64})/revoke", "share", "link"),
        ("POST", rf"/api/studies/{UID}/labels", "labels", "study"),
        ("GET", r"/api/audit", "audit", ""),
        # The Worklist page and its API (pacsd.web.worklist): each route notes the patient.
        ("GET", r"/api/worklist", "query", ""),
        ("POST", r"/api/worklist", "schedule", ""),
        ("PUT", r"/api/worklist/([0-9]{1,18})", "schedule-change", "step"),
        ("PATCH", r"/api/worklist/([0-9]{1,18})", "schedule-change", "step"),
        ("POST", r"/api/worklist/([0-9]{1,18})/(?:cancel|status)", "schedule-change", "step"),
        ("GET", rf"/api/studies/{UID}/order", "view", "study"),
        ("POST", r"/RPC2|/", "xmlrpc", ""),
    ]]
# Changes: their patients are looked up before the request (after it they may be gone).
CHANGES = {"delete", "correction", "send", "download"}


def _outcome(status: str) -> str:
    code = status[:3]
    return "ok" if code[:1] in ("2", "3") else "refused" if code[:1] == "4" else "failed"


class AuditTrail:
    """WSGI middleware: one audit record per audited request (module docstring)."""

    def __init__(self, app: Callable, rt: Runtime) -> None:
        self.app = app
        self.rt = rt
        self.audit: Auditor = rt.audit
        self._seen: dict[tuple[str, str, str, str], float] = {}
        self._lock = threading.Lock()

    # --- called by Auth: HTTP Basic -------------------------------------------------------------

    def basic_login(self, name: str, client: str, ok: bool) -> None:
        """A fresh check of HTTP Basic credentials (Auth remembers a good one: one record per
        client session rather than per request)."""
        self.audit.record(AuditRecord("login", "ok" if ok else "refused", name[:64], client,
                                      "http", detail="HTTP Basic"))

    # --- the middleware ---------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if not self.audit.enabled:
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        found = self._classify(method, path)
        if found is None:
            return self.app(environ, start_response)
        action, kind, uid = found
        rec = AuditRecord(action, via="http", address=client_of(environ))
        user = environ.get("pacsd.user")
        rec.user = user.name if user is not None else ""
        try:   # never in the request's way: a body or query it cannot read is left out
            body = self._body(environ) if method == "POST" else b""
            self._describe(rec, environ, kind, uid, body)
        except Exception as e:  # noqa: BLE001
            rec.detail = f"({type(e).__name__} while describing it)"
            if rec.action == "xmlrpc":
                rec.action = "query"
        if rec.action == "":   # not audited (XML-RPC Ping...)
            return self.app(environ, start_response)
        status = ["500"]

        def start(st: str, headers: list, exc_info: Any = None) -> Any:
            status[0] = st
            if kind == "share":   # a share link's landing: its viewer URL names the study
                for name, value in headers:
                    found = re.search(r"[?&]study=([0-9.]{1,64})", str(value))
                    if name.lower() == "location" and found:
                        rec.studies = [found.group(1)]
            return start_response(st, headers, exc_info)
        try:
            result = self.app(environ, start)
        except BaseException:
            rec.outcome = "failed"
            self.audit.record(rec)
            raise
        rec.outcome = _outcome(status[0])
        noted = environ.get("pacsd.audit")
        if isinstance(noted, dict):   # what the route said it did (STOW-RS, the Worklist)
            rec.studies = list(noted.get("studies") or rec.studies)
            rec.count = int(noted.get("count") or 0)
            rec.patients = [tuple(p) for p in noted.get("patients") or ()] or rec.patients
            rec.detail = str(noted.get("detail") or rec.detail)
        if rec.action == "view" and self._seen_lately(rec):
            return result
        self.audit.record(rec)
        return result

    def _classify(self, method: str, path: str) -> tuple[str, str, str] | None:
        for m, pattern, action, kind in ROUTES:
            if m == method:
                match = pattern.match(path)
                if match:
                    return action, kind, (match.group(1) if kind else "")
        return None

    @staticmethod
    def _body(environ: dict[str, Any]) -> bytes:
        """A small body read for the record and put back for the route (the routes bound
        their own reads; a body over BODY_MAX or of unknown length is not read here)."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            return b""
        ctype = environ.get("CONTENT_TYPE", "")
        if not 0 <= length <= BODY_MAX or ctype.startswith("multipart/"):
            return b""
        data = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(data)
        return data

    def _describe(self, rec: AuditRecord, environ: dict[str, Any], kind: str, uid: str,
                  body: bytes) -> None:
        query = parse_qs(environ.get("QUERY_STRING", "")[:8192])
        form: dict[str, Any] = {}
        ctype = environ.get("CONTENT_TYPE", "")
        if body and ctype.startswith("application/json"):
            try:
                parsed = json.loads(body)
                form = parsed if isinstance(parsed, dict) else {}
            except ValueError:
                pass
        elif body and ctype.startswith("application/x-www-form-urlencoded"):
            form = {k: v[0] for k, v in parse_qs(body[:4096].decode("utf-8", "replace")).items()}
        if kind == "study":
            rec.studies = [uid]
        elif kind == "series":
            rec.studies = self._studies_of_series(uid)
            rec.detail = f"series {uid}"
        elif kind == "instance":
            rec.detail = f"instance {uid}"
        elif kind == "patient":
            rec.patients = [(uid, "")]
        elif kind == "node":
            rec.detail = f"from node {uid}"
        elif kind == "share":   # never the token itself: its hash, as the link's holder is named
            rec.user = f"share link {hashlib.sha256(uid.encode()).hexdigest()[:16]}"
            rec.detail = "share link" + (" with its PIN" if environ.get("REQUEST_METHOD") ==
                                         "POST" else "")
        elif kind == "link":
            rec.detail = f"share link {uid} revoked"
        elif kind == "step":
            rec.detail = f"worklist item {uid}"
        action = rec.action
        if action == "login" and kind != "share":
            rec.user = str(form.get("name") or "")[:64]
        elif action == "view" and not rec.studies:   # WADO-URI
            rec.studies = [v for v in query.get("studyUID", [])[:1] if v]
        elif action == "query":
            keys = {k: v[0] for k, v in query.items() if k not in ("limit", "offset")}
            rec.detail = " ".join(f"{k}={v}" for k, v in sorted(keys.items()))[:1024]
            for k in ("StudyInstanceUID", "0020000D"):
                rec.studies = rec.studies or [u for u in keys.get(k, "").split(",") if u][:20]
            pid = keys.get("PatientID") or keys.get("00100020") or keys.get("patient_id")
            if pid:
                rec.patients = [(pid, "")]
        elif action == "send":
            rec.detail = " ".join(filter(None, [rec.detail, f"to node {form.get('node', '')}"]))
            if form.get("deidentify"):
                rec.detail += ", de-identified"
        elif action == "download":
            if query.get("deidentify", ["0"])[0] not in ("0", "", "false", "no"):
                rec.detail = " ".join(filter(None, [rec.detail, "de-identified"]))
        elif action == "share" and kind == "study":
            rec.detail = f"share link made for {str(form.get('hours', ''))[:16]} hour(s)" + (
                ", with a PIN" if form.get("pin") else "")
        elif action == "labels":
            rec.detail = " ".join(f"{k} {', '.join(map(str, v))[:200]}" for k, v in form.items()
                                  if k in ("add", "remove") and isinstance(v, list))
        elif action in ("restore", "undo"):
            rec.detail = f"{form.get('uid', '')}"
            if re.fullmatch(r"[0-9.]{1,64}", rec.detail) and "." in rec.detail:
                rec.studies = [rec.detail]
        elif action == "empty-bin":
            days = form.get("older_than_days")
            rec.detail = f"older than {days} days" if days is not None else "all"
        elif action == "correction":
            changes = form.get("changes")
            if isinstance(changes, dict):
                rec.detail = " ".join(filter(None, [rec.detail, "changed: " + ", ".join(
                    str(k)[:64] for k in list(changes)[:20])]))
            if form.get("from") or form.get("into"):
                rec.patients = [(str(form.get("from") or "")[:64], ""),
                                (str(form.get("into") or "")[:64], "")]
                rec.detail = "merge"
            if form.get("to_patient"):
                rec.detail += f" to patient {str(form['to_patient'])[:64]}"
        elif action == "import":
            rec.detail = " ".join(filter(None, [rec.detail, json.dumps(
                {k: v for k, v in form.items() if isinstance(v, (str, list))})[:512]]))
        elif action == "xmlrpc":
            found = _METHOD.search(body[:8192])
            method = found.group(1).decode() if found else ""
            rec.action = XMLRPC.get(method.lower(), "")
            rec.detail = f"XML-RPC {method}"
            if rec.action == "query" and _DELETE.search(body[:8192]):
                rec.action = "delete"   # DBWindowFind with execute = Delete
        if rec.action in CHANGES and rec.studies and not rec.patients:
            self._patients(rec)

    def _studies_of_series(self, uid: str) -> list[str]:
        from pacsd.query import studies
        try:
            return studies.studies_of_series([uid])
        except Exception:  # noqa: BLE001 - the record says the series only
            return []

    @staticmethod
    def _patients(rec: AuditRecord) -> None:
        from pacsd.query import studies
        try:
            found = studies.patients_of_studies(rec.studies[:20])
        except Exception:  # noqa: BLE001 - the writer tries again
            return
        rec.patients = sorted(set(found.values()))

    def _seen_lately(self, rec: AuditRecord) -> bool:
        """Whether this user viewed this study from this address within VIEW_WINDOW_S (with
        the same outcome): a viewer's hundreds of requests make one record."""
        # An instance's tags (the viewer's tag panel, slice after slice) have no study in
        # their URL: one key for them all; the viewer's pixel requests name the study.
        key = (rec.user, rec.address, ",".join(rec.studies[:3]) or "tags", rec.outcome)
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < VIEW_WINDOW_S:
                return True
            if len(self._seen) > 10_000:
                self._seen = {k: t for k, t in self._seen.items() if now - t < VIEW_WINDOW_S}
                if len(self._seen) > 10_000:
                    self._seen.clear()
            self._seen[key] = now
        return False


# --- GET /api/audit ----------------------------------------------------------------------------

def audit_search(rt: Runtime) -> str:
    """The trail, newest first; administrators only. ?patient=&study=&user=&action=&since=
    &until=&limit= (dates as `pacsd audit` takes them)."""
    if not is_admin(bottle.request.environ):
        raise fail(403, "the audit trail is for administrators")
    q = bottle.request.query
    try:
        limit = max(1, min(1000, int(q.get("limit") or 100)))
        since = when(q.since) if q.get("since") else None
        until = when(q.until, end=True) if q.get("until") else None
    except ValueError as e:
        raise fail(400, str(e)) from None
    action = q.get("action") or ""
    if action and action not in ACTIONS:
        raise fail(400, f"action must be one of {', '.join(ACTIONS)}")
    found = search(folder_of(rt.cfg.data), Search(
        patient=(q.get("patient") or "")[:64], study=(q.get("study") or "")[:64],
        user=(q.get("user") or "")[:64], action=action, since=since, until=until,
        limit=limit))
    bottle.response.content_type = "application/json"
    return json.dumps({"records": found, "limit": limit, "enabled": rt.audit.enabled})


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    app.route("/api/audit", "GET", lambda: audit_search(rt))
    return app
