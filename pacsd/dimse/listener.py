"""The DICOM listener: pynetdicom's threaded server, guarded against peers that connect and say
nothing (idle TCP connections, stalled TLS handshakes).

pynetdicom as shipped turns every accepted socket into an Association at once, and counts it
against `maximum_associations` until the ACSE timeout: a few dozen idle connections make real
modalities get "local limit exceeded". With TLS it also runs the handshake in the one accepting
thread, so a single client that never sends its ClientHello stops every new association.

Here a connection is *pending* until its peer has sent a whole A-ASSOCIATE-RQ (PS3.8 9.3.2;
over TLS, where bytes cannot be peeked, its first bytes): the TLS handshake and that wait run in
the connection's own thread, bounded by the ACSE timeout, and only then does pynetdicom see the
connection. Pending
connections never count as associations; their number is capped, and a new one beyond the cap
closes the oldest (a real client speaks within milliseconds of connecting, so the oldest silent
one is the likeliest attacker).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from pacsd.config import Config
from pacsd.errors import ConfigError

log = logging.getLogger(__name__)

# Connections accepted but not yet associated. Each costs a thread and a socket until it speaks
# or its ACSE timeout ends; the cap bounds that cost whatever the peers do.
MAX_PENDING = 256
# A DICOM worker with n associations waits n x this (at most the max) before it accepts.
ACCEPT_DELAY_S, ACCEPT_DELAY_MAX_S = 0.002, 0.02
# An A-ASSOCIATE-RQ proposing every storage class is about 15 KiB.
_MAX_PEEKED = 32 << 10


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The server-side TLS context of [dicom] tls_cert / tls_key / tls_ca, or None for plain
    TCP. A file that cannot be loaded is a ConfigError naming the setting."""
    if not cfg.dicom_tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2   # PS3.15 B.9 (BCP 195)
    try:
        ctx.load_cert_chain(Path(cfg.dicom_tls_cert).expanduser(),
                            Path(cfg.dicom_tls_key).expanduser())
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[dicom] tls_cert / tls_key ({cfg.dicom_tls_cert}, "
                          f"{cfg.dicom_tls_key}): cannot load: {e}") from None
    if cfg.dicom_tls_ca:
        try:
            ctx.load_verify_locations(Path(cfg.dicom_tls_ca).expanduser())
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"[dicom] tls_ca ({cfg.dicom_tls_ca}): cannot load: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED   # clients must show a certificate signed by it
    return ctx


class Listener(ThreadedAssociationServer):
    """ThreadedAssociationServer whose accepting thread only accepts (see the module's doc)."""

    daemon_threads = True

    def __init__(self, *args: Any, inherited: socket.socket | None = None,
                 **kwargs: Any) -> None:
        self._pending: OrderedDict[socket.socket, None] = OrderedDict()
        self._pending_lock = threading.Lock()
        # A DICOM worker (pacsd.daemon.workers) accepts on the socket its supervisor listens
        # on, shared with the other workers: non-blocking, since another may take the
        # connection this one was woken for (socketserver then just loops).
        self._inherited = inherited
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._inherited is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()   # the one socketserver made for us
        self.socket = self._inherited
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._inherited is None:
            super().server_activate()   # already listening otherwise

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Not pynetdicom's, which would do the TLS handshake here, in the accepting thread.
        assert self.socket is not None
        if self._inherited is not None:
            # Every worker is woken by a new connection: the busier one reaches for it later,
            # so the idler one takes it (nginx's accept_disabled, in spirit); connections that
            # have not associated yet count, since clients often connect all at once. Measured
            # with two workers and four associations: 3 and 1 without, CPU 3.5 s and 1.1 s.
            with self._pending_lock:
                busy = len(self.ae.active_associations) + len(self._pending)
            if busy:
                time.sleep(min(ACCEPT_DELAY_MAX_S, ACCEPT_DELAY_S * busy))
        sock, address = self.socket.accept()
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._pending_lock:
            if len(self._pending) >= MAX_PENDING:
                oldest, _ = self._pending.popitem(last=False)
                log.warning("%d connections have not sent an association request yet: closing "
                            "the oldest, from %s", MAX_PENDING, _peer(oldest))
                _shut(oldest)
            self._pending[request] = None
        super().process_request(request, client_address)   # a thread for it

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        sock = self._first_bytes(request, client_address)
        if sock is not None:
            super().process_request_thread(sock, client_address)

    def _first_bytes(self, raw: socket.socket, address: Any) -> socket.socket | None:
        """The connection, TLS-wrapped if configured, once its peer has sent something; None
        (and the socket closed) if it stays silent for the ACSE timeout, fails its handshake
        or was closed to make room."""
        timeout = self.ae.acse_timeout or 30.0
        sock = raw
        try:
            raw.settimeout(timeout)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(raw, server_side=True)
            if isinstance(sock, ssl.SSLSocket):
                spoke = sock.pending() > 0 or bool(select.select([sock], [], [], timeout)[0])
            else:
                spoke = _whole_request(sock, time.monotonic() + timeout)
            if not spoke:
                log.info("connection from %s closed: no association request in %.0f s",
                         address[0], timeout)
                sock = None   # type: ignore[assignment]
        except (OSError, ValueError) as e:   # ssl.SSLError and timeouts are OSErrors
            log.info("connection from %s closed before associating: %s", address[0], e)
            sock = None   # type: ignore[assignment]
        with self._pending_lock:
            evicted = raw not in self._pending   # closed by process_request to make room
            self._pending.pop(raw, None)
        if sock is None or evicted:
            _shut(raw)
            return None
        # A stalled read in the middle of a PDU now ends after network_timeout instead of
        # blocking pynetdicom's reader forever (pynetdicom only select()s before a PDU).
        sock.settimeout(self.ae.network_timeout)
        return sock

    def service_actions(self) -> None:
        # pynetdicom's runs a full gc.collect() every few dozen loops of the accepting thread
        # (one loop per connection, and every half second): measured, a stall of every thread
        # of about 0.5 ms per association on average, often inside a C-STORE. Python's own
        # collector runs anyway; the association objects it was for are freed by it.
        pass

    def server_close(self) -> None:
        with self._pending_lock:
            pending, self._pending = list(self._pending), OrderedDict()
        for s in pending:   # wake their threads now rather than after the ACSE timeout
            _shut(s)
        super().server_close()


def _whole_request(sock: socket.socket, deadline: float) -> bool:
    """Whether the peer sent a whole first PDU before `deadline` (False: silence, a partial PDU,
    or the connection closed). Bytes are only peeked: pynetdicom reads them afterwards.

    SO_RCVLOWAT makes select() wait for as many bytes as we need, instead of waking (and this
    loop spinning) on every segment; Linux caps it at half the receive buffer, far above
    _MAX_PEEKED. A first PDU that is no association request, or a larger one, goes on to
    pynetdicom, which answers or aborts it as the standard says (PS3.8 9.2)."""
    need, seen = 6, -1
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            if not select.select([sock], [], [], remaining)[0]:
                return False
            got = sock.recv(need, socket.MSG_PEEK)
            if len(got) < need:
                if len(got) == seen:   # readable, nothing new: the peer closed
                    return False
                seen = len(got)
                continue
            if need > 6:
                return True
            pdu_type, length = got[0], struct.unpack(">L", got[2:6])[0]
            if pdu_type != 0x01 or length > _MAX_PEEKED:
                return True
            need = 6 + length
        return False
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
