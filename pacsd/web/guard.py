"""The one request guard in front of the whole web side (every route, open mode too).

1. Host: the Host header must name this server, or the request is refused (421). A page on an
   attacker's DNS name that later resolves to this machine (DNS rebinding) is, for the browser,
   same-origin with us: only the Host header it sends (the attacker's name) gives it away.
2. Same origin for changes: a request other than GET/HEAD/OPTIONS is refused (403) unless its
   Origin (else Referer) is this server's own origin or an origin listed in [http]
   cors_origins, or, with neither header, it cannot have come from a web page: its Content-Type
   is one no form and no `no-cors` fetch can send (text/xml, application/json,
   multipart/related, ...), or it carries X-Requested-With (which needs a CORS preflight).
3. The client's address: the connecting address, or behind a configured reverse proxy
   ([http] trusted_proxies) the right-most X-Forwarded-For entry that is not such a proxy,
   as environ["pacsd.client"] for the login throttle and the logs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from pacsd.config import HttpSettings

log = logging.getLogger(__name__)

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# What an HTML form or a cross-site `fetch(..., {mode: "no-cors"})` can send (the
# CORS-safelisted types, Fetch standard); a POST without any Content-Type is counted with
# them: a body-only no-cors fetch (a Blob without a type) sends none, and older engines send
# no Origin either.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain", "")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_PORTS = {"http": 80, "https": 443}
LOG_EVERY_S, LOG_BURST = 60.0, 5   # refusal lines per peer and kind, per minute


def client_of(environ: dict[str, Any]) -> str:
    """The client's address as the guard found it (the connecting address otherwise)."""
    return str(environ.get("pacsd.client") or environ.get("REMOTE_ADDR") or "")


class Proxies:
    """[http] trusted_proxies: addresses and networks whose forwarded headers we believe."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def trusts(self, address: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]").split("%")[0])
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def client(self, environ: dict[str, Any]) -> str:
        """The connecting address, unless it is a trusted proxy: then the right-most
        X-Forwarded-For entry that is not one (the entries left of it are whatever the client
        chose to send, so they are never believed)."""
        peer = str(environ.get("REMOTE_ADDR") or "")
        if not self.trusts(peer):
            return peer
        hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop[:64]
        return hops[0][:64] if hops else peer


def _host_port(value: str) -> tuple[str, int | None] | None:
    """(lower-case host without brackets, explicit port or None) of a Host header; None if it
    is not one."""
    try:
        parts = urlsplit("//" + value.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.path or parts.username is not None or parts.query:
        return None
    return host.rstrip("."), port


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin or Referer; None for "null" or anything unparseable."""
    try:
        parts = urlsplit(url.strip())
        scheme, host = parts.scheme.lower(), parts.hostname
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    if not host or port is None:
        return None
    return scheme, host.rstrip("."), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        return False


def own_names() -> set[str]:
    """The names this machine answers to without any configuration."""
    names = set(LOOPBACK_NAMES)
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower().rstrip("."))
    return names


