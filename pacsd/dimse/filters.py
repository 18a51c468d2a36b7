"""The plugins' say on the DICOM side (pacsd.plugins.hooks): who may associate, what is stored, what is
asked. Each is a no-op unless some plugin has the hook; each overrules a failing or late hook
by accepting (pacsd.plugins.hooks.Hooks.decide), so a broken plugin never blocks the listener.
"""

from __future__ import annotations

import io
import logging
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from pacsd.dicom_status import NOT_AUTHORIZED
from pacsd.dimse.access import REJECT_CALLING_AET
from pacsd.plugins.hooks import Hooks

log = logging.getLogger(__name__)


def peer(event: Event) -> dict[str, Any]:
    """Who is on the other end, as hooks see it."""
    assoc = event.assoc
    return {"calling_aet": str(assoc.requestor.ae_title or "").strip(),
            "called_aet": str(assoc.acceptor.ae_title or "").strip(),
            "peer_address": str(assoc.requestor.address)}


def on_requested(event: Event, hooks: Hooks) -> None:
    """EVT_REQUESTED: the on_association hooks may refuse an association (A-ASSOCIATE-RJ,
    calling AE title not recognised) before anything is negotiated."""
    assoc = event.assoc
    who = {"calling_aet": str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or ""
                              ).strip(),
           "called_aet": str(getattr(assoc.requestor.primitive, "called_ae_title", "") or ""
                             ).strip(),
           "peer_address": str(assoc.requestor.address)}
    verdict = hooks.decide("on_association", who)
    if not verdict.refused:
        return
    log.warning("association from %s (%s) refused by plugin %s: %s", who["calling_aet"],
                who["peer_address"], ", ".join(verdict.by), verdict.reason)
    assoc.acse.send_reject(*REJECT_CALLING_AET)
    assoc.is_rejected = True
    assoc.kill()


def store(event: Event, hooks: Hooks, encoded: bytes, transfer_syntax: str
          ) -> tuple[int | None, bytes, str | None]:
    """The on_store hooks on one C-STORE: (a refusal status or None, the bytes to keep, the SOP
    Instance UID when a plugin changed it). The data set is decoded only for them; a changed
    one is encoded again in the same transfer syntax, its pixel data as it was."""
    ts = UID(transfer_syntax)
    ds = read_dataset(io.BytesIO(encoded), ts.is_implicit_VR, ts.is_little_endian)
    req = cast(C_STORE, event.request)
    info = {**peer(event), "sop_class_uid": str(req.AffectedSOPClassUID),
            "sop_instance_uid": str(req.AffectedSOPInstanceUID),
            "transfer_syntax": str(ts)}
    verdict = hooks.decide("on_store", ds, info)
    if verdict.refused:
        log.warning("C-STORE of %s from %s refused by plugin %s: %s", info["sop_instance_uid"],
                    info["calling_aet"], ", ".join(verdict.by), verdict.reason)
        return NOT_AUTHORIZED, encoded, None
    if not isinstance(verdict.value, Dataset):
        return None, encoded, None
    if ts.is_deflated:
        log.warning("plugin %s changed a deflated data set: kept as received (re-deflating is "
                    "not supported)", ", ".join(verdict.by))
        return None, encoded, None
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = ts.is_little_endian, ts.is_implicit_VR
    write_dataset(out, verdict.value)
    changed = str(verdict.value.get("SOPInstanceUID", info["sop_instance_uid"]))
    log.debug("C-STORE of %s: data set changed by plugin %s", changed, ", ".join(verdict.by))
    return None, out.getvalue(), changed


def query_keys(event: Event, hooks: Hooks, level: str, keys: dict[str, str]
               ) -> tuple[int | None, dict[str, str]]:
    """The on_query hooks on one C-FIND: (a refusal status or None, the keys to match)."""
    verdict = hooks.decide("on_query", {**peer(event), "source": "C-FIND", "level": level,
                                        "keys": dict(keys)})
    if verdict.refused:
        log.warning("C-FIND from %s refused by plugin %s: %s", event.assoc.requestor.ae_title,
                    ", ".join(verdict.by), verdict.reason)
        return NOT_AUTHORIZED, keys
    if isinstance(verdict.value, dict) and isinstance(verdict.value.get("keys"), dict):
        return None, {str(k): str(v) for k, v in verdict.value["keys"].items()}
    return None, keys
