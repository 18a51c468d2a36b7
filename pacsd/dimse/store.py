"""Storage SOP Classes as SCP (PS3.4 Annex B): C-STORE into the archive.

A thin adapter: the encoded data set goes to `Archive.put` untouched; its errors carry their
DICOM status. Success is returned only after `put` has made the file and its row durable.
"""

from __future__ import annotations

import logging
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from pacsd.storage.archive import Archive
from pacsd.storage.store import NewFile
from pacsd.dicom_status import PROCESSING_FAILURE
from pacsd.dimse import filters
from pacsd.dimse.audit import count_stored
from pacsd.errors import PacsError, SOPClassMismatch
from pacsd.plugins.hooks import Hooks

log = logging.getLogger(__name__)


def _status(code: int, comment: str) -> int | Dataset:
    """The C-STORE status, with an Error Comment (PS3.7 C.4) the modality can show."""
    if not comment:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(event: Event, archive: Archive, stats: dict, hooks: Hooks | None = None
                 ) -> int | Dataset:
    """EVT_C_STORE: the C-STORE as pynetdicom carries it (the fast lane, pacsd.dimse.fast,
    calls `store_encoded` itself)."""
    req = cast(C_STORE, event.request)
    cx = event.context
    aet = event.assoc.requestor.ae_title
    sop_class, sop_instance = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
    try:
        encoded = event.encoded_dataset(include_meta=False)
        if hooks is not None and hooks.has("on_store"):
            if sop_class != cx.abstract_syntax:
                raise _mismatch(sop_class, str(cx.abstract_syntax))
            refused, encoded, changed = filters.store(event, hooks, encoded,
                                                      cx.transfer_syntax)
            if refused is not None:
                stats["failed"] = stats.get("failed", 0) + 1
                return refused
            sop_instance = changed or sop_instance
    except PacsError as e:
        return _status(*_refused(e, aet, stats))
    except Exception:  # a bug must cost one image, not the association or the server
        stats["failed"] = stats.get("failed", 0) + 1
        log.exception("C-STORE from %s failed", aet)
        return PROCESSING_FAILURE
    return _status(*store_encoded(archive, stats, aet, sop_class, str(cx.abstract_syntax),
                                  sop_instance, str(cx.transfer_syntax), encoded))


def store_encoded(archive: Archive, stats: dict, aet: str, sop_class: str, context_class: str,
                  sop_instance: str, transfer_syntax: str, encoded: bytes,
                  written: NewFile | None = None) -> tuple[int, str]:
    """One C-STORE's data set into the archive: (status, error comment). Success only once
    `Archive.put` has made the file and its row durable. `written`: the file the fast lane
    wrote the data set into as it arrived (dropped here if refused before put)."""
    try:
        if sop_class != context_class:
            if written is not None:
                written.drop()
            raise _mismatch(sop_class, context_class)
        stored = archive.put(encoded, transfer_syntax=transfer_syntax, sop_class=sop_class,
                             sop_instance=sop_instance, calling_aet=aet, written=written)
    except PacsError as e:
        return _refused(e, aet, stats)
    except Exception:  # a bug must cost one image, not the association or the server
        stats["failed"] = stats.get("failed", 0) + 1
        log.exception("C-STORE from %s failed", aet)
        return PROCESSING_FAILURE, ""
    key = "duplicates" if stored.duplicate else "stored"
    stats[key] = stats.get(key, 0) + 1
    count_stored(stats, stored.study_instance_uid)   # the audit trail's count, by study
    log.debug("stored %s from %s as %s", stored.sop_instance_uid, aet, stored.path or "-")
    return stored.warning, stored.comment


def _mismatch(sop_class: str, context_class: str) -> SOPClassMismatch:
    return SOPClassMismatch(f"request SOP Class {sop_class} differs from its presentation "
                            f"context's {context_class}")


def _refused(e: PacsError, aet: str, stats: dict) -> tuple[int, str]:
    stats["failed"] = stats.get("failed", 0) + 1
    log.log(logging.WARNING if e.log_each else logging.DEBUG,
            "C-STORE from %s refused with 0x%04X: %s", aet, e.dicom_status, e)
    return e.dicom_status, getattr(e, "comment", "")
