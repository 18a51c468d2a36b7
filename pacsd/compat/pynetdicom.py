"""What pacsd does with pynetdicom's internals, each behind one named function, each checked.

- `send_files_as_stored()`: pynetdicom's configuration module (`_config`, its documented seam)
  told to send a stored file's bytes as they are (STORE_SEND_CHUNKED_DATASET).
- `register_server(ae, server)`: a listener we started ourselves, listed where pynetdicom lists
  the ones it starts (`ae._servers`), because its `server.shutdown()` takes it off that list.
- `park_reactor(assoc)` / `unpark_reactor(assoc)` and `keep_reactor_off_responses()`:
  workarounds for pynetdicom's race between its reactor thread and a request sent from another
  thread (reads `_reactor_checkpoint`, `_is_paused`, and the waiters of a `threading.Event`'s
  condition; wraps `DIMSEServiceProvider.get_msg`).
- `adopt_socket(sock, cls)`: an association's socket given a subclass at run time (the PDU size
  bound of pacsd.dimse.limits); it relies on how the DUL reads a PDU. A SAFETY patch.
- `HandOverAE`: an AE whose associate() returns the C-MOVE sub-association the handler already
  requested (pynetdicom's C-MOVE SCP otherwise requests it itself, after the handler's first
  yields, and answers any failure 0xA801 "Move Destination unknown").
- the pace of associations (pacsd.compat.pynetdicom_pace: `wake_on_work`, `drop_wakeups`).
- the fast lane of C-STORE and C-ECHO (pacsd.compat.pynetdicom_lane: `open_lane`).
- `encoded_identifiers()`: C-FIND matches that pacsd writes itself, through a wrapper of
  pynetdicom.service_class's `encode` (what its service classes encode a handler's yield with).
- `UNKNOWN_STORAGE`: no patch, a reliance: pacsd.dimse.contexts maps private and unknown
  storage classes to the Storage Service through pynetdicom's EVT_SOP_COMMON handler, which
  pynetdicom calls for every association request (not only those that carry such items) and
  whose accepted items pick the service class of a DIMSE request.

Each has a `Patch` whose probe says whether the installed pynetdicom still fits; PATCHES lists
them for pacsd.compat.check().
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, TypeVar

from pynetdicom import AE, _config
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom import service_class
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from pacsd.compat.patch import Misfit, Patch, need_attr, need_params, need_source
from pacsd.compat.pynetdicom_lane import LANE, close_lane, lane_of, open_lane
from pacsd.compat.pynetdicom_pace import PACE, drop_wakeups, wake_on_work

__all__ = ["HANDOVER", "MADE", "NOT_SENT", "PATCHES", "UNKNOWN_STORAGE", "HandOverAE",
           "adopt_socket", "close_lane", "drop_wakeups", "encoded_identifiers", "lane_of",
           "open_lane", "keep_alive", "keep_reactor_off_responses",
           "park_reactor", "quiet_identifiers", "register_server",
           "send_files_as_stored", "unpark_reactor", "wake_on_work"]

S = TypeVar("S", bound=AssociationSocket)


# --- sending stored files unchanged -------------------------------------------------------------

def _probe_chunked() -> None:
    if not isinstance(getattr(_config, "STORE_SEND_CHUNKED_DATASET", None), bool):
        raise Misfit("its configuration (no _config.STORE_SEND_CHUNKED_DATASET)")
    need_source(Association.send_c_store, ("_config.STORE_SEND_CHUNKED_DATASET",),
                "Association.send_c_store")


CHUNKED = Patch("pynetdicom.send_files_as_stored", "speed", "pynetdicom",
                "stored files are sent by path, their bytes unchanged and in chunks",
                "pynetdicom reads and encodes each file it sends again", _probe_chunked)


def send_files_as_stored() -> None:
    """Make `send_c_store(path)` send the file's data set bytes as they are, in chunks, without
    decoding it (pynetdicom's `_config.STORE_SEND_CHUNKED_DATASET`). Process-wide."""
    if CHUNKED.fits:
        _config.STORE_SEND_CHUNKED_DATASET = True


def quiet_identifiers() -> None:
    """pynetdicom formats every C-FIND answer's identifier for a DEBUG line even when DEBUG is
    off (its documented _config.LOG_RESPONSE_IDENTIFIERS): 3 % of a C-FIND's time, measured.
    Off, process-wide; pacsd logs its own lines."""
    if isinstance(getattr(_config, "LOG_RESPONSE_IDENTIFIERS", None), bool):
        _config.LOG_RESPONSE_IDENTIFIERS = False


def quiet_standard_handlers() -> None:
    """pynetdicom binds its "standard" logging handlers to every association it makes (its
    documented _config.LOG_HANDLER_LEVEL): every PDU and DIMSE message is summed up in DEBUG
    lines that are built even when DEBUG is off, and for an A-ASSOCIATE-RQ that proposes every
    storage class (getscu, movescu, workstations) the summary scans all role items once per
    context: a third of such an association's CPU, measured. Left on only when pynetdicom's
    logger is at DEBUG. Process-wide; call after logging is set up."""
    if getattr(_config, "LOG_HANDLER_LEVEL", None) in ("standard", "none"):
        debug = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
        _config.LOG_HANDLER_LEVEL = "standard" if debug else "none"


# --- C-FIND identifiers encoded by pacsd ----------------------------------------------------------

def _probe_identifiers() -> None:
    if not callable(getattr(service_class, "encode", None)):
        raise Misfit("pynetdicom.service_class (no module-level encode)")
    need_params(service_class.encode, ("ds", "is_implicit_vr", "is_little_endian", "deflated"),
                "pynetdicom.service_class.encode")
    need_source(ServiceClass._c_find_scp, ("enc = encode(", "transfer_syntax.is_deflated",
                                           "_config.LOG_RESPONSE_IDENTIFIERS"),
                "ServiceClass._c_find_scp")


IDENTIFIERS = Patch("pynetdicom.encoded_identifiers", "speed", "pynetdicom",
                    "C-FIND matches are written by pacsd from the index's values "
                    "(pacsd.dimse.find.Match), without a pydicom Dataset",
                    "each C-FIND match is built as a pydicom Dataset and encoded by pydicom",
                    _probe_identifiers)
_identifiers_lock = threading.Lock()


def encoded_identifiers() -> bool:
    """Whether a C-FIND handler may yield, instead of a Dataset, an object with
    `pacsd_encoded(implicit, little, deflated) -> bytes | None` and `dataset() -> Dataset` (used
    when it gives None). pynetdicom's service classes encode what a handler yields with their
    module's `encode`, wrapped here once; everything else goes to pynetdicom's as before. Off
    while pynetdicom formats identifiers for its DEBUG lines (quiet_identifiers)."""
    if not IDENTIFIERS.fits or getattr(_config, "LOG_RESPONSE_IDENTIFIERS", False):
        return False
    with _identifiers_lock:
        original = service_class.encode
        if not getattr(original, "pacsd", False):
            def encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
                       deflated: bool = False) -> bytes | None:
                made = getattr(ds, "pacsd_encoded", None)
                if made is not None:
                    raw = made(is_implicit_vr, is_little_endian, deflated)
                    if raw is not None:
                        return raw  # type: ignore[no-any-return]
                    ds = ds.dataset()
                return original(ds, is_implicit_vr, is_little_endian, deflated)
            encode.pacsd = True  # type: ignore[attr-defined]
            service_class.encode = encode
    return True


