"""C-GET as SCU: ask a node for a study and store what it sends back on the same association
(PS3.4 C.4.3), for XML-RPC `Retrieve` with retrieveMode 1 (OsiriX's CGETRetrieveMode).

Unlike C-MOVE, the node needs no route back to us: the images come over our association, as
C-STORE requests we answer as Storage SCP (SCP/SCU Role Selection, PS3.7 D.3.3.4). Each goes to
`Archive.put`, as a C-STORE to our listener does.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    StudyRootQueryRetrieveInformationModelGet)

from pacsd.config import Config, Node
from pacsd.dicom_status import CANCEL, PENDING, PROCESSING_FAILURE, SUCCESS, \
    WARNING_SUBOPERATIONS_FAILED
from pacsd.errors import PacsError
from pacsd.nodes.remote import MAX_CONTEXTS, RemoteError, scu_ae, open_association, close_association, query_identifier
from pacsd.storage.archive import Archive

log = logging.getLogger(__name__)


def get_here(cfg: Config, node: Node, keys: dict[str, str], archive: Archive,
             level: str = "STUDY") -> dict[str, int]:
    """C-GET what `keys` name from `node` into `archive`; the final sub-operation counts."""
    model = StudyRootQueryRetrieveInformationModelGet
    # One context for the C-GET, the rest (up to 128, PS3.8 9.3.2.2) for the storage classes
    # we take back, each in the SCP role.
    storage = [str(cx.abstract_syntax) for cx in StoragePresentationContexts
               if cx.abstract_syntax][:MAX_CONTEXTS - 1]
    contexts = [build_context(model)] + [build_context(uid) for uid in storage]
    roles = [build_role(uid, scp_role=True) for uid in storage]
    stored = {"stored": 0, "refused": 0}

    def on_store(event: Event) -> int | Dataset:
        req: Any = event.request
        try:
            archive.put(event.encoded_dataset(include_meta=False),
                        transfer_syntax=event.context.transfer_syntax,
                        sop_class=str(req.AffectedSOPClassUID),
                        sop_instance=str(req.AffectedSOPInstanceUID), calling_aet=node.aet)
        except PacsError as e:
            stored["refused"] += 1
            log.warning("C-GET from %s: %s refused with 0x%04X: %s", node.aet,
                        req.AffectedSOPInstanceUID, e.dicom_status, e)
            return e.dicom_status
        except Exception:  # a bug must cost one image, not the association
            stored["refused"] += 1
            log.exception("C-GET from %s: storing %s failed", node.aet, req.AffectedSOPInstanceUID)
            return PROCESSING_FAILURE
        stored["stored"] += 1
        return SUCCESS

    ae = scu_ae(cfg)
    assoc = open_association(ae, node, contexts, handlers=[(evt.EVT_C_STORE, on_store)],
                             ext_neg=roles)
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_get(query_identifier(level, keys), model):
            if not status:
                break
            if int(status.Status) != PENDING:
                final = status
    finally:
        close_association(ae, assoc)
    if final is None:
        raise RemoteError(f"C-GET from {node.aet}: no final response within the time limit")
    counts = {"status": int(final.Status), **stored}
    for name, key in (("completed", "NumberOfCompletedSuboperations"),
                      ("failed", "NumberOfFailedSuboperations"),
                      ("warning", "NumberOfWarningSuboperations")):
        counts[name] = int(final.get(key, 0) or 0)
    if counts["status"] not in (SUCCESS, WARNING_SUBOPERATIONS_FAILED, CANCEL):
        raise RemoteError(f"C-GET from {node.aet} failed (status 0x{counts['status']:04X})")
    return counts
