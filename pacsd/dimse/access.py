"""Who may use DICOM: one association guard in front of every DIMSE service.

Everything that decides whether a peer may associate, and what it may ask once associated,
is here, in this order (AssociationGuard.on_requested, before any negotiation):

1. Per-host cap: a peer address holding `[dicom] max_associations_per_host` associations gets
   A-ASSOCIATE-RJ rejected-transient / service-provider (presentation) / local-limit-exceeded
   (PS3.8 9.3.4), the answer pynetdicom gives when all of `max_associations` are taken: the
   peer may retry later. Loopback is a host like any other. With DICOM workers
   (pacsd.daemon.workers) the supervisor counts for all of them, both caps (`Slots`).
2. Calling AE title: `[dicom] allowed_calling_aets`, when set, is the allow-list. Our own AE
   title (`pacsd status`, the watchdog's C-ECHO, the CLI) is exempt only when it calls from
   this machine (a loopback address, or the very address it called: a remote host cannot take
   our name to get past the list).
3. Peer address (`[dicom] check_peer_address`): a calling AE title that is a known node must
   come from that node's host (PeerCheck below).
4. Rights (Orthanc's model: DicomAlwaysAllowEcho/Store true, DicomAlwaysAllowFind/Get/Move
   false, per-modality AllowFind/AllowGet/AllowMove/AllowStore): C-ECHO, C-STORE and storage
   commitment are open to any caller; C-FIND, C-GET and C-MOVE only to nodes ([[nodes]], the
   admin page) whose allow_find / allow_get / allow_move say so, matched by calling AE title
   (and by host too with check_peer_address), unless `[dicom] open_query_retrieve`. Our own AE
   title from this machine may do everything. A node with allow_store = false may not store.
   The Modality Worklist (C-FIND) and MPPS (N-CREATE / N-SET), when `[worklist] enabled`:
   nodes (whatever their allow_* switches: a modality that may not query the archive still
   gets its worklist) and our own AE title from this machine, or any caller with
   `[worklist] open`.

How a missing right is answered. Query/retrieve, worklist and MPPS: the presentation contexts of
the services the caller may not use are taken out of what this association supports, so the
A-ASSOCIATE-AC answers them "abstract syntax not supported" (PS3.8 9.3.3.2), as Orthanc does
(CommandDispatcher accepts the FIND/GET/MOVE syntaxes only if IsAllowedRequest). A C-MOVE cannot
be answered 0x0124 "Refused: Not Authorized" before pynetdicom has associated with its
destination, so refusing at negotiation is the one answer that fits all three, it never opens an
association on a stranger's behalf, and DCMTK's findscu/getscu/movescu say "No Acceptable
Presentation Contexts" / "No presentation context", which tells the caller to look at the
server's side, where one log line names the AE title, the address and what was refused.
Storage (and storage commitment) for a node that may not store: the contexts must stay, since
a C-GET's sub-operations use the same storage contexts in the other role, so the C-STORE or
N-ACTION itself is answered 0x0124 "Refused: Not Authorized" (a general status, PS3.7 Annex C;
dcm4che uses it the same way), with one log line.

Node hosts may be names: they are resolved with a bound on the time (a resolver that hangs
must not hold an association thread) and cached; a name that does not resolve refuses.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    ModalityPerformedProcedureStep, ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove)

from pacsd.config import Config, Node
from pacsd.config.validators import normal_address
from pacsd.dicom_status import NOT_AUTHORIZED as NOT_AUTHORIZED  # pacsd.dimse imports it here
from pacsd.accounts import Accounts

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 2.0
CACHE_S = 60.0
FAILED_CACHE_S = 10.0
# PS3.8 9.3.4: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
# PS3.8 9.3.4: rejected-transient, DICOM UL service-provider (presentation related function),
# local-limit-exceeded.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

FIND, GET, MOVE, STORE, WORKLIST = "find", "get", "move", "store", "worklist"
ALL = frozenset({FIND, GET, MOVE, STORE, WORKLIST})
OPEN = frozenset({STORE})   # what any caller may do (C-ECHO is never refused)
QUERY_RETRIEVE = frozenset({FIND, GET, MOVE})
# The Query/Retrieve information models of each service we support as SCP (dimse.QR_MODELS),
# plus the retired and composite-instance ones a peer may propose, which we never support.
QR_SYNTAXES = {
    FIND: {str(PatientRootQueryRetrieveInformationModelFind),
           str(StudyRootQueryRetrieveInformationModelFind)},
    GET: {str(PatientRootQueryRetrieveInformationModelGet),
          str(StudyRootQueryRetrieveInformationModelGet)},
    MOVE: {str(PatientRootQueryRetrieveInformationModelMove),
           str(StudyRootQueryRetrieveInformationModelMove)},
}
# The Modality Worklist and MPPS (pacsd.dimse.worklist, pacsd.dimse.mpps): one right for both.
SYNTAXES = {**QR_SYNTAXES, WORKLIST: {str(ModalityWorklistInformationFind),
                                      str(ModalityPerformedProcedureStep)}}
_SERVICE = {FIND: "C-FIND", GET: "C-GET", MOVE: "C-MOVE", WORKLIST: "Modality Worklist/MPPS"}


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(normal_address(address)).is_loopback
    except ValueError:
        return False


def node_rights(node: Node) -> frozenset[str]:
    return frozenset(right for right, on in ((FIND, node.allow_find), (GET, node.allow_get),
                                             (MOVE, node.allow_move), (STORE, node.allow_store))
                     if on)


class PeerCheck:
    """Decides whether a calling AE title may associate from an address."""

    def __init__(self, accounts: Accounts, timeout: float = RESOLVE_TIMEOUT_S) -> None:
        self.accounts = accounts
        self.timeout = timeout
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()
        # Few threads: a resolver stuck on one name must not use up a thread per association.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resolve")

    def addresses(self, host: str) -> frozenset[str]:
        """The addresses `host` resolves to (empty if it does not, in time); cached."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(host)
            if hit and hit[0] > now:
                return hit[1]
        try:
            ip = ipaddress.ip_address(host)
            found = frozenset({normal_address(str(ip))})
        except ValueError:
            try:
                infos = self._pool.submit(socket.getaddrinfo, host, None,
                                          type=socket.SOCK_STREAM).result(self.timeout)
                found = frozenset(normal_address(str(i[4][0])) for i in infos)
            except (OSError, FutureTimeout) as e:
                log.warning("node host %r does not resolve (%s)", host, e or "timed out")
                found = frozenset()
        with self._lock:
            self._cache[host] = (now + (CACHE_S if found else FAILED_CACHE_S), found)
        return found

    def refusal(self, calling_aet: str, address: str) -> str | None:
        """Why `calling_aet` may not associate from `address`, or None if it may."""
        node = self.accounts.node_by_aet(calling_aet.strip())
        if node is None:
            return None
        allowed = self.addresses(node.host)
        if normal_address(address) in allowed:
            return None
        return (f"calling AE title {calling_aet.strip()!r} is node {node.name!r}, whose host "
                f"{node.host!r} is {', '.join(sorted(allowed)) or 'not resolvable'}")

    def on_requested(self, event: Event) -> None:
        """EVT_REQUESTED handler: reject the association when `refusal` says so (pynetdicom
        lets this handler answer with an A-ASSOCIATE-RJ before any negotiation)."""
        assoc = event.assoc
        aet = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
        address = str(assoc.requestor.address)
        reason = self.refusal(aet, address)
        if reason is None:
            return
        log.warning("association from %s refused: %s", address, reason)
        assoc.acse.send_reject(*REJECT_CALLING_AET)
        assoc.is_rejected = True
        assoc.kill()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def from_this_machine(address: str, local: str) -> bool:
    """Whether a caller at `address`, connected to our `local` address, runs on this machine:
    loopback, or it called from the very address it called (a remote TCP peer cannot complete
    a handshake with our own address as its source)."""
    return is_loopback(address) or (bool(address) and address == local)