# --- a listener of our own, known to the AE -----------------------------------------------------

def _probe_servers() -> None:
    need_source(AE.__init__, ("self._servers",), "AE.__init__")
    need_source(AE.shutdown, ("self._servers",), "AE.shutdown")
    need_source(ThreadedAssociationServer.shutdown, ("ae._servers.remove",),
                "ThreadedAssociationServer.shutdown")


SERVERS = Patch("pynetdicom.register_server", "speed", "pynetdicom",
                "our DICOM listener is listed with the AE, as ae.start_server() lists its own",
                "the listener is not listed with the AE; pacsd stops it itself", _probe_servers)


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """What `ae.start_server(block=False)` does with the server it makes: list it in
    `ae._servers`, from which `server.shutdown()` removes it again (and `ae.shutdown()` stops
    it). pacsd starts its listener's thread itself, to watch it."""
    if SERVERS.fits:
        ae._servers.append(server)


# --- the requestor's idle timer during a long retrieve --------------------------------------------

def _probe_idle_timer() -> None:
    need_attr(DULServiceProvider, "idle_timer_expired")
    need_source(DULServiceProvider.run_reactor, ("self._idle_timer.restart()",),
                "DULServiceProvider.run_reactor")
    need_source(Association._run_reactor, ("self.dul.idle_timer_expired()",),
                "Association._run_reactor")


