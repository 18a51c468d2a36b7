"""The cheroot server under the web side, hardened against slow clients.

cheroot gives each request a worker thread from a fixed pool ([http] threads) and reads with a
per-read socket timeout ([http] timeout) only: a client that sends a byte every few seconds never
times out and holds its worker for as long as it likes. Three guards, each at the root (the
socket and the selector), so every route (STOW, XML-RPC, the JSON API, plugins) has them:

* Heads: a connection reaches a worker only once its whole request head has arrived; a head
  taking longer than [http] timeout closes the connection (slowloris).
* Bodies: while the application runs, every read of the request body (Content-Length or chunked)
  is held to a deadline that grows with what has arrived, as Apache's mod_reqtimeout does it
  (`body=20,MinRate=500`): the body may take [http] body_timeout seconds, plus one second for
  each [http] body_min_rate bytes received. A body slower than that is cut: the client gets
  408 Request Timeout, the connection is closed, the worker is free, and one line is logged.
* Health: the watchdog's probes (GET/HEAD /testdbalive, and an XML-RPC Ping whose body has
  fully arrived) are answered by a small lane of their own threads, not by the pool, so a pool
  held by slow or long requests never reads as a hang. The lane runs the same application
  (Auth, the request guard, the same /testdbalive that asks the index within 1 s), so it still
  fails when the index or the process is stuck; and it is bounded: when its queue is full,
  probes go to the pool as before, where a real hang still shows.

The body deadline starts when a worker takes the request. A small XML-RPC body (a Ping is
a few hundred bytes) is waited for in the selector, like a head, before any thread takes it:
it is cut there with 408 after [http] body_timeout if it dribbles in.

Why a lane of threads rather than answering in the selector: the probes must go through the same
application as everyone else (authentication, the request guard, the index check within 1 s),
and nothing slow may ever run in the selector thread. The price, accepted: a pool whose every
worker is stuck for ever inside the application no longer fails the watchdog's HTTP probes
(they never need the pool); a stuck index, process, selector or DICOM side still does.

Over TLS the selector cannot peek at the bytes (they are encrypted): heads and the health lane
then work as cheroot does it; the body deadline holds over TLS too.

What this relies on in cheroot is in pacsd.compat.cheroot (HEAD_GUARD, BODY_DEADLINE): when the
installed cheroot no longer fits, that guard is off (one WARNING) and cheroot serves as shipped.
"""

from __future__ import annotations

import logging
import queue
import re
import select
import socket
import sys
import threading
import time
from typing import Any, Literal

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.makefile import MakeFile

from pacsd.compat import cheroot as compat

log = logging.getLogger(__name__)

HEALTH_THREADS = 2      # the watchdog sends three probes a round, one of them DICOM
HEALTH_BACKLOG = 32     # probes waiting for the lane; beyond it they go to the pool
PING_MAX_BYTES = 4096   # an XML-RPC Ping is a few hundred bytes
_HEALTH_GET = re.compile(rb"(GET|HEAD) /testdbalive(\?[^ \r\n]*)? HTTP/1\.[01]\r?\n")
_PING_POST = re.compile(rb"POST /(RPC2)? HTTP/1\.[01]\r?\n")
_PING_BODY = re.compile(rb"<methodName>\s*Ping\s*</methodName>")
_LENGTH = re.compile(rb"\r?\ncontent-length:[ \t]*(\d{1,9})[ \t]*\r?\n", re.I)
_CHUNKED = re.compile(rb"\r?\ntransfer-encoding:", re.I)


class BodyTooSlow(socket.timeout):
    """A request body arrived slower than the floor. A socket timeout to cheroot (args[0] is
    the text it recognises), so that a read outside the application ends the connection too."""

    def __init__(self) -> None:
        super().__init__("timed out")


class _Deadline:
    """The body deadline of one request: `timeout` s plus 1 s per `rate` bytes received."""

    def __init__(self, timeout: float, rate: int) -> None:
        self.started = time.monotonic()
        self.timeout, self.rate = timeout, rate
        self.received = 0
        self.tripped = False

    def due(self) -> float:
        return self.started + self.timeout + (self.received / self.rate if self.rate else 0.0)


