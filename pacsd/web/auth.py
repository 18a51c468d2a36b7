"""Who may do what on the web side: users with hashed passwords, HTTP Basic, admin rights.

With no users (neither [[users]] in the config nor any added on the admin page) everything is
open, and the server has already made sure at start that the HTTP listener is then bound to
loopback only (the embedded default, as Orthanc does): beyond loopback it needs an administrator,
from either source (Accounts.check_http_bind). pacsd.accounts also keeps one administrator at
least once there are users: the first user is one, the last one is never demoted or removed.
`/testdbalive`, `/status` and `/metrics` are open to loopback callers whatever the users.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import http.cookies
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

from pacsd.config import User

log = logging.getLogger(__name__)

ITERATIONS = 240_000
OPEN_ON_LOOPBACK = ("/testdbalive", "/status", "/metrics")


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    """pbkdf2_sha256$ITERATIONS$SALT$HASH (base64), as kept in [[users]] password_hash."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return "$".join(("pbkdf2_sha256", str(iterations), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()))


def check_password(password: str, hashed: str) -> bool:
    try:
        _, iterations, salt, digest = hashed.split("$")
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                  int(iterations))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class Sessions:
    """Signed session cookies for the pages: name, expiry and a fingerprint of the password
    hash (changing the password ends the user's sessions), HMAC-SHA256 with a key kept in the
    index (pacsd_meta), so that a restart does not log the reading room out and every node
    behind a load balancer accepts the cookies of the others."""

    COOKIE = "pacsd_session"
    LIFETIME_S = 7 * 24 * 3600
    KEY = "session_key"   # its pacsd_meta key

    def __init__(self, key: bytes) -> None:
        self.key = key

    @staticmethod
    def local_key(path: Path) -> bytes:
        """The key of a data folder (0600): where versions before 0.2 kept it, and still the
        first value of the shared one, so that sessions survive the upgrade."""
        try:
            key = path.read_bytes()
            if len(key) >= 32:
                return key
        except OSError:
            pass
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self.key, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    @staticmethod
    def _fingerprint(user: User) -> str:
        return hashlib.sha256(user.password_hash.encode()).hexdigest()[:16]

    def issue(self, user: User, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.LIFETIME_S)
        name = base64.urlsafe_b64encode(user.name.encode()).decode().rstrip("=")
        payload = f"{name}.{expires}.{self._fingerprint(user)}"
        return f"{payload}.{self._sign(payload)}"

    def user(self, cookie: str, lookup: Callable[[str], User | None]) -> User | None:
        try:
            name_b64, expires, fingerprint, mac = cookie.split(".")
            payload = f"{name_b64}.{expires}.{fingerprint}"
            if not hmac.compare_digest(mac, self._sign(payload)) or int(expires) < time.time():
                return None
            name = base64.urlsafe_b64decode(name_b64 + "=" * (-len(name_b64) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        user = lookup(name)
        if user is None or not hmac.compare_digest(fingerprint, self._fingerprint(user)):
            return None
        return user

    # --- study tokens: a viewer launched from the page (Weasis) fetches WADO without the
    # page's cookie. The token names the user (as a session does: a changed password ends it)
    # and an expiry; the study is signed with it, not written in it, so that it proves
    # nothing for any other study. A distinct prefix keeps a token from passing as a session.
    STUDY_TOKEN_S = 3600

    def study_token(self, user: User, study: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.STUDY_TOKEN_S)
        name = base64.urlsafe_b64encode(user.name.encode()).decode().rstrip("=")
        payload = f"{name}.{expires}.{self._fingerprint(user)}"
        return f"{payload}.{self._sign(f'study-token:{study}:{payload}')}"

    def study_user(self, token: str, study: str, lookup: Callable[[str], User | None]
                   ) -> User | None:
        """The user a study token was given to, if it is for `study` and has not expired."""
        try:
            name_b64, expires, fingerprint, mac = token.split(".")
            payload = f"{name_b64}.{expires}.{fingerprint}"
            if (not hmac.compare_digest(mac, self._sign(f"study-token:{study}:{payload}"))
                    or int(expires) < time.time()):
                return None
            name = base64.urlsafe_b64decode(name_b64 + "=" * (-len(name_b64) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        user = lookup(name)
        if user is None or not hmac.compare_digest(fingerprint, self._fingerprint(user)):
            return None
        return user

    def header(self, value: str, *, secure: bool, max_age: int | None = None) -> str:
        age = self.LIFETIME_S if max_age is None else max_age
        return (f"{self.COOKIE}={value}; Path=/; Max-Age={age}; HttpOnly; SameSite=Lax"
                + ("; Secure" if secure else ""))


class Throttle:
    """Failed logins (the login form and HTTP Basic alike), counted per client address and per
    user name: after `limit` failures of an address, or `name_limit` for one name (guessing
    spread over many addresses) within `window_s`, further attempts are refused until the
    window has passed, even with the right password (else the refusal itself would tell a
    guesser when a password is right). PBKDF2 already makes each try slow."""

    def __init__(self, limit: int = 10, window_s: float = 900.0, name_limit: int = 30) -> None:
        self.limit, self.window_s, self.name_limit = limit, window_s, name_limit
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    @staticmethod
    def _keys(address: str, name: str | None) -> list[str]:
        return [f"addr {address}"] + ([f"name {name[:64]}"] if name else [])

    def blocked(self, address: str, name: str | None = None) -> bool:
        now = time.monotonic()
        with self._lock:
            return (len(self._recent(f"addr {address}", now)) >= self.limit
                    or (bool(name) and len(self._recent(f"name {str(name)[:64]}", now))
                        >= self.name_limit))

    def failed(self, address: str, name: str | None = None) -> bool:
        """Count a failure; True when it is the one that blocks the address or the name."""
        now = time.monotonic()
        blocked = False
        with self._lock:
            if len(self._failures) > 10_000:   # bounded memory under a spray of addresses
                self._failures.clear()
            for key in self._keys(address, name):
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times
                blocked |= len(times) == (self.limit if key.startswith("addr")
                                          else self.name_limit)
        return blocked

    def succeeded(self, address: str, name: str | None = None) -> None:
        with self._lock:
            for key in self._keys(address, name):
                self._failures.pop(key, None)


@functools.cache
def _dummy_hash() -> str:
    """Checked when the name is unknown, at the cost `pacsd passwd` uses, so that an unknown
    name takes as long as a wrong password of a known user (timing must not tell which names
    exist). Made once, on first use."""
    return hash_password(secrets.token_urlsafe(16))


def verify(user: User | None, password: str) -> bool:
    """The password of `user`, checked in the same time whether the user exists or not
    (check_password compares digests in constant time)."""
    if user is None:
        check_password(password, _dummy_hash())
        return False
    return check_password(password, user.password_hash)


class Throttled(Exception):
    """Too many failed logins from this client or for this name: refused unchecked (429)."""


def cookie_value(environ: dict[str, Any], name: str) -> str | None:
    jar = http.cookies.SimpleCookie()
    try:
        jar.load(environ.get("HTTP_COOKIE", ""))
    except http.cookies.CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel else None


class Auth:
    """WSGI middleware: sets environ["pacsd.user"] (a User, or None when no users exist) and
    environ["pacsd.admin"], or refuses the request.

    Credentials: HTTP Basic (scripts, DICOMweb clients, OsiriX) or the session cookie of the
    pages. Pages without credentials are sent to the login page; /api answers 401 without a
    Basic challenge (the pages' own script handles it, no browser pop-up). Requests that change
    something under /api or /app carry `X-Requested-With` (CSRF: a foreign page cannot set it
    without a CORS preflight we would refuse), even when no users exist: a page on another site
    must not drive a loopback pacsd.
    A study token (Sessions.study_token, in `?study_token=`) stands for its user on GET /wado
    and GET /api/studies/UID/weasis.xml of its own study only: Weasis, launched from a page,
    fetches without the page's cookie (pacsd.web.viewers).
    """

    def __init__(self, app: Callable, users: Callable[[], dict[str, User]],
                 sessions: Sessions, throttle: Throttle | None = None,
                 scope_of: Callable[[User | None], Any] = lambda user: None,
                 shared: Callable[[dict[str, Any]], tuple[User, Any] | None] = lambda e: None,
                 on_basic: Callable[[str, str, bool], None] | None = None) -> None:
        self.app = app
        # Told of each HTTP Basic check (name, client, success): the audit trail.
        self.on_basic = on_basic or (lambda name, client, ok: None)
        self.users = users
        self.sessions = sessions
        self.throttle = throttle or Throttle()
        # What a user may see (Accounts.scope_of_user: None for all), and who holds a share
        # link's cookie (pacsd.web.share: a stand-in user and the one study's scope).
        self.scope_of = scope_of
        self.shared = shared
        # A verified Authorization header, by its SHA-256: PBKDF2 is slow on purpose, and a
        # viewer sends hundreds of requests.
        self._verified: dict[bytes, User] = {}
        self._lock = threading.Lock()

    def basic_user(self, header: str, users: dict[str, User], client: str = ""
                   ) -> User | None:
        """The user of an Authorization header; None if it does not prove one. Throttled when
        the client or the name has failed too often (the password is then not even checked)."""
        key = hashlib.sha256(header.encode()).digest()
        with self._lock:
            hit = self._verified.get(key)
        if hit is not None and users.get(hit.name) == hit:
            return hit
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            name, password = "", None
        if self.throttle.blocked(client, name):
            self.on_basic(name, client, False)
            raise Throttled(client)
        user = users.get(name) if password is not None else None
        if password is None or not verify(user, password) or user is None:
            self.on_basic(name, client, False)
            if self.throttle.failed(client, name):
                log.warning("HTTP Basic: too many failed logins from %s (last as %r): refused "
                            "for %.0f minutes", client, name[:64], self.throttle.window_s / 60)
            return None
        self.throttle.succeeded(client, name)
        self.on_basic(name, client, True)
        with self._lock:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified[key] = user
        return user

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        client = str(environ.get("pacsd.client") or environ.get("REMOTE_ADDR") or "")
        environ["pacsd.user"] = None
        environ["pacsd.admin"] = False
        environ["pacsd.scope"] = None
        if (method not in ("GET", "HEAD", "OPTIONS") and path.startswith(("/api/", "/app/"))
                and path != "/app/login" and not environ.get("HTTP_X_REQUESTED_WITH")):
            return _refuse(start_response, "403 Forbidden",
                           "this request needs the X-Requested-With header\n")
        users = self.users()
        if not users:
            environ["pacsd.admin"] = True
            return self.app(environ, start_response)
        if (method == "OPTIONS" or path in ("/app/login",) or path.startswith("/app/static/")
                or path.startswith("/share/")
                or (path in OPEN_ON_LOOPBACK and is_loopback(client))):
            return self.app(environ, start_response)
        user, cookie = None, None
        if environ.get("HTTP_AUTHORIZATION"):
            try:
                user = self.basic_user(environ["HTTP_AUTHORIZATION"], users, client)
            except Throttled:
                log.debug("HTTP %s %s from %s: refused, too many failed logins", method, path,
                          client)
                body = b"too many failed logins; try again in a quarter of an hour\n"
                start_response("429 Too Many Requests", [
                    ("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                    ("Retry-After", str(int(self.throttle.window_s)))])
                return [body]
        else:
            cookie = cookie_value(environ, Sessions.COOKIE)
            if cookie:
                user = self.sessions.user(cookie, users.get)
            if user is None:
                held = self.shared(environ)
                if held is not None:
                    # A share link's holder: that one study, read only.
                    if method not in ("GET", "HEAD"):
                        return _refuse(start_response, "403 Forbidden",
                                       "a shared study can be viewed and downloaded only\n")
                    environ["pacsd.user"], environ["pacsd.scope"] = held
                    environ["pacsd.share"] = True
                    return self.app(environ, start_response)
        if user is None and method in ("GET", "HEAD"):
            user = self._study_token_user(environ, path, users)
        if user is None:
            # A request with no credentials at all is the usual first step of a client (and the
            # watchdog's XML-RPC probe, every round): DEBUG, so the log does not grow with it.
            offered = environ.get("HTTP_AUTHORIZATION") or cookie
            log.log(logging.INFO if offered else logging.DEBUG,
                    "HTTP %s %s from %s: authentication required", method, path, client)
            if path in ("", "/") or path.startswith("/app"):
                here = path + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
                login = ("login" if path.startswith("/app/") else "app/login")
                start_response("302 Found", [("Location", f"{login}?next={quote(here)}"),
                                             ("Content-Type", "text/plain")])
                return [b"login required\n"]
            if path.startswith("/api/"):
                return _refuse(start_response, "401 Unauthorized", "login required\n")
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Basic realm="pacsd"')])
            return [b"authentication required\n"]
        environ["pacsd.user"] = user
        environ["pacsd.admin"] = user.admin
        environ["pacsd.scope"] = self.scope_of(user)
        return self.app(environ, start_response)

    def _study_token_user(self, environ: dict[str, Any], path: str, users: dict[str, User]
                          ) -> User | None:
        """The user of a study token (Sessions.study_token), taken only where a viewer launched
        from the page needs it: WADO-URI of that very study and its Weasis manifest."""
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=32)
        token = (query.get(STUDY_TOKEN) or [""])[0]
        if not token:
            return None
        if path == "/wado":
            study = (query.get("studyUID") or [""])[0].strip()
        elif path.startswith("/api/studies/") and path.endswith("/weasis.xml"):
            study = path[len("/api/studies/"):-len("/weasis.xml")]
        else:
            return None
        user = self.sessions.study_user(token, study, users.get) if study else None
        if user is None:
            log.info("HTTP GET %s from %s: a study token not valid for study %s (expired, "
                     "another study's, or forged)", path, environ.get("pacsd.client", ""),
                     study[:64])
            return None
        environ["pacsd.study_token"] = study
        return user


STUDY_TOKEN = "study_token"   # the query parameter


def _refuse(start_response: Callable, status: str, message: str) -> list[bytes]:
    body = json.dumps({"error": message.strip()}).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def is_admin(environ: dict[str, Any]) -> bool:
    """Administrators: any caller when no users exist (HTTP is then on loopback only), else
    users marked admin. Set by Auth."""
    return bool(environ.get("pacsd.admin"))
