"""The DICOM front end: one pynetdicom AE, one thread per association, one module per service.

build_ae() declares what we accept; DicomServer binds the handlers to the archive and runs the
listener. Handlers are thin adapters over archive / query / index / store.
"""

from __future__ import annotations

import copy
import errno
import logging
import socket
import threading
import time
from functools import partial
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
    ModalityPerformedProcedureStep, ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove,
    Verification)
from pynetdicom.transport import ThreadedAssociationServer
from pydicom.dataset import Dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, HTJ2KLossless, HTJ2KLosslessRPCL,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLossless,
                         JPEGLSLossless, RLELossless)

from pacsd.storage.archive import Archive
from pacsd.config import Config
from pacsd.accounts import Accounts
from pacsd.compat import pynetdicom as compat
from pacsd.compat.pydicom import remember_uid_checks
from pacsd.dimse import filters
from pacsd.audit import Auditor
from pacsd.dimse.access import NOT_AUTHORIZED, AssociationGuard, Slots
from pacsd.dimse.audit import DimseAudit
from pacsd.dimse.commitment import PUSH_MODEL, Commitments
from pacsd.dimse.commitment import status as commitment_status
from pacsd.dimse.contexts import UnknownClasses
from pacsd.dimse.echo import handle_echo
from pacsd.dimse.fast import FastPath
from pacsd.dimse.find import handle_find
from pacsd.nodes import ondemand
from pacsd.dimse.limits import bound_pdus
from pacsd.dimse.listener import Listener, tls_context
from pacsd.dimse.mpps import PerformedSteps
from pacsd.dimse.retrieve import handle_get, handle_move, scope_of
from pacsd.dimse.stats import DimseStats
from pacsd.nodes.remote import CONNECTION_HANDLERS
from pacsd.dimse.store import handle_store
from pacsd.dimse.worklist import MWL_FIND, handle_worklist
from pacsd.errors import PortInUse
from pacsd.plugins.hooks import Hooks

log = logging.getLogger(__name__)

QR_MODELS = (PatientRootQueryRetrieveInformationModelFind,
             StudyRootQueryRetrieveInformationModelFind,
             PatientRootQueryRetrieveInformationModelMove,
             StudyRootQueryRetrieveInformationModelMove,
             PatientRootQueryRetrieveInformationModelGet,
             StudyRootQueryRetrieveInformationModelGet)


# When a peer offers several transfer syntaxes in one presentation context, pynetdicom accepts the
# first of *ours* that is offered. Explicit VR Little Endian first (keeps every VR, every viewer
# reads it), then the lossless compressions, then implicit VR and big endian; lossy syntaxes
# last, so that an image offered both lossy and lossless is stored lossless.
_PREFERRED = (ExplicitVRLittleEndian, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless,
              JPEG2000Lossless, RLELossless, HTJ2KLossless, HTJ2KLosslessRPCL,
              DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
STORAGE_SYNTAXES = list(_PREFERRED) + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _PREFERRED]
PLAIN_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                  DeflatedExplicitVRLittleEndian]


class _Context(PresentationContext):
    """A supported context that is shared, not copied, by every association.

    pynetdicom deep-copies the server's contexts for every association: with every storage
    class times every transfer syntax that took 40 ms per association (C-ECHO at 58 ms), and
    copying only the lists still took a quarter of an association's set-up. Nothing changes
    them: pynetdicom's negotiation (presentation.negotiate_as_acceptor) reads the acceptor's
    contexts and builds new ones for the result, and pacsd's handlers (access, contexts) give
    an association another list instead of changing an item."""

    def __deepcopy__(self, memo: dict) -> "_Context":
        return self


def _cheap_copies(contexts: list[PresentationContext]) -> list[PresentationContext]:
    out: list[PresentationContext] = []
    for cx in contexts:
        new = _Context()
        new.__dict__.update(copy.deepcopy(cx.__dict__))
        out.append(new)
    return out


def build_ae(cfg: Config) -> AE:
    # Retrieve sends stored files by path, raw and in chunks, without decoding them.
    compat.send_files_as_stored()
    compat.quiet_identifiers()
    compat.quiet_standard_handlers()
    compat.remember_uids()
    remember_uid_checks()   # pynetdicom checks each UID of an association many times over
    ae = compat.HandOverAE(ae_title=cfg.dicom_aet)   # C-MOVE: see pacsd.dimse.retrieve
    ae.maximum_associations = cfg.dicom_max_associations
    ae.acse_timeout = cfg.dicom_acse_timeout
    # C-MOVE sub-associations: a destination whose host drops the connection request fails
    # after this, not after the system's TCP connect timeout (about two minutes).
    ae.connection_timeout = cfg.dicom_acse_timeout
    ae.dimse_timeout = cfg.dicom_dimse_timeout
    ae.network_timeout = cfg.dicom_network_timeout
    ae.maximum_pdu_size = cfg.dicom_max_pdu
    # Who may call, and what they may ask: pacsd.dimse.access.AssociationGuard, not
    # pynetdicom's require_calling_aet (which cannot see the caller's address).
    ae.add_supported_context(Verification, PLAIN_SYNTAXES)
    for model in QR_MODELS:
        ae.add_supported_context(model, PLAIN_SYNTAXES)
    # Storage Commitment Push Model (PS3.4 Annex J): N-ACTION in; reports go out on associations
    # of our own (pacsd.dimse.commitment).
    ae.add_supported_context(PUSH_MODEL, PLAIN_SYNTAXES)
    if cfg.worklist.enabled:
        # Modality Worklist FIND (PS3.4 K) and MPPS (F.7): pacsd.dimse.worklist, .mpps.
        ae.add_supported_context(ModalityWorklistInformationFind, PLAIN_SYNTAXES)
        ae.add_supported_context(ModalityPerformedProcedureStep, PLAIN_SYNTAXES)
    # Every storage class with every transfer syntax, as SCP (a modality stores to us) and, via
    # SCP/SCU role selection, as SCU (we store back to a C-GET requestor, PS3.4 C.4.3.1).
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax or "", STORAGE_SYNTAXES,
                                 scu_role=True, scp_role=True)
    return ae