class _DeadlineSocketIO(socket.SocketIO):
    """The raw socket reader under cheroot's buffered reader: when a body deadline is armed,
    each recv waits at most until the deadline (never longer than the idle timeout)."""

    def __init__(self, sock: socket.socket, mode: Literal["rb", "wb", "rwb"]) -> None:
        super().__init__(sock, mode)
        self.sock = sock
        self.deadline: _Deadline | None = None

    def readinto(self, b: Any) -> int | None:  # type: ignore[override]
        d = self.deadline
        if d is None:
            return super().readinto(b)
        idle = self.sock.gettimeout()
        left = d.due() - time.monotonic()
        if left <= 0:
            d.tripped = True
            raise BodyTooSlow()
        bound = left < (idle or float("inf"))
        self.sock.settimeout(left if bound else idle)
        try:
            n = super().readinto(b)
        except TimeoutError:
            if bound:
                d.tripped = True
                raise BodyTooSlow() from None
            raise
        finally:
            self.sock.settimeout(idle)
        d.received += n or 0
        return n


def _body_reader(sock: socket.socket, mode: str = "rb",
                 bufsize: int = compat.DEFAULT_BUFFER_SIZE) -> compat.RawStreamReader:
    """cheroot's socket reader, over the deadline-aware raw reader."""
    return compat.RawStreamReader(_DeadlineSocketIO(sock, "rwb" if "w" in mode else "rb"),
                                  bufsize)


class _Connection(cheroot_server.HTTPConnection):
    """A connection whose reads can be held to a body deadline (plain and TLS alike)."""

    def __init__(self, server: Any, sock: Any, makefile: Any = MakeFile) -> None:
        deadline = compat.BODY_DEADLINE.fits

        def files(s: Any, mode: str = "r", bufsize: int = compat.DEFAULT_BUFFER_SIZE) -> Any:
            if "r" in mode and deadline:
                return _body_reader(s, mode, bufsize)
            return makefile(s, mode, bufsize)
        super().__init__(server, sock, files)


class _QuietOnceCut:
    """wsgi.errors that drops what is written after the body deadline tripped."""

    def __init__(self, stream: Any, deadline: _Deadline) -> None:
        self.stream, self.deadline = stream, deadline

    def write(self, text: str) -> Any:
        return None if self.deadline.tripped else self.stream.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()


class _Gateway(wsgi.Gateway_10):
    """WSGI 1.0, with the body deadline armed while the application runs, and a 408 in place of
    whatever the application made of a body that came too slowly."""

    def respond(self) -> None:
        req = self.req
        raw = getattr(req.conn.rfile, "raw", None)
        has_body = req.chunked_read or int(req.inheaders.get(b"Content-Length", 0) or 0) > 0
        if not isinstance(raw, _DeadlineSocketIO) or not has_body:
            super().respond()
            return
        srv = req.server
        d = raw.deadline = _Deadline(srv.body_timeout, srv.body_min_rate)
        # What the application makes of the cut (bottle prints a traceback for a 500) is not
        # news: the one line about it is ours.
        self.env["wsgi.errors"] = _QuietOnceCut(self.env["wsgi.errors"], d)
        response: Any = None
        try:
            try:
                response = srv.wsgi_app(self.env, self.start_response)
                self._drain()
            except BodyTooSlow:
                pass
            if d.tripped:
                response = self._too_slow(d, response)
            for chunk in filter(None, response):
                if not isinstance(chunk, bytes):
                    raise ValueError("WSGI Applications must yield bytes")
                self.write(chunk)
        finally:
            raw.deadline = None
            req.ensure_headers_sent()
            if hasattr(response, "close"):
                response.close()

    def _drain(self) -> None:
        """Read what the application left of a Content-Length body, under the deadline. cheroot
        would do it itself (to keep the connection) while sending the headers, where a body
        too slow could only end the connection without a word."""
        rfile = self.req.rfile
        if (getattr(self.req, "status", b"") or b"")[:3] == b"413":
            return   # cheroot closes the connection after a 413 instead of reading on
        while getattr(rfile, "remaining", 0) > 0 and not self.req.close_connection:
            if not rfile.read(min(rfile.remaining, 1 << 16)):
                break

    def _too_slow(self, d: _Deadline, response: Any) -> list[bytes]:
        """Drop the application's answer (made from a body that never came) for a 408."""
        req = self.req
        req.close_connection = True
        if hasattr(response, "close"):
            response.close()
        env = self.env
        log.warning("HTTP %s %s from %s: request body too slow (%d bytes in %.1f s; the floor is "
                    "%d bytes/s after %g s): 408, connection closed", env.get("REQUEST_METHOD"),
                    ascii(env.get("SCRIPT_NAME", "") + env.get("PATH_INFO", "")), env.get("REMOTE_ADDR", "?"), d.received,
                    time.monotonic() - d.started, d.rate, d.timeout)
        if req.sent_headers:
            return []   # too late for a status: closing the connection says it
        body = b"408 Request Timeout: the request body arrived too slowly.\n"
        req.outheaders = []   # the application's headers go with its answer
        self.remaining_bytes_out = None
        try:
            raise BodyTooSlow()
        except BodyTooSlow:   # start_response may replace the status only with exc_info
            self.start_response("408 Request Timeout", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))), ("Connection", "close")], sys.exc_info())
        return [body]


