"""Presentation contexts beyond build_ae's: private and unknown storage SOP classes, and one log
line per association for the contexts we reject.

Modalities store private SOP classes next to their images (Siemens CSA Non-Image
1.3.12.2.1107.5.9.1, GE's 1.2.840.113619.4.*), and a newer standard adds storage classes that
the installed pynetdicom does not know. An archive keeps them as received; refusing them loses
data the modality's own viewer needs. So, unless `[dicom] accept_unknown_sop_classes = false`:

- on A-ASSOCIATE-RQ (EVT_REQUESTED, after the guard has accepted), each proposed abstract
  syntax that is a private UID, or a public one under the storage root (1.2.840.10008.5.1.4.1.1)
  that we do not support, gets a supported context of its own for this association, with the
  storage transfer syntaxes in our order of preference (PS3.8 9.3.2.2, negotiated as usual);
- its C-STOREs must reach the Storage Service: pynetdicom picks a service class by SOP Class
  UID, and for one it does not know it would abort. SOP Class Common Extended Negotiation
  (PS3.7 D.3.3.6) is the standard's way to say which service class a SOP class belongs to;
  pynetdicom's EVT_SOP_COMMON handler returns the accepted items, and we add, for each such
  class, "Storage Service Class" (1.2.840.10008.4.2). No response item goes to the peer (there
  is none in PS3.7). pacsd.compat.pynetdicom.UNKNOWN_STORAGE checks what this relies on.

pynetdicom's own `_config.UNRESTRICTED_STORAGE_SERVICE` is process-wide and accepts the first
transfer syntax the peer proposes for every storage class, ours or not, which would undo the
order of preference (lossless before lossy); this keeps it, per association.

Every rejected presentation context (PS3.8 9.3.3.2 results 1, 2, 3, 4) is logged once per
association, in one line naming the calling AE title, the address, each UID (with its name if
pydicom knows it) and the reason. Contexts the guard took out (query/retrieve, worklist, MPPS)
are not repeated here: pacsd.dimse.access logs its own line for them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

from pydicom.uid import UID
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import SOPClassCommonExtendedNegotiation
from pynetdicom.presentation import PresentationContext, build_context

from pacsd.compat import pynetdicom as compat

log = logging.getLogger(__name__)

STANDARD_ROOT = "1.2.840.10008."
STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"   # PS3.4 B.5: the Storage Service Class UID
# PS3.5 9.1: digits and dots, no empty component, no leading zero, at most 64 characters.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# A line, not a page: a peer proposes at most 128 contexts (PS3.8 9.3.2.2, odd IDs 1-255).
MAX_LISTED = 12

_REASONS = {0x01: "rejected (no role we can take)", 0x02: "rejected (no reason)",
            0x03: "abstract syntax not supported", 0x04: "transfer syntax not supported"}


def is_unknown_storage(uid: str, known: Iterable[str] | set[str]) -> bool:
    """Whether `uid` is a storage SOP class we would accept only as unknown: a valid UID,
    private (outside 1.2.840.10008) or under the standard's storage root, and not one of
    `known` (the abstract syntaxes build_ae supports)."""
    uid = str(uid)
    if uid in known or len(uid) > 64 or not _UID.fullmatch(uid):   # the cheap test first
        return False
    return not uid.startswith(STANDARD_ROOT) or uid.startswith(STORAGE_ROOT)


def describe(uid: str) -> str:
    """A UID with its name when pydicom knows one: "1.2.840.10008.5.1.4.1.1.2 (CT Image
    Storage)"."""
    name = UID(uid).name
    return uid if not name or name == uid else f"{uid} ({name})"


@functools.lru_cache(maxsize=256)
def _storage_context(uid: str, syntaxes: tuple[str, ...]) -> PresentationContext:
    """The context we support for an unknown storage class, made once per class: pynetdicom
    validates each of its 30-odd transfer syntaxes as it builds one, a fifth of a whole C-GET
    from DCMTK's getscu (which proposes classes pynetdicom does not list). Shared: negotiation
    only reads an acceptor's contexts (as pacsd.dimse shares the server's own)."""
    cx = build_context(uid, list(syntaxes))
    # Both roles, as every storage class of build_ae: a C-GET requestor's images.
    cx.scu_role, cx.scp_role = True, True
    return cx


