"""Links that show one study to whoever holds them (issue 22, item 3).

An administrator, or a user of a [[groups]] entry with share = true, makes a link to a study
they can see, for a limited time (hours, at most `MAX_DAYS` days) and optionally with a PIN.
The holder opens `/share/TOKEN` (with the PIN when asked), gets a cookie naming the link, and
from then on sees that study only, read only: the viewer, its images, its ZIP. The index keeps
only the token's SHA-256; each use, each refused PIN and each revocation is logged (and
audited); a revoked or expired link stops working within `CACHE_S` seconds on every node.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from typing import Any

import bottle

from pacsd.config import User
from pacsd.query import scope as scopes
from pacsd.query.scope import Scope, ShareLink
from pacsd.web.app import new_app
from pacsd.web.auth import Sessions, Throttle, check_password, cookie_value, hash_password
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime
from pacsd.web.ui import STATIC
from pacsd.web import visibility

log = logging.getLogger(__name__)

COOKIE = "pacsd_share"
MAX_DAYS = 90
CACHE_S = 5.0
PIN_ITERATIONS = 60_000   # a PIN is short: the throttle, not the hash, is what stops guessing
# What a share link's holder may reach (GET and HEAD only, Auth refuses the rest): the pages
# and the reads of the one study.
HOLDER_PATHS = ("/app/", "/api/me", "/api/studies/", "/api/series/", "/api/instances/",
                "/dicom-web/studies/", "/wado")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Shares:
    """Making, checking and revoking links; `holder` is what Auth asks of each request
    without a user."""

    def __init__(self, rt: Runtime, sessions: Sessions, throttle: Throttle) -> None:
        self.rt = rt
        self.key = sessions.key
        self.throttle = throttle
        self._cache: dict[str, tuple[float, ShareLink | None]] = {}
        self._lock = threading.Lock()

    # --- the holder's cookie --------------------------------------------------------------

    def _mac(self, hashed: str) -> str:
        return hmac.new(self.key, f"share.{hashed}".encode(), hashlib.sha256).hexdigest()[:32]

    def cookie(self, link: ShareLink, secure: bool) -> str:
        age = max(0, math.ceil(link.expires - time.time()))
        return (f"{COOKIE}={link.token_hash}.{self._mac(link.token_hash)}; Path=/; "
                f"Max-Age={age}; HttpOnly; SameSite=Lax" + ("; Secure" if secure else ""))

    def link(self, hashed: str) -> ShareLink | None:
        """The link by its hash, if it is in force (read at most every CACHE_S seconds)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(hashed)
        if hit is None or now - hit[0] > CACHE_S:
            found = scopes.share(hashed)
            with self._lock:
                if len(self._cache) > 1000:
                    self._cache.clear()
                self._cache[hashed] = (now, found)
        else:
            found = hit[1]
        if found is None or found.revoked is not None or found.expires < time.time():
            return None
        return found

    def holder(self, environ: dict[str, Any]) -> tuple[User, Scope] | None:
        value = cookie_value(environ, COOKIE)
        if not value or "." not in value:
            return None
        hashed, mac = value.split(".", 1)
        if not hmac.compare_digest(mac, self._mac(hashed)):
            return None
        path = str(environ.get("PATH_INFO", ""))
        if not path.startswith(HOLDER_PATHS):
            return None
        found = self.link(hashed)
        if found is None:
            return None
        who = f"share link {hashed[:16]}"
        return (User(who, "", False),
                Scope(studies=frozenset([found.study_uid]), who=who))

    # --- making and revoking ------------------------------------------------------------------

    def make(self, study_uid: str, *, hours: float, pin: str, note: str, by: str
             ) -> tuple[str, ShareLink]:
        token = secrets.token_urlsafe(24)
        hashed = token_hash(token)
        self.rt.archive.index.add_share(
            hashed, study_uid, created_by=by, expires=time.time() + hours * 3600,
            pin_hash=hash_password(pin, PIN_ITERATIONS) if pin else None, note=note)
        made = scopes.share(hashed)
        assert made is not None
        return token, made


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None
          ) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(data), status,
                               {"Content-Type": "application/json", **(headers or {})})


def _fail(status: int, message: str) -> bottle.HTTPResponse:
    return _json({"error": message}, status)


def _user_name(env: dict[str, Any]) -> str:
    user = env.get("pacsd.user")
    return user.name if user else "open access"