class _HealthLane:
    """A few threads of their own for the health probes: what the pool's workers do with a
    connection (cheroot's WorkerThread), for requests whose whole head (and body) has arrived."""

    def __init__(self, server: Any, threads: int = HEALTH_THREADS) -> None:
        self.server = server
        self.queue: queue.Queue[Any] = queue.Queue(HEALTH_BACKLOG)
        self.size = threads
        self.threads: list[threading.Thread] = []
        self.full_since: float | None = None

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, name=f"http-health-{i}", daemon=True)
                        for i in range(self.size)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        for _ in self.threads:
            try:
                self.queue.put(None, timeout=1)
            except queue.Full:
                break

    def put(self, conn: Any) -> bool:
        try:
            self.queue.put_nowait(conn)
        except queue.Full:
            if self.full_since is None:   # once per streak: a flood of probes, or a stuck lane
                log.warning("HTTP health lane full (%d waiting): health probes go to the worker "
                            "pool until it drains", HEALTH_BACKLOG)
                self.full_since = time.monotonic()
            return False
        if self.full_since is not None and self.queue.qsize() < HEALTH_BACKLOG // 2:
            log.info("HTTP health lane drained")
            self.full_since = None
        return True

    def _run(self) -> None:
        while True:
            conn = self.queue.get()
            if conn is None:
                return
            keep = False
            try:
                keep = bool(conn.communicate())
            except Exception:  # noqa: BLE001 - one bad connection must not end the lane
                log.exception("HTTP health lane: request failed")
            if keep:
                self.server.put_conn(conn)
            else:
                conn.close()


def is_health_probe(head: bytes) -> bool:
    """Whether peeked bytes hold a whole health probe: GET/HEAD /testdbalive without a body, or
    an XML-RPC Ping (POST /RPC2 or /) whose small body has fully arrived."""
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return False
    start, body = head[:end + 2], head[end + 4:]
    if _CHUNKED.search(start):
        return False
    length = _LENGTH.search(start)
    if _HEALTH_GET.match(start):
        return length is None or length.group(1).strip(b"0") == b""
    if _PING_POST.match(start) and length is not None:
        n = int(length.group(1))
        return n <= PING_MAX_BYTES and len(body) >= n and bool(_PING_BODY.search(body[:n]))
    return False


def small_body_pending(head: bytes) -> int:
    """For a possible XML-RPC Ping (POST /RPC2 or / with a small Content-Length) whose body has
    not fully arrived: how many bytes head and body make together; else 0. The selector waits
    for them (as for a head): clients send the head and the body in two writes."""
    end = head.find(b"\r\n\r\n")
    if end < 0 or not _PING_POST.match(head):
        return 0
    start = head[:end + 2]
    length = _LENGTH.search(start)
    if length is None or _CHUNKED.search(start) or re.search(rb"\nexpect:", start, re.I):
        return 0
    total = end + 4 + int(length.group(1))
    return total if int(length.group(1)) <= PING_MAX_BYTES and len(head) < total else 0


