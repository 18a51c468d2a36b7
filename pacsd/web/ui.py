"""The pages: study list, viewer, Query/Retrieve, Worklist, administration, login.

Plain HTML, CSS and JavaScript files in pacsd/web/static, shipped inside the package: no
front-end build at install time and nothing fetched from the internet at run time. The pages
talk to /api (api.py, admin.py), /dicom-web and /wado like any other client.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import bottle

from pacsd.web.app import new_app
from pacsd.web.auth import Sessions, Throttle, verify
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = {"": "studies.html", "viewer": "viewer.html", "qr": "qr.html", "admin": "admin.html",
         "login": "login.html", "worklist": "worklist.html"}


def page(name: str) -> Any:
    if name not in PAGES:
        raise bottle.HTTPError(404, "no such page")
    rsp = bottle.static_file(PAGES[name], root=str(STATIC), mimetype="text/html",
                             charset="utf-8")
    # The pages' data comes from the API; the pages themselves may be cached, but revalidated
    # so that an upgrade shows at once.
    rsp.set_header("Cache-Control", "no-cache")
    rsp.set_header("X-Frame-Options", "SAMEORIGIN")
    rsp.set_header("Content-Security-Policy",
                   "default-src 'self'; img-src 'self' blob: data:; style-src 'self' "
                   "'unsafe-inline'; script-src 'self'; connect-src 'self'; "
                   "frame-ancestors 'self'")
    return rsp


def static(filename: str) -> Any:
    rsp = bottle.static_file(filename, root=str(STATIC))
    rsp.set_header("Cache-Control", "no-cache")
    return rsp


def login(rt: Runtime, sessions: Sessions, throttle: Throttle) -> Any:
    """Name and password (form or JSON) -> the session cookie."""
    req = bottle.request
    address = client_of(req.environ)   # never the client's own X-Forwarded-For (the Guard)
    if (req.content_type or "").startswith("application/json"):
        try:
            body = json.loads(req.body.read(64 << 10) or b"{}")
        except (ValueError, UnicodeDecodeError):
            body = {}
        body = body if isinstance(body, dict) else {}
    else:
        body = {"name": req.forms.getunicode("name"), "password": req.forms.getunicode("password")}
    name, password = str(body.get("name") or ""), str(body.get("password") or "")
    if throttle.blocked(address, name):
        log.debug("login refused for %s (as %r): too many failed attempts", address, name[:64])
        return bottle.HTTPResponse(json.dumps({"error": "too many failed logins; try again in "
                                               "a quarter of an hour"}), 429,
                                   {"Content-Type": "application/json", "Retry-After": "900"})
    user = rt.accounts.user(name)
    right = verify(user, password)   # as slow for an unknown name as for a known one
    if user is None or not right:
        if throttle.failed(address, name):
            log.warning("too many failed logins from %s (last as %r): refused for %.0f "
                        "minutes", address, name[:64], throttle.window_s / 60)
        log.warning("failed login for %r from %s", name[:64], address)
        return bottle.HTTPResponse(json.dumps({"error": "wrong name or password"}), 401,
                                   {"Content-Type": "application/json"})
    throttle.succeeded(address, name)
    log.info("%s logged in from %s", user.name, address)
    secure = rt.cfg.http_cert != "" or req.get_header("X-Forwarded-Proto") == "https"
    return bottle.HTTPResponse(json.dumps({"user": user.name, "admin": user.admin}), 200, {
        "Content-Type": "application/json",
        "Set-Cookie": sessions.header(sessions.issue(user), secure=secure)})


def logout(sessions: Sessions) -> Any:
    return bottle.HTTPResponse(json.dumps({"user": None}), 200, {
        "Content-Type": "application/json",
        "Set-Cookie": sessions.header("", secure=False, max_age=0)})


def make_app(rt: Runtime, sessions: Sessions, throttle: Throttle | None = None) -> bottle.Bottle:
    app = new_app()
    app.route("/", "GET", lambda: bottle.redirect("app/"))
    app.route("/app", "GET", lambda: bottle.redirect("app/"))
    app.route("/app/", "GET", lambda: page(""))
    app.route("/app/<name>", "GET", page)
    app.route("/app/static/<filename:path>", "GET", static)
    throttle = throttle or Throttle()
    app.route("/app/login", "POST", lambda: login(rt, sessions, throttle))
    app.route("/app/logout", "POST", lambda: logout(sessions))
    return app
