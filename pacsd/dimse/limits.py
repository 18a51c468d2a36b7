"""A bound on the PDUs a peer may send us (PS3.8 9.3, Annex D.1).

pynetdicom reads every PDU whole into memory before decoding it, for whatever length its header
announces (up to 4 GiB), and never compares that length with the Maximum Length we announced in
the A-ASSOCIATE-AC. A peer could so make us buffer gigabytes per association. We look at each PDU
header as it arrives and abort the association (A-ABORT, then close) when the length announced
is more than we allow, before reading any of the body.

The same socket also reads a PDU body in few large reads: pynetdicom reads 4 KiB at a time, 128
system calls (and GIL hand-overs) for one 512 KiB CT slice. And it acknowledges what arrives at
once (TCP_QUICKACK, Linux): DCMTK's programs, unless TCP_NODELAY=1 is in their environment,
write a PDU's header and its PDV in two writes, and the second waits for our ACK of the first
(Nagle), which the kernel delays by 40 ms when we have nothing to send. Measured: a C-ECHO from
echoscu 67 -> 21 ms, a C-FIND from findscu 89 -> 47 ms.

A SAFETY patch of pynetdicom: the socket's class is swapped at run time and follows how the DUL
reads a PDU; pacsd.compat.pynetdicom (PDU_BOUND) checks both, and `pacsd serve` refuses to
start when the installed pynetdicom no longer fits.
"""

from __future__ import annotations

import logging
import socket
import struct

from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket

from pacsd.compat.pynetdicom import adopt_socket

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))
# PS3.7 D.1: Maximum Length Received bounds the variable field of a P-DATA-TF PDU. Some peers
# count only the PDV data against it, so we allow one PDV item header (6 bytes) on top.
PDV_HEADER = 6
# Every other PDU (association negotiation, release, abort) is small; 1 MiB leaves room for a
# request with 128 contexts of many transfer syntaxes and a large user identity item.
OTHER_PDU_MAX = 1 << 20
# A-ABORT (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value).
ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


class BoundedSocket(AssociationSocket):
    """An AssociationSocket that refuses a PDU whose announced length is beyond the limits.

    pynetdicom's DUL reads a PDU as recv(6) (the header), then recv(length) (the body); we follow
    that alternation to know which read is a header."""

    max_p_data: int = 0        # 0: no limit (as `[dicom] max_pdu = 0` says)
    _next_is_body: bool = False

    @classmethod
    def adopt(cls, sock: AssociationSocket, max_pdu: int) -> None:
        adopt_socket(sock, cls).limit(max_pdu)

    def limit(self, max_pdu: int) -> None:
        self.max_p_data = max_pdu + PDV_HEADER if max_pdu else 0
        self._next_is_body = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self._next_is_body:
            self._next_is_body = False
            return self._recv_all(nr_bytes)
        data = self._recv_all(nr_bytes)
        if nr_bytes != 6 or len(data) != 6:
            return data
        pdu_type, _, length = struct.unpack(">BBL", data)
        if pdu_type not in PDU_TYPES:
            return data      # pynetdicom aborts on an unknown type without reading on
        limit = self.max_p_data if pdu_type == P_DATA_TF else OTHER_PDU_MAX
        if limit and length > limit:
            self._refuse(pdu_type, length, limit)
            return bytearray()   # a short header: the DUL takes it as the connection closed
        self._next_is_body = True
        return data

    def _recv_all(self, nr_bytes: int) -> bytearray:
        """What AssociationSocket.recv does (read until `nr_bytes` or the connection closes,
        errors raised), into one buffer with as few reads as the kernel allows."""
        raw = self.socket
        if raw is None:
            return super().recv(nr_bytes)
        buf = bytearray(nr_bytes)
        view, got = memoryview(buf), 0
        with view:
            while got < nr_bytes:
                _quick_ack(raw)   # the kernel leaves quick-ACK mode by itself: set it each time
                n = raw.recv_into(view[got:])
                if not n:
                    break   # closed: the caller sees a short read, as with pynetdicom's
                got += n
        if got < nr_bytes:
            del buf[got:]
        return buf

    def _refuse(self, pdu_type: int, length: int, limit: int) -> None:
        assoc = self.assoc
        log.warning("association from %s (%s) aborted: PDU type 0x%02X announces %d bytes, "
                    "more than the %d we accept", assoc.requestor.ae_title or "?",
                    assoc.requestor.address, pdu_type, length, limit)
        raw = self.socket
        if raw is None:
            return
        try:
            raw.sendall(ABORT_INVALID_PARAMETER)
            # Stop reading: whatever the peer still sends is dropped by the kernel, never
            # buffered by us. The association's thread closes the socket as it ends.
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _quick_ack(raw: socket.socket) -> None:
    if _QUICKACK is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except (OSError, ValueError):   # not TCP (a test's socketpair), or closed
        pass


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)   # Linux only


def bound_pdus(event: Event, max_pdu: int) -> None:
    """EVT_CONN_OPEN handler: make the new association's socket a BoundedSocket."""
    sock = event.assoc.dul.socket
    if sock is not None:
        BoundedSocket.adopt(sock, max_pdu)