class PacsdServer(wsgi.Server):
    """cheroot with the three guards of this module (heads, bodies, health lane)."""

    ConnectionClass = _Connection

    def __init__(self, *args: Any, body_timeout: float = 20.0, body_min_rate: int = 500,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway = _Gateway
        self.body_timeout, self.body_min_rate = body_timeout, body_min_rate
        self.lane = _HealthLane(self)

    def prepare(self) -> None:
        super().prepare()
        if not any(t.is_alive() for t in self.lane.threads):
            self.lane.start()

    def stop(self) -> None:
        self.lane.stop()
        super().stop()

    def process_conn(self, conn: Any) -> None:
        if self.ssl_adapter is None and compat.HEAD_GUARD.fits and not conn.rfile.has_data():
            head = self._head_ready(conn)
            if head is None:
                return
            conn.pacsd_head_since = None
            if is_health_probe(head) and self.lane.put(conn):
                return
        conn.pacsd_head_since = None
        super().process_conn(conn)

    def _head_ready(self, conn: Any) -> bytes | None:
        """The bytes waiting on the connection once they hold a whole request head (or it is
        closed, or too long: the worker answers); None while it is incomplete (the connection
        went back to the selector, or was closed after [http] timeout).

        cheroot gives every new (or readable keep-alive) connection to a worker at once, and the
        worker blocks reading the request line and headers: `threads` clients sending their
        heads a byte at a time (slowloris), or nothing at all, would hold every worker. Here the
        selector thread peeks; until the blank line ending the head is there, the connection
        goes back to the selector, woken only when more bytes arrive (SO_RCVLOWAT).
        """
        sock = conn.socket
        limit = self.max_request_header_size + 4
        try:
            # select() first: the socket has a timeout, so recv() would wait for data.
            readable = select.select([sock], [], [], 0)[0]
            head = sock.recv(limit, socket.MSG_PEEK) if readable else b""
        except OSError:
            return b""   # let the worker meet the error and close the connection
        pending = 0
        if readable:
            pending = small_body_pending(head)
            # Readable with nothing new since the last peek: the client closed its side (EOF).
            ended = len(head) <= getattr(conn, "pacsd_peeked", -1)
            if ended or not 0 < pending <= limit and (not head or b"\r\n\r\n" in head
                                                       or b"\n\n" in head or len(head) >= limit):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                conn.pacsd_peeked = -1
                return head   # the worker reads it (and meets the end of it)
        now = time.monotonic()
        since = getattr(conn, "pacsd_head_since", None) or now
        if pending and now - since > self.body_timeout:
            # A small body (a Ping?) waited for here, dribbling in: the same floor as in a worker.
            self._refuse_slow_body(conn, head, now - since)
            return None
        if now - since > self.timeout:
            log.info("HTTP client %s closed: no complete request head in %.0f s",
                     getattr(conn, "remote_addr", "?"), self.timeout)
            conn.close()
            return None
        conn.pacsd_head_since, conn.pacsd_peeked = since, len(head)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(head) + 1)
        # Back to the selector, which expires the connection if silent.
        compat.back_to_selector(self, conn)
        return None

    def _refuse_slow_body(self, conn: Any, head: bytes, waited: float) -> None:
        request_line = head.split(b"\r\n", 1)[0][:80].decode("latin-1")
        log.warning("HTTP %s from %s: request body too slow (%d bytes in %.1f s): 408, "
                    "connection closed", ascii(request_line), getattr(conn, "remote_addr", "?"),
                    len(head), waited)
        body = b"408 Request Timeout: the request body arrived too slowly.\n"
        try:   # a few bytes on an idle socket: never blocks the selector
            conn.socket.send(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; "
                             b"charset=utf-8\r\nConnection: close\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body, socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()