class UnknownClasses:
    """The per-association handlers for unknown storage classes and rejected contexts."""

    def __init__(self, accept: bool, known: Iterable[str], syntaxes: list[str]) -> None:
        self.accept = accept and compat.UNKNOWN_STORAGE.fits
        self.refused_by_setting = not accept
        self.known = frozenset(str(u) for u in known)
        self.syntaxes = tuple(syntaxes)

    def _proposed(self, event: Event) -> list[PresentationContext]:
        return list(getattr(event.assoc.requestor.primitive,
                            "presentation_context_definition_list", None) or [])

    def on_requested(self, event: Event) -> None:
        """EVT_REQUESTED, after the guard: support each unknown storage class proposed."""
        assoc = event.assoc
        if not self.accept or assoc.is_rejected or not assoc.is_alive():
            return
        known = self.known.union(str(cx.abstract_syntax)
                                 for cx in assoc.acceptor.supported_contexts)
        extra = sorted({str(cx.abstract_syntax) for cx in self._proposed(event)
                        if is_unknown_storage(str(cx.abstract_syntax), known)})
        if not extra:
            return
        added = [_storage_context(uid, self.syntaxes) for uid in extra]
        assoc.acceptor.supported_contexts = list(assoc.acceptor.supported_contexts) + added
        log.debug("association from %s: unknown storage class(es) supported: %s",
                  assoc.requestor.ae_title, ", ".join(extra))

    def on_sop_common(self, event: Event) -> dict[UID, SOPClassCommonExtendedNegotiation]:
        """EVT_SOP_COMMON: the accepted SOP Class Common Extended Negotiation items. None of
        the peer's is taken (as pynetdicom's default handler); each unknown storage class we
        support in this association is mapped to the Storage Service Class."""
        if not self.accept:
            return {}
        out: dict[UID, SOPClassCommonExtendedNegotiation] = {}
        for cx in event.assoc.acceptor.supported_contexts:
            uid = str(cx.abstract_syntax)
            if is_unknown_storage(uid, self.known):
                item = SOPClassCommonExtendedNegotiation()
                item.sop_class_uid = uid
                item.service_class_uid = STORAGE_SERVICE_CLASS
                out[UID(uid)] = item
        return out

    def on_accepted(self, event: Event) -> None:
        """EVT_ACCEPTED: one line for the contexts rejected in this association."""
        assoc = event.assoc
        rejected = list(assoc.rejected_contexts or [])
        if not rejected:
            return
        supported = {str(cx.abstract_syntax) for cx in assoc.acceptor.supported_contexts}
        proposed = {cx.context_id: cx for cx in self._proposed(event)}
        seen: dict[tuple[str, str], None] = {}
        for cx in rejected:
            uid = str(cx.abstract_syntax)
            result = int(cx.result) if cx.result is not None else 0x02
            if result == 0x03 and uid in self.known and uid not in supported:
                continue   # taken out by the guard, which logged it (pacsd.dimse.access)
            reason = _REASONS.get(result, f"rejected (result {result})")
            if result == 0x03 and self.refused_by_setting and is_unknown_storage(uid, supported):
                reason = "refused by [dicom] accept_unknown_sop_classes = false"
            elif result == 0x04:
                asked = proposed.get(cx.context_id)
                offered = [str(ts) for ts in (asked.transfer_syntax if asked else [])]
                reason += f" (proposed: {', '.join(describe(ts) for ts in offered[:4])})"
            seen[(uid, reason)] = None
        if not seen:
            return
        items = [f"{describe(uid)}: {reason}" for uid, reason in seen]
        more = f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
        log.warning("association from %s (%s): %d presentation context(s) rejected: %s%s",
                    assoc.requestor.ae_title, assoc.requestor.address, len(items),
                    "; ".join(items[:MAX_LISTED]), more)