class DicomServer:
    def __init__(self, cfg: Config, archive: Archive, accounts: Accounts,
                 hooks: Hooks | None = None, *, listen: socket.socket | None = None,
                 slots: Slots | None = None, audit: Auditor | None = None) -> None:
        """`listen` and `slots`: in a DICOM worker (pacsd.daemon.worker), the supervisor's
        listening socket, shared with the other workers, and its count of associations.
        `audit`: this process's audit trail (pacsd.dimse.audit records to it)."""
        self.cfg = cfg
        self.listen = listen
        self.archive = archive
        self.accounts = accounts
        self.hooks = hooks
        self.ae = build_ae(cfg)
        self.commitments = Commitments(cfg, archive.index, archive.store, accounts)
        self.performed = PerformedSteps(archive.index, audit=audit)
        then = (partial(filters.on_requested, hooks=hooks)
                if hooks is not None and hooks.has("on_association") else None)
        self.guard = AssociationGuard(cfg, accounts, then, slots)
        # Private and unknown storage classes, and the log line of rejected contexts.
        self.contexts = UnknownClasses(
            cfg.dicom_accept_unknown_sop_classes,
            (str(cx.abstract_syntax) for cx in self.ae.supported_contexts), STORAGE_SYNTAXES)
        self.tls = tls_context(cfg)   # ConfigError now, at start-up, if the files are bad
        self.server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._stats: dict[int, dict[str, Any]] = {}
        self.audit = audit or Auditor.off()
        self.audited = DimseAudit(self.audit)
        self._lock = threading.Lock()
        self.stats = DimseStats()   # since start, for /metrics
        self.fast = FastPath(archive, self.guard, self.stats, self._assoc_stats, hooks)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def alive(self) -> bool:
        """Whether the listener still accepts: its socket is open and its accept loop runs."""
        sock = self.server.socket if self.server is not None else None
        return (sock is not None and sock.fileno() >= 0
                and self._thread is not None and self._thread.is_alive())

    @property
    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    def figures(self) -> dict[str, Any]:
        """The counters since start and the queues of the DICOM side (for /metrics)."""
        return {**self.stats.snapshot(), "associations_active": self.active_associations,
                "commitments_pending": self.commitments.pending}

    def _assoc_stats(self, assoc: Association) -> dict[str, Any]:
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = self._stats[id(assoc)] = self.audited.new_stats()
            return stats

    def _scope_of(self, aet: str) -> Any:
        return scope_of(self.accounts, aet)

    def _on_end(self, event: Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        self.audited.association_ended(event.assoc, stats)   # takes its studies out of stats
        how = "ended" if event.event is evt.EVT_RELEASED else "aborted"
        if stats:
            log.info("association from %s (%s) %s: %d stored, %d duplicate, %d refused",
                     event.assoc.requestor.ae_title, event.assoc.requestor.address, how,
                     stats.get("stored", 0), stats.get("duplicates", 0), stats.get("failed", 0))
        elif how == "aborted":
            # pynetdicom's own lines (connection reset, A-ABORT) are DEBUG (pacsd.logbook).
            log.info("association from %s (%s) aborted (A-ABORT, or the connection was lost)",
                     event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_store(self, event: Event) -> int | Dataset:
        if not self.guard.may_store(event.assoc, "C-STORE"):
            stats = self._assoc_stats(event.assoc)
            stats["failed"] = stats.get("failed", 0) + 1
            self.stats.stored(NOT_AUTHORIZED)
            return NOT_AUTHORIZED
        result = handle_store(event, self.archive, self._assoc_stats(event.assoc), self.hooks)
        self.stats.stored(result)
        return result

    def _on_n_action(self, event: Event) -> Any:
        if not self.guard.may_store(event.assoc, "storage commitment request"):
            return commitment_status(NOT_AUTHORIZED, "not authorized to store here"), None
        return self.commitments.on_n_action(event)

    def _on_requested(self, event: Event) -> None:
        # The guard first: it may reject the association, or narrow what it may negotiate.
        self.guard.on_requested(event)
        if event.assoc.is_rejected:   # A-ASSOCIATE-RJ sent by the guard or a plugin
            self.stats.association_rejected("refused")
            if self.audit.enabled:
                self.audited.rejected(event.assoc, "refused by the association guard")
            return
        self.contexts.on_requested(event)

    def _on_accepted(self, event: Event) -> None:
        self.stats.association_accepted()
        self.contexts.on_accepted(event)

    def _on_rejected(self, event: Event) -> None:
        # pynetdicom's own rejections (the guard logs its own): all associations in use.
        self.stats.association_rejected("limit")
        if self.audit.enabled:
            self.audited.rejected(event.assoc, "all associations in use")
        log.warning("association from %s (%s) refused: all %d associations are in use "
                    "([dicom] max_associations; local limit exceeded)",
                    event.assoc.requestor.address, event.assoc.requestor.ae_title,
                    self.cfg.dicom_max_associations)

    def start(self) -> None:
        archive = self.archive
        # With upstream nodes, C-FIND falls through to them (PACS On-Demand); else untouched.
        qr_find: Any = partial(handle_find, index=archive.index, aet=self.cfg.dicom_aet,
                               hooks=self.hooks, scope_of=self._scope_of,
                               cfg=self.cfg if ondemand.upstreams(self.cfg) else None)
        worklist: Any = partial(handle_worklist, index=archive.index,
                                max_results=self.cfg.worklist.max_results)

        def any_find(event: Event) -> Any:
            # One EVT_C_FIND handler for every C-FIND: the SOP class says which service.
            if str(event.request.AffectedSOPClassUID) == MWL_FIND:
                return worklist(event)
            return qr_find(event)
        find: Any = any_find
        get: Any = partial(handle_get, index=archive.index, store=archive.store,
                           accounts=self.accounts)
        move: Any = partial(handle_move, accounts=self.accounts, index=archive.index,
                            store=archive.store)
        if self.audit.enabled:   # one audit record per request (pacsd.dimse.audit)
            find = self.audited.find(find)
            get = self.audited.retrieve(get, "retrieve")
            move = self.audited.retrieve(move, "send")
        handlers: list[Any] = [
            *CONNECTION_HANDLERS,
            (evt.EVT_CONN_OPEN, partial(bound_pdus, max_pdu=self.cfg.dicom_max_pdu)),
            *([(evt.EVT_CONN_OPEN, partial(compat.open_lane, fast=self.fast))]
              if self.cfg.dicom_fast_lane else []),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, find),
            (evt.EVT_C_GET, get),
            (evt.EVT_C_MOVE, move),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_N_CREATE, self.performed.on_n_create),   # MPPS (pacsd.dimse.mpps)
            (evt.EVT_N_SET, self.performed.on_n_set),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_REJECTED, self._on_rejected),
            # The one guard in front of every service (pacsd.dimse.access); it hands over to
            # the plugins' on_association once it has accepted. Then unknown storage classes
            # (pacsd.dimse.contexts).
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_SOP_COMMON, self.contexts.on_sop_common),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_DIMSE_RECV, self.stats.on_dimse_recv),   # requests by operation
            *([(evt.EVT_CONN_CLOSE, self.guard.on_closed)] if self.guard.slots else []),
        ]
        address = (self.cfg.dicom_bind or "0.0.0.0", self.cfg.dicom_port)
        try:
            server = self.ae.make_server(
                address, evt_handlers=handlers, server_class=Listener, ssl_context=self.tls,
                contexts=_cheap_copies(self.ae.supported_contexts), inherited=self.listen)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise PortInUse(f"cannot listen for DICOM on {address[0]}:{address[1]}: "
                                f"{e.strerror}") from None
            raise
        # What ae.start_server(block=False) does, but keeping the accept thread: the health
        # check watches it (a test connection would hold an association slot for acse_timeout).
        # Listed with the AE as start_server lists its own; server.shutdown() unlists it.
        compat.register_server(self.ae, server)
        self.server = server
        # A worker's accept loop looks for a stop request more often: when its server's
        # process is gone, it must stop accepting at once (pacsd.daemon.worker).
        self._thread = threading.Thread(target=server.serve_forever, name="dicom", daemon=True,
                                        args=(0.1 if self.listen is not None else 0.5,))
        self._thread.start()
        if self.listen is None:   # a worker's supervisor says where it listens
            log.info("DICOM listener %s on %s:%d", self.cfg.dicom_aet, address[0], self.port)

    def stop(self, timeout: float = 10.0) -> None:
        if self.server is None:
            return
        if timeout <= 0:   # no drain (a worker whose server is gone): cut them now
            for assoc in list(self.ae.active_associations):
                assoc.abort()
        self.server.shutdown()   # stop accepting
        # Let running associations finish within one overall bound, then abort the rest: an
        # aborted C-STORE was never acknowledged, so nothing acknowledged is lost.
        deadline = time.monotonic() + timeout
        for assoc in list(self.ae.active_associations):
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in list(self.ae.active_associations):
            log.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        self.ae.shutdown()
        self.commitments.stop()
        self.guard.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.server = None
        if self.listen is None:
            log.info("DICOM listener stopped")
