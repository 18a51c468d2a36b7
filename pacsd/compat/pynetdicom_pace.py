"""How pynetdicom's polling loops wait: for the work itself, not for a fixed millisecond.

pynetdicom polls. Its DUL thread sleeps 1 ms whenever it found nothing to do, and an acceptor's
reactor sleeps 1 ms before each look at its queue of received messages. Every request therefore
waits up to a millisecond to be seen and its response up to another to be sent: a third of a
C-STORE's round trip on loopback (measured: 176 img/s over one association, 240 with shorter
sleeps). Shorter sleeps for all would cost every idle association CPU, and several busy ones
fight for the GIL. Instead:

- the DUL waits in select() on its connection and on a wake-up socket that is written to when
  a primitive (a response, a release, an abort) is queued for sending; it returns at once for
  either, and at the latest after IDLE_WAIT for pynetdicom's timers;
- an acceptor's reactor waits to be woken by a complete message or an ACSE primitive (release,
  abort, connection lost) instead of looking once per loop; it still comes back every
  REACTOR_WAIT for its other checks (timeouts).

An idle association so turns its loops less often than with pynetdicom's own pace, and a busy
one answers as soon as its work is done. `wake_on_work` is an EVT_CONN_OPEN handler, for
associations we accept and those we request; `drop_wakeups` (EVT_CONN_CLOSE) closes the wake-up
sockets.

What this relies on in pynetdicom (its private `_run_loop_delay`, `_send`, the reactor's
`dimse.get_msg(block=False)`, the DUL's class swapped at run time) is checked by `PACE`; when it
no longer fits, both handlers do nothing and pynetdicom polls as it always did.
"""

from __future__ import annotations

import inspect
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from pacsd.compat.patch import Misfit, Patch, need_attr, need_params, need_source

IDLE = 0.001         # pynetdicom's own delay, kept where we cannot wait for work
IDLE_WAIT = 0.005    # s the DUL waits for work before its timer checks
REACTOR_WAIT = 0.02  # s an acceptor's reactor waits for a message before its other checks


