"""The fast lane: C-STORE and C-ECHO answered by the thread that reads the association.

pynetdicom carries every PDU of a data set through its state machine (two event triggers, a
decoded PDU object, two queues), reassembles the message fragment by fragment, decodes the
command set into a pydicom Dataset, hands the message to the association's other thread, and
encodes the response from a Dataset again. A CT image in 16 KiB PDUs is 32 turns of that.

Here, once an association we accepted is in data transfer (Sta6), its DUL thread reads each
P-DATA-TF itself and splits it into its PDV items (PS3.8 9.3.5). A message whose command set
the `Fast` side wants (pacsd.dimse.fast: a C-STORE on a storage context, a C-ECHO) is gathered
here and answered here, its response packed by hand (pacsd.dimse.commands) and sent on the same
socket. Everything else (C-FIND, C-GET, C-MOVE, N-ACTION, the C-STORE-RSPs of a C-GET, a
release, an abort) is handed to pynetdicom exactly as it would have read it, one PDU after the
other, so its state machine and services see what they always saw. A message is routed whole:
its command set decides, before any of it reaches pynetdicom.

A peer that breaks the message framing in a message we took (a data fragment first, a command
fragment inside a data set, another context) gets the association aborted as pynetdicom does
for an invalid PDU (Evt19: A-ABORT, then close); nothing of that message was acknowledged.

What this relies on in pynetdicom (the DUL's `_read_pdu_data` tail: `_decode_pdu`, its event
and PDU queues; `Association._accepted_cx`) is checked by LANE; when it no longer fits, no
lane is opened and pynetdicom carries every message as shipped.
"""

from __future__ import annotations

import logging
import os
import select
import ssl
import struct
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from pacsd.compat.patch import Patch, need_attr, need_params, need_source
from pacsd.compat.pynetdicom_pace import BriskDUL
from pacsd.dicom_commands import (C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RSP, PENDING,
                                  Command, decode, pending, store_request)

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
_HEADER = struct.Struct(">BBL")
_ITEM = struct.Struct(">LBB")
_COMMAND, _LAST = 0x01, 0x02
# A command set is a few short elements (PS3.7 E.1); beyond this it is no command.
MAX_COMMAND = 64 << 10


class Sink(Protocol):
    """Where a data set's fragments go as they arrive (a file being written)."""

    def add(self, piece: memoryview) -> None: ...

    def drop(self) -> None: ...


class Fast(Protocol):
    """What the DICOM side answers itself (pacsd.dimse.fast)."""

    def wants(self, assoc: Association, cx: PresentationContext, request: Command) -> bool: ...

    def sink(self, assoc: Association, cx: PresentationContext, request: Command
             ) -> Sink | None:
        """Where the data set of a request it wants goes as it arrives (None: nowhere)."""

    def answer(self, assoc: Association, cx: PresentationContext, request: Command,
               data: bytes | None, sink: Any) -> bytes:
        """The encoded response command set (`sink`: what sink() gave, or None)."""


class _Framing(Exception):
    """The peer broke the message framing (PS3.7 Annex E, PS3.8 9.3.5.1)."""


# Where the lane is in the current message.
_IDLE, _OURS, _THEIRS = "idle", "ours", "theirs"