def _local_address(event: Event) -> str:
    """Our end of the association's connection ("" if unknown)."""
    return _local_of(event.assoc)


def _local_of(assoc: Association) -> str:
    try:
        return normal_address(str(assoc.dul.socket.socket.getsockname()[0]))  # type: ignore[union-attr]
    except (AttributeError, OSError, IndexError):
        return ""


def _reject(event: Event, rsd: tuple[int, int, int]) -> None:
    """A-ASSOCIATE-RJ before any negotiation (pynetdicom lets an EVT_REQUESTED handler do so:
    it then skips its own negotiation)."""
    assoc = event.assoc
    assoc.acse.send_reject(*rsd)
    assoc.is_rejected = True
    assoc.kill()


class Slots(Protocol):
    """Association slots counted for the whole server (pacsd.daemon.worker's link)."""

    def take(self, assoc: Association, address: str) -> str | None:
        """None: `assoc`, from `address`, is counted; else why it may not be."""

    def give(self, assoc: Association) -> None:
        """`assoc` is gone (also found by the slots themselves once its thread has ended)."""


class AssociationGuard:
    """The one place that decides who may associate and what they may ask (module text)."""

    def __init__(self, cfg: Config, accounts: Accounts,
                 then: Callable[[Event], None] | None = None,
                 slots: Slots | None = None) -> None:
        self.cfg = cfg
        # In a DICOM worker: the supervisor counts every worker's associations (both caps
        # hold for the server as a whole); otherwise this AE's associations are all there is.
        self.slots = slots
        self.accounts = accounts
        self.own_aet = cfg.dicom_aet.strip()
        self.allowed = frozenset(a.strip() for a in cfg.dicom_allowed_calling_aets)
        self.per_host = cfg.dicom_max_associations_per_host
        self.peers = PeerCheck(accounts) if cfg.dicom_check_peer_address else None
        self.then = then   # the plugins' on_association, once we have accepted
        self._lock = threading.Lock()

    def _same_host(self, event: Event, address: str) -> bool:
        return from_this_machine(address, _local_address(event))

    def rights(self, aet: str, address: str, same_host: bool) -> frozenset[str]:
        """What a caller may ask of us (C-ECHO aside, which anyone may)."""
        aet = aet.strip()
        if aet == self.own_aet and same_host:
            return ALL
        node = self.accounts.node_by_aet(aet)
        if node is not None:   # its switches hold in the open mode too: the admin set them
            return node_rights(node) | {WORKLIST}
        return ((ALL - {WORKLIST} if self.cfg.dicom_open_query_retrieve else OPEN)
                | ({WORKLIST} if self.cfg.worklist.open else set()))

    def _host_count(self, event: Event, address: str) -> int:
        """Associations from `address` now, this one included (pending connections are not
        associations yet: pacsd.dimse.listener caps those)."""
        return sum(1 for a in list(event.assoc.ae.active_associations)
                   if a.is_acceptor and normal_address(str(a.requestor.address)) == address)

    def on_requested(self, event: Event) -> None:
        """EVT_REQUESTED: accept or reject the association; narrow what it may negotiate."""
        assoc = event.assoc
        aet = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        address = normal_address(str(assoc.requestor.address))
        if self.slots is not None:
            refused = self.slots.take(assoc, address)
            if refused is not None:
                log.warning("association from %s (%s) refused: %s (local limit exceeded)",
                            address, aet, refused)
                _reject(event, REJECT_LOCAL_LIMIT)
                return
        elif self.per_host:
            with self._lock:   # two requests from one host decide one after the other
                count = self._host_count(event, address)
            if count > self.per_host:
                log.warning("association from %s (%s) refused: that host already has %d "
                            "association(s), the most [dicom] max_associations_per_host "
                            "allows (local limit exceeded)", address, aet, count - 1)
                _reject(event, REJECT_LOCAL_LIMIT)
                return
        same_host = self._same_host(event, address)
        if self.allowed and aet not in self.allowed and not (aet == self.own_aet and same_host):
            why = ("our own AE title: only this machine may use it" if aet == self.own_aet
                   else "[dicom] allowed_calling_aets")
            log.warning("association from %s refused: calling AE title %r is not allowed (%s)",
                        address, aet, why)
            _reject(event, REJECT_CALLING_AET)
            return
        if self.peers is not None and not (aet == self.own_aet and same_host):
            reason = self.peers.refusal(aet, address)
            if reason is not None:
                log.warning("association from %s refused: %s", address, reason)
                _reject(event, REJECT_CALLING_AET)
                return
        rights = self.rights(aet, address, same_host)
        denied = {s for s in (FIND, GET, MOVE, WORKLIST) if s not in rights}
        if denied:
            self._narrow(event, aet, address, denied)
        if self.then is not None:
            self.then(event)

    def on_closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE: an association that took a slot gives it back, whatever ended it
        (release, abort, a rejection after the count, a lost connection)."""
        if self.slots is not None:
            self.slots.give(event.assoc)

    def _narrow(self, event: Event, aet: str, address: str, denied: set[str]) -> None:
        """Take the denied services' presentation contexts out of this association's supported
        ones (answered "abstract syntax not supported"); one log line if it proposed any."""
        assoc = event.assoc
        syntaxes = set().union(*(SYNTAXES[s] for s in denied))
        proposed = {str(cx.abstract_syntax) for cx in
                    getattr(assoc.requestor.primitive, "presentation_context_definition_list",
                            None) or []}
        assoc.acceptor.supported_contexts = [
            cx for cx in assoc.acceptor.supported_contexts
            if str(cx.abstract_syntax) not in syntaxes]
        node = self.accounts.node_by_aet(aet)
        asked = sorted(_SERVICE[s] for s in denied & QUERY_RETRIEVE if SYNTAXES[s] & proposed)
        if asked:
            log.warning("%s refused to %r from %s: %s (presentation contexts rejected)",
                        "/".join(asked), aet, address,
                        f"node {node.name!r} has allow_{'/'.join(sorted(denied - {WORKLIST}))} "
                        "= false" if node is not None else
                        "not a node; add it to [[nodes]] or on the admin page (or set "
                        "[dicom] open_query_retrieve = true)")
        if WORKLIST in denied and SYNTAXES[WORKLIST] & proposed:
            log.warning("Modality Worklist/MPPS refused to %r from %s: not a node; add it to "
                        "[[nodes]] or on the admin page (or set [worklist] open = true) "
                        "(presentation contexts rejected)", aet, address)

    def may_store(self, assoc: Association, what: str) -> bool:
        """For C-STORE and storage commitment: False (logged once per request) when the
        caller is a node with allow_store = false; answer NOT_AUTHORIZED then."""
        aet = str(assoc.requestor.ae_title or "").strip()
        address = normal_address(str(assoc.requestor.address))
        node = self.accounts.node_by_aet(aet)
        if node is None or node.allow_store or (aet == self.own_aet
                                                and from_this_machine(address, _local_of(assoc))):
            return True
        log.warning("%s from %r (%s) refused (0x0124, not authorized): node %r has "
                    "allow_store = false", what, aet, address, node.name)
        return False

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()