KEEP_ALIVE = Patch("pynetdicom.retrieve_keep_alive", "speed", "pynetdicom",
                   "a C-MOVE / C-GET requestor is not taken for idle while its sub-operations "
                   "are being sent",
                   "a retrieve that takes longer than [dicom] network_timeout is aborted once "
                   "it has answered (pynetdicom counts only what it receives)", _probe_idle_timer)


def keep_alive(assoc: Association) -> None:
    """The association is busy on our side (a C-MOVE or C-GET sending its sub-operations, in
    the reactor's own thread): restart its idle timer. pynetdicom restarts it only for what it
    receives, so a retrieve longer than the network timeout ended with an A-ABORT right after
    its final response, and the requestor waited for its release to time out."""
    if KEEP_ALIVE.fits:
        assoc.dul._idle_timer.restart()


# --- the reactor's checkpoint (pynetdicom issues #435, #875) ------------------------------------

def _probe_reactor() -> None:
    need_source(Association.__init__, ("self._reactor_checkpoint", "self._is_paused"),
                "Association.__init__")
    for send in (Association.send_c_store, Association.send_n_event_report,
                 Association.send_c_echo, Association.send_c_find, Association.send_c_move,
                 Association.send_c_get, Association.send_n_action):
        # (C-FIND, C-MOVE and C-GET let the reactor go on in their response generators.)
        need_source(send, ("self._reactor_checkpoint.clear()", "while not self._is_paused"),
                    f"Association.{send.__name__}")
    need_source(Association._run_reactor, ("self._reactor_checkpoint.wait()",
                                           "self.dimse.get_msg(block=False)"),
                "Association._run_reactor")
    need_params(DIMSEServiceProvider.get_msg, ("self", "block"), "DIMSEServiceProvider.get_msg")
    need_attr(DIMSEServiceProvider, "assoc")
    event = threading.Event()   # CPython's Event: a Condition with a deque of waiters
    cond = getattr(event, "_cond", None)
    if cond is None or not hasattr(cond, "_waiters"):
        raise Misfit("(Python's threading.Event: no _cond._waiters)")


REACTOR = Patch("pynetdicom.park_reactor", "speed", "pynetdicom",
                "a request sent from another thread waits until the association's reactor really "
                "waits at its checkpoint, and the reactor leaves the response to it",
                "pynetdicom pauses its reactor itself (a request may then wait for the DIMSE "
                "timeout now and then: pynetdicom issue #875)", _probe_reactor)


def park_reactor(assoc: Association, timeout: float = 5.0) -> bool:
    """Return once the association's own reactor thread is blocked at its checkpoint; True if
    it was parked here (then `unpark_reactor` it if pynetdicom does not go on to do it).

    pynetdicom (3.0.4, its issues #435 and #875) pauses that thread before sending a C-STORE by
    clearing the checkpoint and waiting for `_is_paused`, which is also True for an instant
    after the thread has passed the checkpoint; it may then take the C-STORE response for
    itself ("unexpected C-STORE service message") and the C-MOVE stalls until the DIMSE
    timeout. Waiting until the thread really waits on the checkpoint closes that window."""
    if threading.current_thread() is assoc or not REACTOR.fits:   # C-GET: we are the reactor
        return False
    gate = assoc._reactor_checkpoint
    gate.clear()
    deadline = time.monotonic() + timeout
    while (not (assoc._is_paused and gate._cond._waiters)  # type: ignore[attr-defined]
           and assoc.is_alive() and time.monotonic() < deadline):
        time.sleep(0.0001)
    return True


def unpark_reactor(assoc: Association) -> None:
    """Let the reactor go on after `park_reactor` when pynetdicom's send did not (it failed)."""
    assoc._reactor_checkpoint.set()


def reactor_may_take(assoc: Any) -> bool:
    """Whether the association's reactor may take a received DIMSE message off the queue: not
    while another thread has paused it (the checkpoint cleared) to send a request and wait for
    its response. The same check for the paced acceptor (pacsd.compat.pynetdicom_pace)."""
    paused = not assoc._reactor_checkpoint.is_set()
    return not paused or threading.current_thread() is not assoc