def make_app(rt: Runtime, shares: Shares) -> bottle.Bottle:
    app = new_app()

    def body() -> dict[str, Any]:
        try:
            data = json.loads(bottle.request.body.read(64 << 10) or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _fail(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise _fail(400, "the body must be a JSON object")
        return data

    def create(uid: str) -> bottle.HTTPResponse:
        env = bottle.request.environ
        if env.get("pacsd.share") or not rt.accounts.may_share(env.get("pacsd.user")):
            raise _fail(403, "sharing needs an administrator or a group with share = true")
        visibility.check_study(env, uid)
        if scopes.Scope(studies=frozenset([uid])).visible([uid]) != {uid}:
            raise _fail(404, "no such study")
        data = body()
        try:
            hours = float(data.get("hours") or 24 * float(data.get("days") or 7))
        except (TypeError, ValueError):
            raise _fail(400, "hours (or days) must be a number") from None
        if not 0 < hours <= MAX_DAYS * 24:
            raise _fail(400, f"a link lasts more than 0 hours and at most {MAX_DAYS} days")
        pin = str(data.get("pin") or "")
        if pin and not (4 <= len(pin) <= 32):
            raise _fail(400, "a PIN has 4 to 32 characters")
        note = str(data.get("note") or "")[:200]
        by = f"{_user_name(env)} (web, {client_of(env)})"
        token, link = shares.make(uid, hours=hours, pin=pin, note=note, by=by)
        base = bottle.request.urlparts
        url = f"{base.scheme}://{base.netloc}{bottle.request.script_name.rstrip('/')}/share/{token}"
        log.info("share link %s to study %s made by %s, until %s%s", link.token_hash[:16], uid,
                 by, time.strftime("%Y-%m-%d %H:%M", time.localtime(link.expires)),
                 ", with a PIN" if pin else "")
        return _json({**link.as_dict(), "url": url, "token": token}, 201)

    def listed() -> str:
        env = bottle.request.environ
        if env.get("pacsd.share") or not rt.accounts.may_share(env.get("pacsd.user")):
            raise _fail(403, "sharing needs an administrator or a group with share = true")
        study = bottle.request.query.get("study") or None
        found = scopes.shares(study)
        if not env.get("pacsd.admin"):   # a sharer sees the links they made
            me = _user_name(env)
            found = [s for s in found if s.created_by.startswith(f"{me} (")]
        bottle.response.content_type = "application/json"
        return json.dumps([s.as_dict() for s in found])

    def revoke(link_id: str) -> dict[str, Any]:
        env = bottle.request.environ
        if env.get("pacsd.share") or not rt.accounts.may_share(env.get("pacsd.user")):
            raise _fail(403, "sharing needs an administrator or a group with share = true")
        found = scopes.share_by_id(link_id)
        me = _user_name(env)
        if found is None or not (env.get("pacsd.admin")
                                 or found.created_by.startswith(f"{me} (")):
            raise _fail(404, "no such link")
        done = rt.archive.index.revoke_share(found.token_hash)
        with shares._lock:
            shares._cache.pop(found.token_hash, None)
        log.info("share link %s to study %s revoked by %s (web, %s)", link_id,
                 found.study_uid, me, client_of(env))
        return {"id": link_id, "revoked": done}

    def viewer_of(link: ShareLink) -> str:
        return f"{bottle.request.script_name.rstrip('/')}/app/viewer?study={link.study_uid}"

    def land(token: str) -> Any:
        """GET /share/TOKEN: straight to the viewer, or the PIN page first."""
        env = bottle.request.environ
        link = shares.link(token_hash(token))
        if link is None:
            log.info("share link opened from %s: unknown, expired or revoked", client_of(env))
            return bottle.HTTPResponse("This link is unknown, has expired or was revoked.\n",
                                       404, {"Content-Type": "text/plain; charset=utf-8"})
        if link.pin_hash is not None:
            rsp = bottle.static_file("share.html", root=str(STATIC), mimetype="text/html",
                                     charset="utf-8")
            rsp.set_header("Cache-Control", "no-store")
            rsp.set_header("Content-Security-Policy", "default-src 'self'; script-src 'self'")
            return rsp
        return opened(link)

    def opened(link: ShareLink) -> bottle.HTTPResponse:
        env = bottle.request.environ
        rt.archive.index.count_share_use(link.token_hash)
        log.info("share link %s to study %s used from %s", link.token_hash[:16], link.study_uid,
                 client_of(env))
        secure = rt.cfg.http_cert != "" or bottle.request.get_header("X-Forwarded-Proto") == "https"
        return bottle.HTTPResponse("", 303, {"Location": viewer_of(link),
                                             "Set-Cookie": shares.cookie(link, secure),
                                             "Cache-Control": "no-store"})

    def pin(token: str) -> Any:
        """POST /share/TOKEN {"pin": ...} (X-Requested-With): the PIN page's answer."""
        env = bottle.request.environ
        if not env.get("HTTP_X_REQUESTED_WITH"):
            raise _fail(403, "this request needs the X-Requested-With header")
        hashed = token_hash(token)
        address = client_of(env)
        if shares.throttle.blocked(address, f"share {hashed[:16]}"):
            raise _fail(429, "too many wrong PINs; try again in a quarter of an hour")
        link = shares.link(hashed)
        if link is None:
            raise _fail(404, "this link is unknown, has expired or was revoked")
        given = str(body().get("pin") or "")[:64]
        if link.pin_hash is not None and not check_password(given, link.pin_hash):
            shares.throttle.failed(address, f"share {hashed[:16]}")
            log.warning("share link %s: wrong PIN from %s", hashed[:16], address)
            raise _fail(401, "wrong PIN")
        shares.throttle.succeeded(address, f"share {hashed[:16]}")
        rsp = opened(link)
        return _json({"next": rsp.headers["Location"]}, 200,
                     {"Set-Cookie": rsp.headers["Set-Cookie"]})

    app.route("/api/studies/<uid>/share", "POST", create)
    app.route("/api/shares", "GET", listed)
    app.route("/api/shares/<link_id>/revoke", "POST", revoke)
    app.route("/share/<token>", "GET", land)
    app.route("/share/<token>", "POST", pin)
    return app