class BriskDUL(DULServiceProvider):
    """pynetdicom's DUL, whose idle "sleep" waits for incoming data or a primitive to send."""

    _wake_in: socket.socket | None = None    # written to when a primitive is queued
    _wake_out: socket.socket | None = None   # its other end, watched with the connection

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        """Called by the DUL's loop just before it sleeps that long: wait here instead."""
        wake = self._wake_out
        if wake is None or threading.current_thread() is not self:
            return IDLE   # stop_dul() polls with it from another thread
        try:
            conn = self.socket.socket if self.socket is not None else None
            if conn is None:
                return IDLE
            if isinstance(conn, ssl.SSLSocket) and conn.pending():
                return 0.0   # decrypted bytes wait in the SSL buffer, unseen by select()
            ready, _, _ = select.select([conn, wake], [], [], IDLE_WAIT)
            if wake in ready:
                wake.recv(4096)
        except (OSError, ValueError):   # closed under us: the loop is about to end
            return IDLE
        return 0.0

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        pass   # pynetdicom's __init__ sets its constant; ours is above

    # P-DATA sent by the thread that has it. Through the DUL, each PDU (16 KiB for DCMTK's
    # peers: 32 per CT image) takes one turn of its loop, and a C-GET spent most of its time
    # there. In the data transfer state (Sta6) pynetdicom's state machine does nothing with a
    # P-DATA request but send it and stay (DT-1), so sending it here changes no state. Order is
    # kept: only while no earlier P-DATA waits in the queue, under a lock that the DUL's own
    # sends take too. Not over TLS: an SSL socket must not be written and read by two threads.
    _send_lock: threading.Lock
    _queued_p_data = 0   # P-DATA put in the queue and not yet sent by the DUL
    _lane: Any = None    # pacsd.compat.pynetdicom_lane.Lane, on associations we accept

    def _read_pdu_data(self) -> None:
        lane = self._lane
        if lane is None or not lane.read():
            super()._read_pdu_data()

    def send_pdu(self, primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            with self._send_lock:
                conn = self.socket.socket if self.socket is not None else None
                if (not self._queued_p_data and conn is not None
                        and not isinstance(conn, ssl.SSLSocket)
                        and self.state_machine.current_state == "Sta6"):
                    DULServiceProvider._send(self, P_DATA_TF(primitive))
                    return
                self._queued_p_data += 1
        super().send_pdu(primitive)

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            super()._send(pdu)
            if isinstance(pdu, P_DATA_TF) and self._queued_p_data:
                self._queued_p_data -= 1


def _stirring(q: queue.Queue, wake: Callable[[], None]) -> None:
    """Make `q.put` also call `wake`."""
    put = q.put

    def stirring_put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()
    q.put = stirring_put  # type: ignore[method-assign]


def _poke(sock: socket.socket) -> None:
    try:
        sock.send(b"\0")
    except OSError:   # full (a wake-up is pending anyway) or closed (the association ended)
        pass


def _waiting_get_msg(dimse: DIMSEServiceProvider, acse_queue: queue.Queue,
                     stir: threading.Event, block: bool = False) -> Any:
    """DIMSEServiceProvider.get_msg, but the reactor's non-blocking look waits up to
    REACTOR_WAIT for a message or an ACSE primitive (release, abort) to arrive."""
    if block:
        return DIMSEServiceProvider.get_msg(dimse, True)
    if not dimse.assoc._reactor_checkpoint.is_set():
        return None, None   # another thread paused the reactor and waits for this response
    stir.clear()   # before looking: a put after the look sets it again, so no wake is lost
    try:
        return dimse.msg_queue.get_nowait()
    except queue.Empty:
        pass
    if not acse_queue.empty():
        return None, None   # a release or abort waits for the reactor's checks after this
    stir.wait(REACTOR_WAIT)
    try:
        return dimse.msg_queue.get_nowait()
    except queue.Empty:
        return None, None


def _probe() -> None:
    """What BriskDUL and `_waiting_get_msg` rely on, as pynetdicom 3.0 has it."""
    dul = DULServiceProvider
    for name in ("_send", "send_pdu", "run_reactor", "stop_dul"):
        need_attr(dul, name)
    need_params(dul._send, ("self", "pdu"), "DULServiceProvider._send")
    need_params(dul.send_pdu, ("self", "primitive"), "DULServiceProvider.send_pdu")
    # The loop's idle sleep reads the delay from the instance (our property answers it);
    # __init__ sets it (our setter swallows that).
    need_source(dul.__init__, ("self._run_loop_delay =", "self.to_provider_queue",
                               "self.to_user_queue", "self.state_machine"),
                "DULServiceProvider.__init__")
    need_source(dul.run_reactor, ("time.sleep(self._run_loop_delay)",),
                "DULServiceProvider.run_reactor")
    if isinstance(inspect.getattr_static(dul, "_run_loop_delay", None), property):
        raise Misfit("DULServiceProvider._run_loop_delay (now a property of its own)")
    if getattr(dul, "__slots__", None):
        raise Misfit("DULServiceProvider's layout (it has __slots__: its class cannot be swapped)")
    need_params(P_DATA_TF.__init__, ("self", "primitive"), "P_DATA_TF")
    # The acceptor's reactor looks at its messages with get_msg(block=False), in a loop that
    # also checks the ACSE queue: what _waiting_get_msg waits in.
    need_params(DIMSEServiceProvider.get_msg, ("self", "block"), "DIMSEServiceProvider.get_msg")
    need_attr(DIMSEServiceProvider, "assoc")
    need_source(Association.__init__, ("self._reactor_checkpoint",), "Association.__init__")
    need_source(DIMSEServiceProvider.__init__, ("self.msg_queue",),
                "DIMSEServiceProvider.__init__")
    need_source(Association._run_reactor, ("self.dimse.get_msg(block=False)",),
                "Association._run_reactor")
    need_source(dul.send_pdu, ("to_provider_queue.put",), "DULServiceProvider.send_pdu")
    from pynetdicom import fsm   # Sta6: data transfer, where DT-1 only sends a P-DATA
    if "Sta6" not in getattr(fsm, "STATES", {}):
        raise Misfit("the state machine's states (no Sta6)")


PACE = Patch("pynetdicom.wake_on_work", "speed", "pynetdicom",
             "associations wait for work (select on the connection and a wake-up socket) "
             "instead of polling every millisecond",
             "using pynetdicom's own polling", _probe)


def wake_on_work(event: Event) -> None:
    """EVT_CONN_OPEN handler: make this association wait for work (see the module's text).
    Does nothing when pynetdicom no longer fits (PACE): it then polls as shipped."""
    if not PACE.fits:
        return
    assoc = event.assoc
    dul = assoc.dul
    wake_in, wake_out = socket.socketpair()
    wake_in.setblocking(False)
    wake_out.setblocking(False)
    dul.__class__ = BriskDUL
    brisk_dul = cast(BriskDUL, dul)
    brisk_dul._send_lock = threading.Lock()
    brisk_dul._wake_in, brisk_dul._wake_out = wake_in, wake_out
    _stirring(dul.to_provider_queue, partial(_poke, wake_in))
    if assoc.is_acceptor:
        # Only the acceptor's reactor polls its queue; a requestor's sends wait with block=True.
        dimse, stir = assoc.dimse, threading.Event()
        _stirring(dimse.msg_queue, stir.set)        # a DIMSE message is complete
        _stirring(dul.to_user_queue, stir.set)      # A-RELEASE, A-ABORT, connection lost
        dimse.get_msg = partial(_waiting_get_msg, dimse,  # type: ignore[method-assign]
                                dul.to_user_queue, stir)


def drop_wakeups(event: Event) -> None:
    """EVT_CONN_CLOSE handler: close the wake-up sockets `wake_on_work` made."""
    dul = event.assoc.dul
    if isinstance(dul, BriskDUL):
        for sock in (dul._wake_in, dul._wake_out):
            if sock is not None:
                sock.close()
