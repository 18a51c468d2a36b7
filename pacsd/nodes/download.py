"""Fetch one DICOM file over HTTP from a configured node (XML-RPC `DownloadURL`).

A URL from the network, so every step is bounded: http/https only; the host must be the host
of a configured node (compared as written, case-insensitively: no DNS, so a name that merely
resolves to a node is not enough); redirects are never followed (a node's redirect could point
anywhere); the body is read up to `max_bytes` into a temporary file, within `timeout` seconds
in all; and it must be a DICOM Part 10 file ("DICM" at byte 128, PS3.10 7.1).
"""

from __future__ import annotations

import http.client
import ssl
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Iterable

from pacsd.config import Node
from pacsd.errors import PacsError

CHUNK = 1 << 16


class DownloadRefused(PacsError):
    """The URL is not one we fetch (scheme, host), or what it answered is not a DICOM file."""

    http_status = 400


class NotANodeHost(DownloadRefused):
    """The URL's host is not the host of any configured node."""


def check_url(url: str, nodes: Iterable[Node]) -> urllib.parse.SplitResult:
    """The parsed URL when it is http(s) to a configured node's host; else DownloadRefused."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port   # raises ValueError on a bad port
    except ValueError as e:
        raise DownloadRefused(f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise DownloadRefused(f"only http and https URLs are fetched, not {parts.scheme!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise DownloadRefused("the URL has no host")
    if parts.username or parts.password:
        raise DownloadRefused("credentials in the URL are not accepted")
    if host not in {n.host.lower() for n in nodes}:
        raise NotANodeHost(f"host {host!r} is not the host of a configured node")
    return parts


def fetch(parts: urllib.parse.SplitResult, dest_dir: Path, max_bytes: int, timeout: float
          ) -> Path:
    """GET the URL into a new file in `dest_dir` and return it: a 200 answer of at most
    `max_bytes`, read within `timeout` seconds, holding a DICOM Part 10 file."""
    deadline = time.monotonic() + timeout
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        # http.client never follows redirects: a 3xx is refused below.
        conn.request("GET", target, headers={"Accept": "application/dicom, */*",
                                             "User-Agent": "pacsd DownloadURL"})
        rsp = conn.getresponse()
        if rsp.status != 200:
            where = f" to {rsp.getheader('Location', '')[:200]!r}" if 300 <= rsp.status < 400 \
                else ""
            raise DownloadRefused(f"answered HTTP {rsp.status}{where}; redirects are not "
                                  "followed" if where else f"answered HTTP {rsp.status}")
        length = rsp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise DownloadRefused(f"the body ({int(length)} bytes) is larger than the limit "
                                  f"of {max_bytes} bytes")
        out = tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".download-", suffix=".dcm",
                                          delete=False)
        path = Path(out.name)
        try:
            with out:
                got = 0
                while True:
                    if time.monotonic() > deadline:
                        raise DownloadRefused(f"not done within {timeout:g} s")
                    chunk = rsp.read(CHUNK)
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > max_bytes:
                        raise DownloadRefused(f"the body is larger than the limit of "
                                              f"{max_bytes} bytes")
                    out.write(chunk)
            with open(path, "rb") as f:
                head = f.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                raise DownloadRefused(f"not a DICOM Part 10 file ({got} bytes of "
                                      f"{rsp.getheader('Content-Type', 'unknown type')[:80]})")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    except (OSError, http.client.HTTPException) as e:
        raise DownloadRefused(f"could not be fetched: {e}") from None
    finally:
        conn.close()
