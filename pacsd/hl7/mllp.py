"""The HL7 listener: MLLP (HL7 v2.5 Appendix C.4, the Minimal Lower Layer Protocol) over TCP,
bounded in every way a sender can push it.

A message is framed 0x0B <message> 0x1C 0x0D; a connection carries any number of messages, one
at a time, each answered with its ACK (original mode) before the next is read. One thread per
connection, at most [hl7] max_connections; a connection from outside [hl7] allowed_networks,
or beyond the limit, is closed at once. Refused, each with one log line (the connection
closed):

  bytes outside a frame (an HTTP request, a TLS hello, a stray byte)    closed at once
  a message longer than [hl7] max_message_kb       AR (when its MSH can be read), then closed
  silence, or a message left unfinished, for [hl7] idle_timeout       closed
  a new frame begun inside one (a truncated message)    the unfinished one dropped, the new
                                                         one read

CR and LF between frames are tolerated (some senders end a frame with 0x1C 0x0D 0x0A), and a
frame ended by 0x1C alone too. Nothing a peer sends raises out of its thread.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from typing import Protocol

from pacsd.config.sections import Hl7Settings
from pacsd.config.validators import normal_address
from pacsd.errors import PortInUse
from pacsd.plugins.hl7 import END, START

log = logging.getLogger(__name__)

VT, FS, CR, LF = 0x0B, 0x1C, 0x0D, 0x0A
_FRAME_BYTES = re.compile(b"[\x0b\x1c]")
ACCEPT_POLL_S = 0.5       # how soon the accepting thread sees a stop
DRAIN_S = 10.0            # after an AR for a long message: its rest read (and dropped) so
DRAIN_MAX = 256 << 20     # that the sender reads the AR, within these bounds
HEAD_KEPT = 65536         # bytes of a too-long message kept to read its MSH


class Answers(Protocol):
    """What the listener asks of pacsd.hl7.apply.Receiver."""

    def answer(self, raw: bytes, peer: str) -> bytes: ...

    def too_large(self, head: bytes, limit_kb: int, peer: str) -> bytes: ...


class MllpListener:
    """start() binds and accepts in a thread; port is the bound one (port 0: a free one);
    stop() closes the port and every connection, waiting a bounded time for their threads."""

    def __init__(self, settings: Hl7Settings, receiver: Answers) -> None:
        self.settings = settings
        self.receiver = receiver
        self._networks = [ipaddress.ip_network(n, strict=False)
                          for n in settings.allowed_networks]
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[socket.socket, threading.Thread] = {}
        self._full = False          # the connection limit was reached (logged once)
        self._refused_full = 0
        self.served = 0             # messages answered, for status and tests

    # --- life ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        bind = self.settings.bind
        return {"": "0.0.0.0", "localhost": "127.0.0.1"}.get(bind, bind)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1]) if self._sock is not None else 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._active)

    def start(self, port: int | None = None) -> "MllpListener":
        """Bind ([hl7] port, or `port`) and accept. PortInUse when the port cannot be had."""
        host = self.host
        port = self.settings.port if port is None else port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise PortInUse(f"cannot listen for HL7 on {host}:{port}: "
                            f"{e.strerror or e}") from None
        sock.settimeout(ACCEPT_POLL_S)
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="hl7-accept",
                                        daemon=True)
        self._thread.start()
        log.info("HL7 listener on %s:%d (MLLP)", host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(ACCEPT_POLL_S * 4)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            active = list(self._active.items())
        for conn, _ in active:   # wakes their threads (a message being applied finishes first)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        log.info("HL7 listener stopped")

    # --- accepting ----------------------------------------------------------------------------

    def _allowed(self, ip: str) -> bool:
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in n for n in self._networks)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        listening = self._sock
        while not self._stopping.is_set():
            try:
                conn, addr = listening.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    return
                # Out of file descriptors and the like: wait a little rather than spin.
                log.warning("hl7: accepting a connection failed: %s", e)
                self._stopping.wait(0.5)
                continue
            try:
                self._admit(conn, normal_address(str(addr[0])))
            except Exception:  # noqa: BLE001 - the accepting thread must live on
                log.exception("hl7: a new connection could not be served")
                conn.close()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        if not self._allowed(peer):
            log.warning("hl7: connection from %s refused: not in [hl7] allowed_networks", peer)
            conn.close()
            return
        with self._lock:
            if len(self._active) >= self.settings.max_connections:
                self._refused_full += 1
                first = not self._full
                self._full = True
            else:
                first = False
                thread = threading.Thread(target=self._serve, args=(conn, peer),
                                          name=f"hl7-{peer}", daemon=True)
                self._active[conn] = thread
                thread.start()
                return
        if first:
            log.warning("hl7: [hl7] max_connections = %d connections are open; refusing new "
                        "ones (from %s first) until one ends", self.settings.max_connections,
                        peer)
        conn.close()

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            self._active.pop(conn, None)
            if self._full and len(self._active) < self.settings.max_connections:
                refused, self._full, self._refused_full = self._refused_full, False, 0
            else:
                refused = 0
        if refused:
            log.info("hl7: below [hl7] max_connections again; %d connection(s) were refused "
                     "meanwhile", refused)

    # --- one connection -----------------------------------------------------------------------

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._session(conn, peer)
        except OSError as e:
            log.info("hl7: connection from %s ended: %s", peer, e.strerror or e)
        except Exception:  # noqa: BLE001 - never out of the thread
            log.exception("hl7: connection from %s failed", peer)
        finally:
            try:
                conn.close()
            finally:
                self._release(conn)

    def _session(self, conn: socket.socket, peer: str) -> None:
        limit = self.settings.max_message_kb * 1024
        idle = self.settings.idle_timeout
        frame: bytearray | None = None     # the message being received, after its 0x0B
        began = last = time.monotonic()
        while not self._stopping.is_set():
            left = (began if frame is not None else last) + idle - time.monotonic()
            if left <= 0:
                if frame is not None:
                    log.warning("hl7: connection from %s closed: a message left unfinished "
                                "for [hl7] idle_timeout = %g s (%d bytes dropped)", peer, idle,
                                len(frame))
                else:
                    log.debug("hl7: connection from %s closed after %g s of silence", peer,
                              idle)
                return
            conn.settimeout(left)
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                if frame:
                    log.warning("hl7: connection from %s closed in the middle of a message "
                                "(%d bytes, no end of frame): dropped", peer, len(frame))
                return
            i = 0
            while i < len(data):
                if frame is None:   # between frames
                    byte = data[i]
                    i += 1
                    if byte == VT:
                        frame, began = bytearray(), time.monotonic()
                    elif byte not in (CR, LF):
                        log.warning("hl7: connection from %s closed: it sent bytes that are "
                                    "not MLLP (a message begins with 0x0B; got %r)", peer,
                                    bytes(data[i - 1:i + 15]))
                        return
                    continue
                found = _FRAME_BYTES.search(data, i)
                end = found.start() if found else len(data)
                frame += data[i:end]
                i = end
                if len(frame) > limit:
                    self._refuse_long(conn, bytes(frame[:HEAD_KEPT]), peer)
                    return
                if found is None:
                    break
                i = end + 1
                if data[end] == VT:
                    log.warning("hl7: from %s, a new message began before the last one ended "
                                "(0x1C 0x0D missing): the unfinished one (%d bytes) dropped",
                                peer, len(frame))
                    frame, began = bytearray(), time.monotonic()
                    continue
                if i < len(data) and data[i] == CR:
                    i += 1
                message, frame = bytes(frame), None
                reply = self.receiver.answer(message, peer)
                self.served += 1
                conn.settimeout(idle)
                conn.sendall(START + reply + END)
                last = time.monotonic()

    def _refuse_long(self, conn: socket.socket, head: bytes, peer: str) -> None:
        """AR for a message over the limit, then its rest read and dropped (bounded), so that
        the sender, still sending, gets to read the AR before the connection closes."""
        reply = self.receiver.too_large(head, self.settings.max_message_kb, peer)
        conn.settimeout(min(self.settings.idle_timeout, DRAIN_S))
        conn.sendall(START + reply + END)
        conn.shutdown(socket.SHUT_WR)
        deadline, drained = time.monotonic() + DRAIN_S, 0
        while drained < DRAIN_MAX and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(min(left, self.settings.idle_timeout))
            try:
                data = conn.recv(1 << 20)
            except (TimeoutError, OSError):
                return
            if not data:
                return
            drained += len(data)