def keep_reactor_off_responses() -> None:
    """Make the reactor's non-blocking look at the DIMSE queue find nothing while a send from
    another thread waits for its response (pynetdicom issues #435, #875).

    Every `send_*` and `release()` of pynetdicom 3.0.4 pauses the reactor by clearing its
    checkpoint and then waiting for `_is_paused`, which the reactor also shows for an instant
    right after it passed the checkpoint. In that instant it may take the response for itself
    ("Received unexpected C-ECHO service message") and the sender waits for the DIMSE timeout:
    measured here once in about 500 store-then-echo associations (a CI failure). `park_reactor`
    closed it for our own C-STOREs; this closes it for every request, ours and those of a
    pynetdicom client in the same process. Installed once, on the class, when REACTOR fits."""
    if not REACTOR.fits or getattr(DIMSEServiceProvider.get_msg, "pacsd_guarded", False):
        return
    original = DIMSEServiceProvider.get_msg

    def get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
        if not block and not reactor_may_take(self.assoc):
            return None, None   # the paused sender's response: left for it
        return original(self, block)

    get_msg.pacsd_guarded = True  # type: ignore[attr-defined]
    DIMSEServiceProvider.get_msg = get_msg  # type: ignore[method-assign]


# --- the C-MOVE sub-association, requested by pacsd's handler ---------------------------------

MADE = "pacsd_association"   # the key, in the destination's kwargs, of the association made


def _probe_handover() -> None:
    need_source(QueryRetrieveServiceClass._move_scp,
                ("kwargs.update(destination[2])", "self.ae.associate(",
                 "if not store_assoc.is_established:", "store_assoc.release()"),
                "QueryRetrieveServiceClass._move_scp")


HANDOVER = Patch("pynetdicom.move_handover", "speed", "pynetdicom",
                 "a C-MOVE destination that is down or refuses every presentation context is "
                 "answered 0xA702 with the sub-operation counts and the reason",
                 "pynetdicom requests the C-MOVE sub-association itself and answers every "
                 "failure to associate 0xA801 (Move Destination unknown)", _probe_handover)


class _NotSent:
    """The sub-association pynetdicom is handed when there is none (the destination is down,
    or nothing is to be sent): it only asks whether it is established and releases it, and the
    handler's next yield is the final failure, which pynetdicom then sends with the counts."""

    is_established = True

    def release(self) -> None:
        pass


NOT_SENT: Any = _NotSent()


class HandOverAE(AE):
    """pacsd's listening AE. pynetdicom's C-MOVE SCP calls `self.ae.associate(host, port,
    **kwargs)` with the kwargs the EVT_C_MOVE handler yields after the destination's address
    (documented: "passed to AE.associate()"); when they carry MADE, that association (already
    requested by the handler, pacsd.dimse.retrieve) is handed back instead of a new one, so
    that the handler, not pynetdicom, decides what a failed request is answered."""

    def associate(self, addr: Any, port: int, *args: Any, **kwargs: Any) -> Any:
        made = kwargs.pop(MADE, None)
        if made is not None:
            return made
        return super().associate(addr, port, *args, **kwargs)


# --- an association's socket, given a subclass at run time (SAFETY) -----------------------------

def _probe_socket() -> None:
    need_params(AssociationSocket.recv, ("self", "nr_bytes"), "AssociationSocket.recv")
    need_source(AssociationSocket.__init__, ("self.socket",), "AssociationSocket.__init__")
    need_attr(AssociationSocket, "assoc")
    if getattr(AssociationSocket, "__slots__", None):
        raise Misfit("AssociationSocket's layout (it has __slots__: its class cannot be swapped)")
    # A PDU is read as recv(6), its header, then recv(length), its body; a header shorter than
    # 6 bytes reads as the connection closed (Evt17). The bound follows that alternation.
    need_attr(DULServiceProvider, "_read_pdu_data")
    need_source(DULServiceProvider._read_pdu_data,
                ("self.socket.recv(6)", "self.socket.recv(pdu_length)", "struct.error",
                 "Evt17"), "DULServiceProvider._read_pdu_data")
    need_source(DULServiceProvider.__init__, ("self.socket",), "DULServiceProvider.__init__")


PDU_BOUND = Patch("pynetdicom.pdu_size_bound", "safety", "pynetdicom",
                  "a PDU announcing more than [dicom] max_pdu is refused before its body is read",
                  "the PDU size bound cannot be kept: pacsd serve refuses to start (a peer could "
                  "make it buffer gigabytes per association)", _probe_socket)


def adopt_socket(sock: AssociationSocket, cls: type[S]) -> S:
    """Give an association's socket (an AssociationSocket pynetdicom made) the subclass `cls`,
    which must add no state its methods need before the caller sets it."""
    sock.__class__ = cls
    return sock  # type: ignore[return-value]


