"""Audit records to a syslog collector (an ATNA Audit Record Repository), as the DICOM audit
message (PS3.15 A.5) in RFC 5424 syslog messages: over UDP one message per datagram
(RFC 5426), over TCP or TLS each message framed by its length (octet counting, RFC 5425 4.3 /
RFC 6587 3.4.1).

The sender has its own thread and a bounded queue: a collector that is down or slow never
blocks the server nor grows its memory (the oldest waiting messages are dropped, counted). One
log line says when the collector goes away, one when it is back; the files under DATA/audit
stay the record of everything.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any

from pacsd.audit.record import iso, to_xml

log = logging.getLogger(__name__)

PENDING_MAX = 1000
RETRY_S = 5.0
CONNECT_TIMEOUT_S = 5.0
UDP_MAX = 60_000
# RFC 5424 PRI: facility 10 (security/authorization, authpriv) x 8 + severity: 5 notice for a
# success, 4 warning for a failure.
FACILITY = 10
BOM = b"\xef\xbb\xbf"


def split_target(target: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port") -> (host, port); ValueError with what a good one is."""
    host, sep, port = target.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target!r} is not HOST:PORT (e.g. audit.example.org:6514)")
    return host, int(port)


def frame(rec: dict[str, Any], source_id: str, hostname: str, app: str = "pacsd") -> bytes:
    """One RFC 5424 message: HEADER, no structured data, the A.5 XML as MSG (UTF-8, BOM)."""
    pri = FACILITY * 8 + (5 if rec.get("outcome") == "ok" else 4)
    # TIMESTAMP: RFC 3339 with its offset; HOSTNAME, APP-NAME, PROCID, MSGID: printable ASCII
    header = (f"<{pri}>1 {rec.get('time') or iso(time.time())} {hostname[:255] or '-'} "
              f"{app} {os.getpid()} IHE+RFC-3881 - ")
    return header.encode("ascii", "replace") + BOM + to_xml(rec, source_id).encode("utf-8")


class SyslogSender:
    def __init__(self, target: str, protocol: str, ca_file: str, source_id: str) -> None:
        self.host, self.port = split_target(target)
        self.protocol = protocol
        self.ca_file = ca_file
        self.source_id = source_id
        self.hostname = socket.gethostname().split(".")[0] or "-"
        self.dropped = 0
        self.sent = 0
        self._pending: collections.deque[dict[str, Any]] = collections.deque(maxlen=PENDING_MAX)
        self._cond = threading.Condition()
        self._stop = False
        self._sock: socket.socket | None = None
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    @property
    def where(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"

    def send(self, rec: dict[str, Any]) -> None:
        """Queue one record; never blocks (beyond PENDING_MAX the oldest is dropped)."""
        with self._cond:
            if len(self._pending) == PENDING_MAX:
                self.dropped += 1
            self._pending.append(rec)
            self._cond.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after sending what waits, if the collector takes it within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and self._down_since is None and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._disconnect()

    def _connect(self) -> socket.socket:
        if self.protocol == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        if self.protocol == "tls":
            ctx = ssl.create_default_context(cafile=self.ca_file or None)
            try:
                raw = ctx.wrap_socket(raw, server_hostname=self.host)
            except BaseException:
                raw.close()
                raise
        raw.settimeout(CONNECT_TIMEOUT_S)
        return raw

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _transmit(self, rec: dict[str, Any]) -> None:
        msg = frame(rec, self.source_id, self.hostname)
        if self._sock is None:
            self._sock = self._connect()
        if self.protocol == "udp":
            self._sock.send(msg[:UDP_MAX])
        else:
            self._sock.sendall(str(len(msg)).encode() + b" " + msg)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                rec = self._pending[0]
            try:
                self._transmit(rec)
            except (OSError, ValueError) as e:
                self._disconnect()
                if self._down_since is None:
                    self._down_since = time.time()
                    log.warning("audit: the syslog collector %s is unreachable (%s); records "
                                "are kept in the audit files and sent once it is back (at most "
                                "the last %d)", self.where, e, PENDING_MAX)
                with self._cond:
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._stop, RETRY_S)
                continue
            with self._cond:
                if self._pending and self._pending[0] is rec:
                    self._pending.popleft()
                self.sent += 1
                self._cond.notify_all()
            if self._down_since is not None:
                log.warning("audit: the syslog collector %s is back (unreachable for %.0f s, "
                            "%d record(s) dropped meanwhile)", self.where,
                            time.time() - self._down_since, self.dropped)
                self._down_since = None
