"""The web side: bottle apps built by factories, composed under one root, served by cheroot.

Each concern is an app of its own (health, wado, dicomweb, xmlrpc; the pages' ui, api and
admin), built by its `make_app` from a `Runtime` (runtime.py: configuration, the archive, the
accounts of nodes and users, a few live figures) and merged or mounted into the root; each
starts from `new_app()` (app.py), which turns our errors into answers in one place.
Front ends call archive / query / index / store, never each other and never the daemon; every
read of the index goes through pacsd.query (no module here imports the models).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

from pacsd.errors import PortInUse
from pacsd.query import scope as scopes
from pacsd.web import (admin, api, audit, dicomweb, health, metrics, share, ui, upload, viewers,
                       wado, worklist, xmlrpc)
from pacsd.web.app import errors_plugin, new_app
from pacsd.web.auth import Auth, Sessions, Throttle
from pacsd.web.guard import Guard
from pacsd.web.runtime import Runtime
from pacsd.web.server import PacsdServer

__all__ = ["Cors", "HttpServer", "Runtime", "errors_plugin", "make_app", "new_app"]

log = logging.getLogger(__name__)


class Cors:
    """WSGI middleware answering CORS preflights and tagging responses for allowed origins.

    Only origins listed by name get credentials (cookies, HTTP Basic) and their Origin
    reflected; '*' answers `Access-Control-Allow-Origin: *` without credentials (browsers then
    send none), so a list of '*' never lets any site read with the user's session. Whether a
    cross-site change is let through at all is the Guard's decision (listed origins only).
    """

    def __init__(self, app: Callable, origins: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = {o.rstrip("/") for o in origins if o != "*"}

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        origin = environ.get("HTTP_ORIGIN")
        if origin and origin in self.origins:
            headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                       ("Access-Control-Allow-Credentials", "true")]
        elif origin and self.any:
            headers = [("Access-Control-Allow-Origin", "*")]
        else:
            return self.app(environ, start_response)
        headers.append(("Access-Control-Expose-Headers", "Content-Type, Content-Length, Warning"))
        if environ.get("REQUEST_METHOD") == "OPTIONS":
            asked = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "")
            start_response("204 No Content", headers + [
                ("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", asked or "Authorization, Content-Type, Accept"),
                ("Access-Control-Max-Age", "600")])
            return [b""]

        def start(status: str, response_headers: list, exc_info: Any = None) -> Any:
            return start_response(status, response_headers + headers, exc_info)
        return self.app(environ, start)


def make_app(rt: Runtime) -> Callable:
    """The whole web side as one WSGI application."""
    local = Sessions.local_key(rt.cfg.data / "session.key").hex()
    sessions = Sessions(bytes.fromhex(rt.archive.index.shared_value(Sessions.KEY, local)))
    root = new_app()
    for module in (health, metrics, wado, xmlrpc, api, admin, worklist):
        root.merge(module.make_app(rt))
    root.merge(audit.make_app(rt))   # GET /api/audit
    throttle = Throttle()   # one for the login form, HTTP Basic and share links' PINs
    root.merge(ui.make_app(rt, sessions, throttle))
    shares = share.Shares(rt, sessions, throttle)
    root.merge(share.make_app(rt, shares))
    # Upload from the browser; Weasis (its manifest, study tokens) and OHIF links.
    root.merge(upload.make_app(rt))
    root.merge(viewers.make_app(rt, sessions))
    # Mounted as a plain WSGI app: SCRIPT_NAME then carries the prefix, from which DICOMweb
    # builds its RetrieveURLs.
    sub = dicomweb.make_app(rt)
    root.mount(dicomweb.MOUNT + "/", lambda environ, start_response: sub(environ, start_response))
    for plugin in rt.hooks.plugins if rt.hooks else []:
        routes = plugin.hook("routes")
        if routes is None:
            continue
        own = new_app()
        try:
            routes(own)
        except Exception as e:  # noqa: BLE001 - the plugin's routes are left out, not the rest
            log.error("plugin %s: its HTTP routes failed to load: %s", plugin.name, e)
            continue
        # Behind Auth like everything else: a plugin's page is no more open than ours.
        root.mount(f"/plugins/{plugin.name}/", own)
    # The audit trail inside Auth: it sees who the user is (Auth tells it of HTTP Basic logins).
    trail = audit.AuditTrail(root, rt)
    app: Callable = Auth(trail, rt.accounts.logins, sessions, throttle,
                         scope_of=lambda user: scopes.of_groups(
                             rt.accounts.groups_of_user(user), f"user {getattr(user, 'name', '')}"),
                         shared=shares.holder, on_basic=trail.basic_login)
    if rt.cfg.http_cors_origins:
        app = Cors(app, rt.cfg.http_cors_origins)
    # Outermost: every request, preflights included, passes the Host and same-origin checks.
    return Guard(app, rt.cfg.http)


class HttpServer:
    """cheroot: a pool of worker threads, socket timeouts, a cap on request bodies, TLS; guarded
    against slow heads and bodies, with a lane of its own for the health probes (server.py)."""

    def __init__(self, rt: Runtime) -> None:
        cfg = rt.cfg
        self.cfg = cfg
        app = make_app(rt)
        self.server = self._server(app, cfg.http_port)
        # [http] osirix_port: the same application on OsiriX's web portal port, for monitors
        # and scripts that probe it (same guards, its own worker pool and health lane).
        self.osirix = self._server(app, cfg.http_osirix_port) if cfg.http_osirix_port else None
        self._thread: threading.Thread | None = None
        self._osirix_thread: threading.Thread | None = None

    def _server(self, app: Callable, port: int) -> PacsdServer:
        cfg = self.cfg
        server = PacsdServer(
            (cfg.http_bind or "127.0.0.1", port), app,
            numthreads=cfg.http_threads, timeout=int(cfg.http_timeout), server_name="pacsd",
            shutdown_timeout=2, body_timeout=cfg.http_body_timeout,
            body_min_rate=cfg.http_body_min_rate)
        server.max_request_body_size = cfg.http_max_body_mb << 20   # 413 beyond it
        server.max_request_header_size = 64 << 10
        if cfg.http_cert:
            from cheroot.ssl.builtin import BuiltinSSLAdapter
            server.ssl_adapter = BuiltinSSLAdapter(cfg.http_cert, cfg.http_key)
        return server

    @property
    def port(self) -> int:
        return int(self.server.bind_addr[1])

    @property
    def osirix_port(self) -> int:
        """The OsiriX-compatible port, 0 when off."""
        return int(self.osirix.bind_addr[1]) if self.osirix is not None else 0

    @property
    def alive(self) -> bool:
        """Whether the server still serves: its thread runs and it was not stopped."""
        return self._thread is not None and self._thread.is_alive() and bool(self.server.ready)

    @property
    def scheme(self) -> str:
        return "https" if self.cfg.http_cert else "http"

    def _prepare(self, server: PacsdServer, port: int) -> None:
        try:
            server.prepare()   # binds; port 0 is resolved here
        except OSError as e:   # cheroot folds the errno into its message
            reason = e.strerror or str(e).rsplit("]", 1)[-1].strip(" )") or str(e)
            raise PortInUse(f"cannot listen for HTTP on {self.cfg.http_bind}:"
                            f"{port}: {reason}") from None

    def start(self) -> None:
        self._prepare(self.server, self.cfg.http_port)
        if self.osirix is not None:
            try:
                self._prepare(self.osirix, self.cfg.http_osirix_port)
            except PortInUse:
                self.server.stop()
                raise
            self._osirix_thread = threading.Thread(target=self.osirix.serve, name="http-osirix",
                                                   daemon=True)
            self._osirix_thread.start()
            log.info("HTTP listener (OsiriX port) on %s://%s:%d", self.scheme,
                     self.cfg.http_bind, self.osirix_port)
        self._thread = threading.Thread(target=self.server.serve, name="http", daemon=True)
        self._thread.start()
        log.info("HTTP listener on %s://%s:%d", self.scheme, self.cfg.http_bind, self.port)

    def stop(self) -> None:
        if self._osirix_thread is not None and self.osirix is not None:
            self.osirix.stop()
            self._osirix_thread.join(10)
            self._osirix_thread = None
        if self._thread is not None:
            self.server.stop()
            self._thread.join(10)
            self._thread = None
            log.info("HTTP listener stopped")
