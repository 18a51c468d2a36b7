"""What the fast lane (pacsd.compat.pynetdicom_lane) answers itself: C-STORE on a standard
storage context, and C-ECHO. The same guard, the same store, the same counters and the same
statuses as through pynetdicom's services; only the path of the bytes is shorter.

Left to pynetdicom: a C-STORE when an `on_store` plugin may change or refuse it (the plugins
see a pynetdicom event), on a private or unknown storage class, or on a class whose service
came from SOP Class Common Extended Negotiation; and every other request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsd.dicom_status import SUCCESS
from pacsd.dimse.access import NOT_AUTHORIZED, AssociationGuard
from pacsd.dicom_commands import C_ECHO_RQ, C_STORE_RQ, Command, response
from pacsd.dimse.stats import DimseStats
from pacsd.dimse.store import store_encoded
from pacsd.plugins.hooks import Hooks
from pacsd.imaging.header import is_valid_uid
from pacsd.storage.archive import Archive
from pacsd.storage.store import NewFile

log = logging.getLogger(__name__)

STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
VERIFICATION = str(Verification)


class FastPath:
    def __init__(self, archive: Archive, guard: AssociationGuard, stats: DimseStats,
                 assoc_stats: Callable[[Association], dict[str, Any]],
                 hooks: Hooks | None) -> None:
        self.archive = archive
        self.guard = guard
        self.stats = stats
        self.assoc_stats = assoc_stats
        self.plugins_see_stores = hooks is not None and hooks.has("on_store")

    def wants(self, assoc: Association, cx: PresentationContext, command: Command) -> bool:
        if command.message_id < 0:
            return False   # pynetdicom answers a request without Message ID as it does
        if command.field == C_STORE_RQ:
            return (command.has_data and not self.plugins_see_stores
                    and str(cx.abstract_syntax) in STORAGE_CLASSES
                    and bool(cx.as_scp)
                    and command.sop_class not in assoc.acceptor.accepted_common_extended)
        if command.field == C_ECHO_RQ:
            return not command.has_data and str(cx.abstract_syntax) == VERIFICATION
        return False

    def sink(self, assoc: Association, cx: PresentationContext, command: Command
             ) -> NewFile | None:
        """The file the C-STORE's data set is written into as it arrives; None when its UIDs
        are bad (put() refuses it, nothing written) or it may not store at all."""
        if command.field != C_STORE_RQ or not all(
                is_valid_uid(u) for u in (command.sop_class, command.sop_instance,
                                          str(cx.transfer_syntax[0]))):
            return None
        return self.archive.begin_file(command.sop_class, command.sop_instance,
                                       str(cx.transfer_syntax[0]),
                                       str(assoc.requestor.ae_title))

    def answer(self, assoc: Association, cx: PresentationContext, command: Command,
               data: bytes | None, sink: NewFile | None = None) -> bytes:
        """The encoded response command set. Never raises: a failure is a status."""
        if command.field == C_ECHO_RQ:
            self.stats.requested("C-ECHO")
            log.debug("C-ECHO from %s", assoc.requestor.ae_title)
            return response(command, SUCCESS)
        self.stats.requested("C-STORE")
        stats = self.assoc_stats(assoc)
        if not self.guard.may_store(assoc, "C-STORE"):
            if sink is not None:
                sink.drop()
            stats["failed"] = stats.get("failed", 0) + 1
            self.stats.stored(NOT_AUTHORIZED)
            return response(command, NOT_AUTHORIZED)
        assert data is not None   # wants() took only C-STOREs with a data set
        status, comment = store_encoded(
            self.archive, stats, str(assoc.requestor.ae_title), command.sop_class,
            str(cx.abstract_syntax), command.sop_instance, str(cx.transfer_syntax[0]), data,
            written=sink)
        self.stats.stored(status)
        return response(command, status, comment)
