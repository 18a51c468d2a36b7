"""Who may do what on the web side: users with hashed passwords, HTTP Basic, admin rights.

With no [[users]] configured everything is open, and config.load has already made sure the
HTTP listener is then bound to loopback only (the embedded default, as Orthanc does).
`/testdbalive` and `/status` are open to loopback callers whatever the users.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from typing import Any, Callable, Iterable

from pacsd.config import Config, User

log = logging.getLogger(__name__)

ITERATIONS = 240_000
OPEN_ON_LOOPBACK = ("/testdbalive", "/status")


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


class Auth:
    """WSGI middleware: sets environ["pacsd.user"] (a User, or None when no users exist) or
    answers 401."""

    def __init__(self, app: Callable, cfg: Config) -> None:
        self.app = app
        self.users = {u.name: u for u in cfg.users}
        # A verified Authorization header, by its SHA-256: PBKDF2 is slow on purpose, and a
        # viewer sends hundreds of requests.
        self._verified: dict[bytes, User] = {}
        self._lock = threading.Lock()

    def user(self, header: str) -> User | None:
        key = hashlib.sha256(header.encode()).digest()
        with self._lock:
            hit = self._verified.get(key)
        if hit is not None and self.users.get(hit.name) is hit:
            return hit
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        user = self.users.get(name)
        if user is None or not check_password(password, user.password_hash):
            return None
        with self._lock:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified[key] = user
        return user

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        environ["pacsd.user"] = None
        if not self.users:
            return self.app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        if (environ.get("REQUEST_METHOD") == "OPTIONS"
                or (path in OPEN_ON_LOOPBACK and is_loopback(environ.get("REMOTE_ADDR", "")))):
            return self.app(environ, start_response)
        user = self.user(environ.get("HTTP_AUTHORIZATION", ""))
        if user is None:
            log.info("HTTP %s %s from %s: authentication required", environ.get("REQUEST_METHOD"),
                     path, environ.get("REMOTE_ADDR"))
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Basic realm="pacsd"')])
            return [b"authentication required\n"]
        environ["pacsd.user"] = user
        return self.app(environ, start_response)


def is_admin(environ: dict[str, Any], cfg: Config) -> bool:
    """Administrators: any caller when no users are configured (loopback only), else users
    marked admin."""
    if not cfg.users:
        return True
    user = environ.get("pacsd.user")
    return bool(user and user.admin)