class _Waiter:
    """A C-STORE-RQ sent by `send_file`, waiting for its response."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.status = -1
        self.comment = ""


class Lane:
    """One association's fast lane; reads on its DUL thread only. `fast` answers requests on
    associations we accepted (None: we requested it, and take no requests on it)."""

    def __init__(self, dul: DULServiceProvider, fast: Fast | None) -> None:
        self.dul = dul
        self.fast = fast
        self.waiting: dict[int, _Waiter] = {}   # message ID -> a send_file waiting for its RSP
        self._waiting_lock = threading.Lock()
        self.mode = _IDLE
        self.items: list[memoryview] = []     # whole PDV items of the current message so far
        self.command = bytearray()            # its command fragments, joined
        self.cx_id = -1
        self.request: Command | None = None
        self.cx: PresentationContext | None = None
        self.data: list[memoryview] = []
        self.sink: Sink | None = None

    # --- reading --------------------------------------------------------------------------

    def read(self) -> bool:
        """Read and route one PDU, as DULServiceProvider._read_pdu_data would (True), or leave
        it to pynetdicom (False) outside data transfer."""
        dul = self.dul
        if dul.state_machine.current_state != "Sta6" or dul.socket is None:
            return False
        sock = dul.socket
        try:
            header = sock.recv(6)   # pacsd.dimse.limits bounds the length announced
            if len(header) != 6:
                raise EOFError
            pdu_type, _, length = _HEADER.unpack(header)
            if not 0x01 <= pdu_type <= 0x07:
                log.info("association from %s: unknown PDU type 0x%02X", self._peer(), pdu_type)
                dul.event_queue.put("Evt19")
                return True
            body = sock.recv(length)
            if len(body) != length:
                raise EOFError
        except (OSError, EOFError):
            dul.event_queue.put("Evt17")   # the connection closed, or a read timed out
            return True
        if pdu_type != P_DATA_TF:
            self._hand_over(bytes(header) + bytes(body))
            return True
        try:
            self._p_data(body)
        except (_Framing, ValueError) as e:
            log.warning("association from %s aborted: %s", self._peer(), e)
            self._reset()
            dul.event_queue.put("Evt19")   # pynetdicom's invalid PDU: A-ABORT, then close
        return True

    def _p_data(self, body: bytearray) -> None:
        view = memoryview(body)
        offset, end = 0, len(body)
        theirs: list[memoryview] = []   # items for pynetdicom, handed over as one PDU
        if end == 0:
            raise _Framing("a P-DATA-TF without any PDV item")
        while offset < end:
            if end - offset < 6:
                raise _Framing("a PDV item cut short")
            length, cx_id, control = _ITEM.unpack_from(body, offset)
            if length < 2 or length > end - offset - 4:
                raise _Framing(f"a PDV item of {length} bytes in a PDU of {end}")
            item = view[offset:offset + 4 + length]
            value = view[offset + 6:offset + 4 + length]
            offset += 4 + length
            is_command, last = bool(control & _COMMAND), bool(control & _LAST)
            if self.mode == _THEIRS:
                theirs.append(item)
                if last and not is_command:
                    self._flush(theirs)
                    self.mode = _IDLE
                continue
            if self.mode == _OURS:
                if is_command or cx_id != self.cx_id:
                    raise _Framing("a fragment of another message inside a data set")
                self.data.append(value)
                if self.sink is not None:
                    self.sink.add(value)
                if last:
                    self._complete()
                continue
            # _IDLE: reading a command set
            if not is_command:
                raise _Framing("a data set fragment before its command set")
            if self.items and cx_id != self.cx_id:
                raise _Framing("the command set's fragments on different contexts")
            self.cx_id = cx_id
            self.items.append(item)
            self.command += value
            if len(self.command) > MAX_COMMAND:
                raise _Framing(f"a command set longer than {MAX_COMMAND} bytes")
            if last:
                self._route(theirs)
        if theirs:
            self._flush(theirs)   # the message goes on in the next PDU

    def _route(self, theirs: list[memoryview]) -> None:
        """The command set is whole: take the message, or give it to pynetdicom."""
        request = decode(bytes(self.command))
        if self.waiting and self._response(request):
            self._reset()
            return
        fast = self.fast
        cx = self._context(self.cx_id)
        if cx is not None and fast is not None and fast.wants(self.dul.assoc, cx, request):
            self.mode, self.request, self.cx = _OURS, request, cx
            self.items.clear()
            if not request.has_data:
                self._complete()
            else:
                self.sink = fast.sink(self.dul.assoc, cx, request)
            return
        theirs.extend(self.items)
        self.items.clear()
        self.command = bytearray()
        self.request = request
        if request.has_data:
            self.mode = _THEIRS
        else:
            self._flush(theirs)
            self._reset()

    def _response(self, response: Command) -> bool:
        """Whether this is the C-STORE-RSP a send_file waits for (then handed to it)."""
        if response.field != C_STORE_RSP or response.has_data:
            return False
        with self._waiting_lock:
            waiter = self.waiting.pop(response.responded_to, None)
        if waiter is None:
            return False
        waiter.status, waiter.comment = response.status, response.error_comment
        waiter.done.set()
        return True

    def _context(self, cx_id: int) -> PresentationContext | None:
        return self.dul.assoc._accepted_cx.get(cx_id)

    # --- answering ------------------------------------------------------------------------

    def _complete(self) -> None:
        request, cx, fast = self.request, self.cx, self.fast
        assert request is not None and cx is not None and fast is not None
        data = b"".join(self.data) if request.has_data else None
        cx_id, sink = self.cx_id, self.sink
        self.sink = None   # now the answer's
        self._reset()
        # Answered before the next PDU is read: requests on one association are served one at
        # a time, as pynetdicom does without asynchronous operations.
        self._send(cx_id, fast.answer(self.dul.assoc, cx, request, data, sink))

    # --- sending a stored file ------------------------------------------------------------

    def send_file(self, path: Path, sop_class: str, sop_instance: str, transfer_syntax: str,
                  msg_id: int, priority: int, originator_aet: str | None,
                  originator_id: int | None) -> Dataset | None:
        """C-STORE a stored file's data set, its bytes as they are on disk, and wait for the
        response: its status as a Dataset (empty when none came, as pynetdicom's), or None
        when this lane cannot send it (pynetdicom then does)."""
        assoc = self.dul.assoc
        sock = self.dul.socket
        raw = sock.socket if sock is not None else None
        if raw is None or isinstance(raw, ssl.SSLSocket):
            return None   # an SSL socket is written by the DUL thread only (see pace)
        cx = next((cx for cx in assoc._accepted_cx.values()
                   if cx.abstract_syntax == sop_class and cx.as_scu
                   and cx.transfer_syntax[0] == transfer_syntax), None)
        if cx is None:
            return None
        try:
            f = open(path, "rb")
        except OSError:
            return None
        with f:
            offset = _data_set_offset(f)
            if offset is None:
                return None
            size = os.fstat(f.fileno()).st_size - offset
            peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
            limit = int(peer.maximum_length or 0)
            room = max(limit - 6, 1) if limit else 1 << 20
            command = store_request(msg_id, sop_class, sop_instance, priority,
                                    originator_aet or "", originator_id)
            waiter = _Waiter()
            with self._waiting_lock:
                self.waiting[msg_id] = waiter
            lock = getattr(self.dul, "_send_lock", None) or threading.Lock()
            try:
                with lock:   # the whole message, no other P-DATA between its PDUs
                    cx_id = int(cx.context_id or 0)
                    raw.sendall(self._command_pdus(cx_id, command))
                    _send_data(raw, f, offset, size, room, cx_id)
            except OSError as e:
                with self._waiting_lock:
                    self.waiting.pop(msg_id, None)
                log.info("association with %s: sending %s failed: %s", self._peer(),
                         sop_instance, e)
                self.dul.event_queue.put("Evt17")   # as AssociationSocket.send does
                return Dataset()
        return self._wait(waiter, msg_id)

    def _wait(self, waiter: _Waiter, msg_id: int) -> Dataset:
        assoc = self.dul.assoc
        timeout = assoc.dimse_timeout
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while not waiter.done.wait(0.2):
            if not assoc.is_established or assoc.is_aborted or (
                    deadline is not None and time.monotonic() > deadline):
                with self._waiting_lock:
                    self.waiting.pop(msg_id, None)
                if assoc.is_established:   # pynetdicom's _handle_no_response: abort
                    log.info("association with %s: no C-STORE response within %s s; "
                             "aborting", self._peer(), timeout)
                    assoc.abort()
                return Dataset()
        if waiter.status < 0:   # the lane closed: the association ended, no response
            return Dataset()
        rsp = Dataset()
        rsp.Status = waiter.status
        if waiter.comment:
            rsp.ErrorComment = waiter.comment
        return rsp

    def _command_pdus(self, cx_id: int, command: bytes, control: int = _COMMAND) -> bytes:
        """`command` (or, control 0, a data set) as P-DATA-TF PDUs of one PDV each."""
        kind = control
        assoc = self.dul.assoc
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        limit = int(peer.maximum_length or 0)
        room = max(limit - 6, 1) if limit else len(command)
        pdus = []
        for start in range(0, len(command), room):
            piece = command[start:start + room]
            control = kind | (_LAST if start + room >= len(command) else 0)
            pdus.append(_HEADER.pack(P_DATA_TF, 0, len(piece) + 6)
                        + _ITEM.pack(len(piece) + 2, cx_id, control) + piece)
        return b"".join(pdus)

    def _send(self, cx_id: int, command: bytes, data: bytes = b"") -> bool:
        """A message (a command set, and a data set if any) as P-DATA-TF, in fragments within
        the peer's Maximum Length Received (0: no limit), in one write. From another thread
        than the DUL's: False (nothing sent) over TLS, or while P-DATA waits in the DUL's
        queue (order first)."""
        dul = self.dul
        sock = dul.socket
        if sock is None:
            return True
        pdus = self._command_pdus(cx_id, command)
        if data:
            pdus += self._command_pdus(cx_id, data, control=0)
        foreign = threading.current_thread() is not dul
        if foreign and isinstance(sock.socket, ssl.SSLSocket):
            return False
        brisk = cast(BriskDUL, dul)
        with brisk._send_lock:   # no other P-DATA between these bytes
            if foreign and brisk._queued_p_data:
                return False
            sock.send(pdus)
        return True

    def send_msg(self, original: Any, primitive: Any, context_id: int) -> None:
        """DIMSEServiceProvider.send_msg, pending responses packed here instead of through
        pydicom and pynetdicom's message classes: a C-FIND match with its identifier (already
        encoded by pynetdicom's C-FIND SCP), and the C-GET / C-MOVE response sent after each
        sub-operation. Anything else, or what does not fit, goes the original way."""
        responded_to = getattr(primitive, "MessageIDBeingRespondedTo", None)
        status = getattr(primitive, "Status", None)
        sop_class = str(getattr(primitive, "AffectedSOPClassUID", None) or "")
        message = None
        if responded_to is None or status not in (PENDING, 0xFF01):
            pass
        elif isinstance(primitive, C_FIND):
            identifier = primitive.Identifier
            if identifier is not None:
                message = (pending(C_FIND_RSP, int(responded_to), sop_class, int(status),
                                   identifier=True), identifier.getvalue())
        elif isinstance(primitive, (C_GET, C_MOVE)) and primitive.Identifier is None:
            counts = [getattr(primitive, f"Number{of}Suboperations", None)
                      for of in ("OfRemaining", "OfCompleted", "OfFailed", "OfWarning")]
            if None not in counts:
                field = C_GET_RSP if isinstance(primitive, C_GET) else C_MOVE_RSP
                message = (pending(field, int(responded_to), sop_class, int(status),
                                   counts=cast(tuple[int, int, int, int], tuple(counts))), b"")
        if message is None or not self._send(context_id, *message):
            original(primitive, context_id)
        self._let_reader_run()

    def _let_reader_run(self) -> None:
        """While this thread sends answer after answer (a C-FIND's matches, a C-GET's
        sub-operations) it holds the GIL most of the time, and the DUL thread, which must take
        it several times to read a C-CANCEL and hand it to pynetdicom, waited a switch interval
        (5 ms) each time: a cancel was noticed 100 answers late under load. When the peer has
        sent something, step aside until the DUL has read and passed it on (bounded)."""
        dul = self.dul
        raw = dul.socket.socket if dul.socket is not None else None
        for _ in range(20):   # at most about 10 ms
            try:
                waiting = (not dul.event_queue.empty() or not dul._recv_pdu.empty()
                           or (raw is not None and bool(select.select([raw], [], [], 0)[0])))
            except (OSError, ValueError):   # closed: nothing to wait for
                return
            if not waiting:
                return
            time.sleep(0.0005)

    # --- handing over ---------------------------------------------------------------------

    def _flush(self, items: list[memoryview]) -> None:
        size = sum(len(i) for i in items)
        self._hand_over(_HEADER.pack(P_DATA_TF, 0, size) + b"".join(items))
        items.clear()

    def _hand_over(self, pdu: bytes) -> None:
        """What DULServiceProvider._read_pdu_data does with a PDU it has read."""
        dul = self.dul
        try:
            decoded, event = dul._decode_pdu(bytearray(pdu))
        except Exception as e:   # pynetdicom's READ_PDU_EXC_F
            log.info("association from %s: a PDU that cannot be decoded (%s)", self._peer(), e)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(decoded)

    def close(self) -> None:
        """The association ended: a data set still arriving is dropped (never answered)."""
        self._reset()
        with self._waiting_lock:
            waiting, self.waiting = self.waiting, {}
        for waiter in waiting.values():
            waiter.done.set()   # status -1: no response came

    def _reset(self) -> None:
        if self.sink is not None:
            self.sink.drop()
            self.sink = None
        self.mode = _IDLE
        self.items.clear()
        self.command = bytearray()
        self.request = self.cx = None
        self.data = []

    def _peer(self) -> str:
        try:
            requestor = self.dul.assoc.requestor
            return f"{requestor.ae_title} ({requestor.address})"
        except Exception:   # noqa: BLE001 - only for a log line
            return "?"


def _data_set_offset(f: Any) -> int | None:
    """Where the data set begins in a DICOM file (PS3.10 7.1): after the preamble, "DICM"
    and the File Meta group, whose length its first element gives. None if not that shape."""
    head = f.read(144)
    if (len(head) < 144 or head[128:132] != b"DICM"
            or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00"):
        return None
    return 144 + int.from_bytes(head[140:144], "little")


def _send_data(raw: Any, f: Any, offset: int, size: int, room: int, cx_id: int) -> None:
    """The data set's bytes from `f`, as P-DATA-TF PDUs of one PDV each, read straight into
    the buffer that is sent."""
    buf = bytearray(12 + min(room, max(size, 1)))
    view = memoryview(buf)
    f.seek(offset)
    left = size
    while True:
        n = min(room, left)
        got = f.readinto(view[12:12 + n]) if n else 0
        if got != n:
            raise OSError(f"the file ended {left - got} bytes early")
        left -= n
        control = _LAST if left == 0 else 0
        _HEADER.pack_into(buf, 0, P_DATA_TF, 0, n + 6)
        _ITEM.pack_into(buf, 6, n + 2, cx_id, control)
        raw.sendall(view[:12 + n])
        if left == 0:
            return


def _probe() -> None:
    dul = DULServiceProvider
    need_attr(dul, "_decode_pdu")
    need_source(dul._read_pdu_data, ("self.socket.recv(6)", "self._decode_pdu(bytestream)",
                                     "self.event_queue.put(event)", "self._recv_pdu.put(pdu)"),
                "DULServiceProvider._read_pdu_data")
    need_source(dul._is_transport_event, ("self._read_pdu_data()",),
                "DULServiceProvider._is_transport_event")
    need_source(Association.__init__, ("self._accepted_cx",), "Association.__init__")
    from pynetdicom.dimse import DIMSEServiceProvider
    need_params(DIMSEServiceProvider.send_msg, ("self", "primitive", "context_id"),
                "DIMSEServiceProvider.send_msg")
    from pynetdicom import service_class
    need_source(service_class.QueryRetrieveServiceClass._get_scp,
                ("self.dimse.send_msg(rsp, cx_id)",), "QueryRetrieveServiceClass._get_scp")
    from pynetdicom import fsm
    need_source(fsm.DT_2, ("dul._recv_pdu.get(False)",), "fsm.DT_2")


LANE = Patch("pynetdicom.fast_lane", "speed", "pynetdicom",
             "C-STORE and C-ECHO answered by the thread that reads the association, their "
             "command sets packed by hand", "every message goes through pynetdicom's DIMSE "
             "layer", _probe)


def open_lane(event: Event, fast: Fast | None = None) -> None:
    """EVT_CONN_OPEN handler (after wake_on_work): with `fast`, for associations we accept
    (`fast` answers their requests; pacsd.dimse binds it unless [dicom] fast_lane is off);
    without, for those we request (C-MOVE, routing: stored files sent by the lane). The lane
    rides on the pace patch's DUL: without it (PACE misfit) there is no lane either."""
    assoc = event.assoc
    if (not LANE.fits or not isinstance(assoc.dul, BriskDUL) or assoc.dul._lane is not None
            or assoc.is_acceptor != (fast is not None)):
        return
    lane = assoc.dul._lane = Lane(assoc.dul, fast)
    if fast is not None:   # our C-GET and C-MOVE SCPs' pending responses
        assoc.dimse.send_msg = partial(  # type: ignore[method-assign]
            lane.send_msg, assoc.dimse.send_msg)


def close_lane(event: Event) -> None:
    """EVT_CONN_CLOSE handler: whatever the lane still holds is let go."""
    lane = lane_of(event.assoc)
    if lane is not None:
        lane.close()


def lane_of(assoc: Any) -> Lane | None:
    return getattr(assoc.dul, "_lane", None)