class Guard:
    """WSGI middleware, outermost: Host check, same-origin check of changes, client address."""

    def __init__(self, app: Callable, http: HttpSettings) -> None:
        self.app = app
        allowed = http.allowed_hosts
        self.any_host = "*" in allowed
        # Why these are safe by default: DNS rebinding needs a name the attacker controls that
        # resolves to us, and the browser then sends that name as Host. Loopback names and
        # this machine's own names are not the attacker's; an IP literal is no DNS name at all
        # (a page served from http://IP:PORT is this server itself), so a LAN install reached
        # by address works on day one. A reverse proxy's public name must be added.
        self.names = own_names() | {h for h in allowed if not h.startswith(".")}
        self.domains = tuple(h for h in allowed if h.startswith("."))
        self.proxies = Proxies(http.trusted_proxies)
        self.cors = {o for o in (_origin(c) for c in http.cors_origins if c != "*") if o}
        # (client, kind) -> (since, lines logged, refusals not logged)
        self._logged: dict[tuple[str, str], tuple[float, int, int]] = {}
        self._lock = threading.Lock()

    def host_allowed(self, host: str) -> bool:
        return (self.any_host or host in self.names or _is_ip(host)
                or any(host.endswith(d) or host == d[1:] for d in self.domains))

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        environ["pacsd.client"] = self.proxies.client(environ)
        trusted = self.proxies.trusts(str(environ.get("REMOTE_ADDR") or ""))
        scheme = str(environ.get("wsgi.url_scheme") or "http")
        hosts = [("Host", environ.get("HTTP_HOST", ""), scheme)]
        if trusted and environ.get("HTTP_X_FORWARDED_HOST"):
            proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
            hosts.append(("X-Forwarded-Host",
                          environ["HTTP_X_FORWARDED_HOST"].split(",")[0].strip(),
                          proto if proto in DEFAULT_PORTS else scheme))
        own: set[tuple[str, str, int]] = set()
        for header, value, sch in hosts:
            if not value:   # HTTP/1.0 without Host: no browser, no rebinding
                continue
            parsed = _host_port(value)
            if parsed is None or not self.host_allowed(parsed[0]):
                return self._refuse(environ, start_response, "421 Misdirected Request", "host",
                                    f"{header} {value[:200]!r} does not name this server "
                                    "(see [http] allowed_hosts)")
            host, port = parsed
            own.add((sch, host, port or DEFAULT_PORTS[sch]))
            if port is None:
                # Reached on a default port (often through a proxy): either scheme's default.
                own.update((s, host, p) for s, p in DEFAULT_PORTS.items())
        if environ.get("REQUEST_METHOD", "GET") not in SAFE_METHODS:
            reason = self._cross_site(environ, own)
            if reason:
                return self._refuse(environ, start_response, "403 Forbidden", "origin", reason)
        return self.app(environ, start_response)

    def _cross_site(self, environ: dict[str, Any], own: set[tuple[str, str, int]]) -> str:
        """Why this change may come from another site's page; "" if it may not."""
        if not own:   # no Host: compare with where we listen
            scheme = str(environ.get("wsgi.url_scheme") or "http")
            own = {(scheme, str(environ.get("SERVER_NAME", "")).lower(),
                    int(environ.get("SERVER_PORT") or DEFAULT_PORTS.get(scheme, 80)))}
        for header in ("HTTP_ORIGIN", "HTTP_REFERER"):
            value = environ.get(header)
            if value:
                origin = _origin(value)
                if origin is not None and (origin in own or origin in self.cors):
                    return ""
                name = "Origin" if header == "HTTP_ORIGIN" else "Referer"
                return (f"{name} {value[:200]!r} is neither this server nor one of "
                        "[http] cors_origins")
        ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if (environ.get("REQUEST_METHOD") == "POST" and ctype in FORM_TYPES
                and not environ.get("HTTP_X_REQUESTED_WITH")):
            return (f"a POST with Content-Type {ctype or 'none'!r} and neither Origin nor "
                    "Referer may come from another site's form; clients send their own type "
                    "(text/xml, application/json, ...) or X-Requested-With")
        return ""

    def _refuse(self, environ: dict[str, Any], start_response: Callable, status: str,
                kind: str, reason: str) -> list[bytes]:
        method, path = environ.get("REQUEST_METHOD", "?"), environ.get("PATH_INFO", "")
        client = client_of(environ)
        quiet = self._quiet(client, kind)
        if quiet is not None:
            more = f" ({quiet} more like it not logged before)" if quiet else ""
            log.warning("HTTP %s %s from %s refused: %s%s", method, path[:200], client, reason,
                        more)
        if path.startswith("/api/"):
            body = json.dumps({"error": reason}).encode()
            ctype = "application/json"
        else:
            body = f"{status}: {reason}\n".encode()
            ctype = "text/plain; charset=utf-8"
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    def _quiet(self, client: str, kind: str) -> int | None:
        """None: do not log this refusal; else how many went unlogged in the minute before.
        At most LOG_BURST lines per client and kind a minute: a page retrying in a loop must
        not fill the disk."""
        key, now = (client, kind), time.monotonic()
        with self._lock:
            if len(self._logged) > 1000:
                self._logged.clear()
            entry = self._logged.get(key)
            if entry is None or now - entry[0] > LOG_EVERY_S:
                self._logged[key] = (now, 1, 0)
                return entry[2] if entry else 0
            since, count, dropped = entry
            if count >= LOG_BURST:
                self._logged[key] = (since, count, dropped + 1)
                return None
            self._logged[key] = (since, count + 1, dropped)
            return 0
