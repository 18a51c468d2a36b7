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
from pacsd.dicom_status import PROCESSING_FAILURE
from pacsd.dimse import filters
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
    req = cast(C_STORE, event.request)
    cx = event.context
    aet = event.assoc.requestor.ae_title
    try:
        if req.AffectedSOPClassUID != cx.abstract_syntax:
            raise SOPClassMismatch(f"request SOP Class {req.AffectedSOPClassUID} differs from "
                                   f"its presentation context's {cx.abstract_syntax}")
        encoded = event.encoded_dataset(include_meta=False)
        sop_instance = str(req.AffectedSOPInstanceUID)
        if hooks is not None and hooks.has("on_store"):
            refused, encoded, changed = filters.store(event, hooks, encoded,
                                                      cx.transfer_syntax)
            if refused is not None:
                stats["failed"] = stats.get("failed", 0) + 1
                return refused
            sop_instance = changed or sop_instance
        stored = archive.put(encoded, transfer_syntax=cx.transfer_syntax,
                             sop_class=str(req.AffectedSOPClassUID),
                             sop_instance=sop_instance, calling_aet=aet)
    except PacsError as e:
        stats["failed"] = stats.get("failed", 0) + 1
        log.log(logging.WARNING if e.log_each else logging.DEBUG,
                "C-STORE from %s refused with 0x%04X: %s", aet, e.dicom_status, e)
        return _status(e.dicom_status, getattr(e, "comment", ""))
    except Exception:  # a bug must cost one image, not the association or the server
        stats["failed"] = stats.get("failed", 0) + 1
        log.exception("C-STORE from %s failed", aet)
        return PROCESSING_FAILURE
    key = "duplicates" if stored.duplicate else "stored"
    stats[key] = stats.get(key, 0) + 1
    log.debug("stored %s from %s as %s", stored.sop_instance_uid, aet, stored.path or "-")
    return _status(stored.warning, stored.comment)