# --- private and unknown storage classes (pacsd.dimse.contexts) ---------------------------------

def _probe_unknown_storage() -> None:
    need_source(ACSE._negotiate_as_acceptor,
                ("self.acceptor._common_ext = self._check_sop_class_common_extended()",
                 "negotiate_as_acceptor("), "ACSE._negotiate_as_acceptor")
    need_source(ACSE._check_sop_class_common_extended, ("evt.EVT_SOP_COMMON",),
                "ACSE._check_sop_class_common_extended")
    need_source(Association._serve_request,
                ("self.acceptor.accepted_common_extended[class_uid][0]",
                 "uid_to_service_class(class_uid)"), "Association._serve_request")


UNKNOWN_STORAGE = Patch("pynetdicom.unknown_storage_classes", "speed", "pynetdicom",
                        "private and unknown storage SOP classes are accepted and stored "
                        "([dicom] accept_unknown_sop_classes)",
                        "private and unknown storage SOP classes are refused at association "
                        "(each logged)", _probe_unknown_storage)


# --- UIDs of PDUs and primitives, remembered -------------------------------------------------------

# The modules that call pynetdicom.utils.set_uid by the name they imported.
_SET_UID_USERS = ("ae", "dimse_primitives", "pdu_items", "pdu_primitives", "presentation")
UID_MEMO_SIZE = 4096


def _probe_set_uid() -> None:
    import importlib
    from pynetdicom import utils
    original = getattr(utils.set_uid, "pacsd_original", utils.set_uid)
    need_params(original, ("value", "name", "allow_empty", "allow_none", "validate"),
                "utils.set_uid")
    for name in _SET_UID_USERS:
        module = importlib.import_module(f"pynetdicom.{name}")
        if getattr(getattr(module, "set_uid", None), "pacsd_original", None) is None \
                and getattr(module, "set_uid", None) is not utils.set_uid:
            raise Misfit(f"pynetdicom.{name} (no longer calls utils.set_uid by that name)")


SET_UID = Patch("pynetdicom.remembered_uids", "speed", "pynetdicom",
                "the UIDs of PDUs and primitives are made and checked once (the last 4096)",
                "each UID of an association is made and checked again each time it is set",
                _probe_set_uid)


def remember_uids() -> bool:
    """pynetdicom turns every UID of an A-ASSOCIATE-RQ into a pydicom UID and checks it with
    `utils.set_uid` several times over (PDU item, primitive, presentation context): 1,350 calls
    for a getscu that proposes every storage class, a sixth of its association's CPU. A
    conformant UID's answer is remembered (the UID object is immutable and shared); what
    raises or warns (a non-conformant UID) goes through pynetdicom's own each time. Installed
    once per process, in the modules that call it. Whether it is in place."""
    if not SET_UID.fits:
        return False
    import importlib
    from pydicom.uid import UID
    from pynetdicom import utils
    with _memo_lock:
        if hasattr(utils.set_uid, "pacsd_original"):
            return True
        original = utils.set_uid
        memo: dict[tuple, Any] = {}

        def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                    validate: bool = True) -> Any:
            if type(value) not in (str, bytes, UID) or hasattr(value, "_PRIVATE_TS_ENCODING"):
                # None; a UID carrying a private transfer syntax's encoding (not shared)
                return original(value, name, allow_empty, allow_none, validate)
            key = (value, name, allow_empty, allow_none, validate)
            uid = memo.get(key)
            if uid is None:
                uid = original(value, name, allow_empty, allow_none, validate)
                if uid and uid.is_valid:   # conformant: nothing was logged
                    if len(memo) >= UID_MEMO_SIZE:
                        memo.clear()
                    memo[key] = uid
            return uid

        set_uid.pacsd_original = original  # type: ignore[attr-defined]
        utils.set_uid = set_uid  # type: ignore[assignment]
        for name in _SET_UID_USERS:
            setattr(importlib.import_module(f"pynetdicom.{name}"), "set_uid", set_uid)
    return True


_memo_lock = threading.Lock()


PATCHES: list[Patch] = [PDU_BOUND, PACE, LANE, CHUNKED, SERVERS, REACTOR, HANDOVER,
                        UNKNOWN_STORAGE, KEEP_ALIVE, IDENTIFIERS, SET_UID]

keep_reactor_off_responses()
