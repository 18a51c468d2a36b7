"""Modality Performed Procedure Step as SCP (PS3.4 F.7): N-CREATE and N-SET.

A modality creates a performed step IN PROGRESS when it begins (N-CREATE, F.7.2.1) and sets it
COMPLETED or DISCONTINUED when it ends (N-SET, F.7.2.2); after that it may no longer be updated
(F.7.2.2.2: 0x0110). The step names the scheduled steps it performs in its Scheduled Step
Attributes Sequence: each is found by its Study Instance UID, else by Accession Number and
Scheduled Procedure Step ID, and becomes STARTED, then COMPLETED or DISCONTINUED, in the same
transaction as the performed step (Index.put_performed). A scheduled step already ended (a
study that arrived, a cancellation) keeps its status. A performed step that names no step we
hold (an unscheduled patient) is kept all the same.

The whole data set is kept as DICOM JSON (PS3.18 F), bounded: a bigger one is refused.
"""

from __future__ import annotations

import logging
import re
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from pacsd.dicom_status import (DUPLICATE_SOP_INSTANCE, INVALID_ATTRIBUTE_VALUE,
                                MAY_NO_LONGER_BE_UPDATED, MISSING_ATTRIBUTE,
                                MISSING_ATTRIBUTE_VALUE, NO_SUCH_SOP_CLASS,
                                NO_SUCH_SOP_INSTANCE, PROCESSING_FAILURE, SUCCESS)
from pacsd.audit import AuditRecord, Auditor
from pacsd.errors import PacsError
from pacsd.index import Index
from pacsd.query import worklist as wl

log = logging.getLogger(__name__)

MPPS = str(ModalityPerformedProcedureStep)   # 1.2.840.10008.3.1.2.3.3
IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
# What the scheduled step becomes (pacsd.query.worklist's statuses).
STEP_STATUS = {IN_PROGRESS: "STARTED", COMPLETED: "COMPLETED", DISCONTINUED: "DISCONTINUED"}
# A performed step's data set as DICOM JSON: a few KiB, a few hundred with thousands of images
# listed; beyond this it is refused rather than kept in the index.
MAX_ATTRIBUTES = 256 << 10


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]   # LO
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _when(date: str, time_: str) -> str:
    """YYYYMMDDHHMMSS from a DA and a TM ("" without a date)."""
    date = re.sub(r"\D", "", date)[:8]
    if len(date) != 8:
        return ""
    return date + re.sub(r"\D", "", time_.split(".")[0])[:6].ljust(6, "0")


def columns(ds: Dataset) -> dict[str, Any]:
    """The PerformedStep columns read from an MPPS data set (PS3.3 C.4.13 - C.4.17)."""
    items = ds.get("ScheduledStepAttributesSequence") or []
    first = items[0] if items else Dataset()
    series, images = [], 0
    for s in ds.get("PerformedSeriesSequence") or []:
        uid = _text(s, "SeriesInstanceUID")
        if uid:
            series.append(uid)
        images += len(s.get("ReferencedImageSequence") or [])
        images += len(s.get("ReferencedNonImageCompositeSOPInstanceSequence") or [])
    reasons = ds.get("PerformedProcedureStepDiscontinuationReasonCodeSequence") or []
    reason = (_text(reasons[0], "CodeMeaning") or _text(reasons[0], "CodeValue")) if reasons \
        else ""
    return {
        "status": _text(ds, "PerformedProcedureStepStatus").upper(),
        "study_instance_uid": _text(first, "StudyInstanceUID"),
        "accession_number": _text(first, "AccessionNumber"),
        "patient_id": _text(ds, "PatientID"),
        "patient_name": _text(ds, "PatientName"),
        "modality": _text(ds, "Modality"),
        "station_aet": _text(ds, "PerformedStationAETitle"),
        "description": _text(ds, "PerformedProcedureStepDescription"),
        "started": _when(_text(ds, "PerformedProcedureStepStartDate"),
                         _text(ds, "PerformedProcedureStepStartTime")),
        "finished": _when(_text(ds, "PerformedProcedureStepEndDate"),
                          _text(ds, "PerformedProcedureStepEndTime")),
        "series": "\\".join(series),
        "images": images,
        "discontinued_reason": reason,
    }


def scheduled_steps(ds: Dataset) -> list[dict[str, Any]]:
    """The scheduled steps (rows) the Scheduled Step Attributes Sequence names, in its order;
    read inside index.reading()."""
    found: list[dict[str, Any]] = []
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        study = _text(item, "StudyInstanceUID")
        step = wl.step_of_study(study) if study else None
        accession = _text(item, "AccessionNumber")
        if step is None and accession:
            sps_id = _text(item, "ScheduledProcedureStepID")
            rp_id = _text(item, "RequestedProcedureID")
            step = next((s for s in wl.order_steps(accession=accession)
                         if (not sps_id or s["sps_id"] == sps_id)
                         and (not rp_id or s["requested_procedure_id"] == rp_id)), None)
        if step is not None and all(step["id"] != s["id"] for s in found):
            found.append(step)
    return found


class PerformedSteps:
    """The EVT_N_CREATE and EVT_N_SET handlers of the MPPS SOP Class."""

    def __init__(self, index: Index, max_attributes: int = MAX_ATTRIBUTES,
                 audit: Auditor | None = None) -> None:
        self.index = index
        self.max_attributes = max_attributes
        self.audit = audit or Auditor.off()

    def _audit(self, event: Event, values: dict[str, Any], what: str) -> None:
        """One "procedure" record per performed step reported (PS3.15 A.5: Procedure Record)."""
        if not self.audit.enabled:
            return
        self.audit.record(AuditRecord(
            "procedure", user=str(event.assoc.requestor.ae_title).strip(),
            address=str(event.assoc.requestor.address), via="dicom",
            studies=[values["study_instance_uid"]] if values.get("study_instance_uid") else [],
            patients=[(str(values["patient_id"]), "")] if values.get("patient_id") else [],
            detail=f"MPPS {what}: performed step {values['sop_instance_uid']} "
                   f"{values.get('status', '')}"))

    def _json(self, ds: Dataset, what: str, peer: str, uid: str) -> str | Dataset:
        """The data set as DICOM JSON, or the refusal when it cannot be kept."""
        try:
            text = ds.to_json()
        except Exception as e:  # noqa: BLE001 - a value pydicom cannot write
            log.warning("MPPS %s from %s refused (0x0110): performed step %s has a value that "
                        "cannot be kept: %s", what, peer, uid, e)
            return _status(PROCESSING_FAILURE, "a value cannot be kept")
        if len(text.encode()) > self.max_attributes:
            log.warning("MPPS %s from %s refused (0x0110): performed step %s is %d KiB as DICOM "
                        "JSON, more than the %d KiB pacsd keeps", what, peer, uid,
                        len(text.encode()) >> 10, self.max_attributes >> 10)
            return _status(PROCESSING_FAILURE, "data set too large")
        return text

    def _put(self, values: dict[str, Any], steps: list[dict[str, Any]], status: str,
             what: str, peer: str) -> Dataset | None:
        """Keep the performed step; the first open scheduled step changes with it, the others
        right after. None, or the refusal."""
        new = STEP_STATUS[status]
        open_ = [s for s in steps if s["status"] in wl.OPEN and s["status"] != new]
        try:
            self.index.put_performed(values, (open_[0]["id"], new) if open_ else None)
            for s in open_[1:]:
                self.index.update_step(s["id"], {"status": new,
                                                 "performed_uid": values["sop_instance_uid"]})
        except PacsError as e:
            log.warning("MPPS %s from %s failed (0x0110): performed step %s not kept: %s",
                        what, peer, values["sop_instance_uid"], e)
            return _status(PROCESSING_FAILURE, "not kept: index unavailable")
        return None

    def on_n_create(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        peer = str(event.assoc.requestor.ae_title).strip()
        req = cast(N_CREATE, event.request)
        if str(req.AffectedSOPClassUID) != MPPS:
            return NO_SUCH_SOP_CLASS, None
        given = str(req.AffectedSOPInstanceUID or "")
        uid = given or wl.new_uid()   # F.7.2.1.2: the SCP makes one when none is given
        try:
            ds = event.attribute_list
            status = _text(ds, "PerformedProcedureStepStatus").upper()
            present = "PerformedProcedureStepStatus" in ds
        except Exception as e:  # noqa: BLE001 - an attribute list pydicom cannot read
            log.warning("MPPS N-CREATE from %s refused (0x0110): unreadable attribute list: %s",
                        peer, e)
            return _status(PROCESSING_FAILURE, "unreadable attribute list"), None
        if not present:
            log.warning("MPPS N-CREATE from %s refused (0x0120): no Performed Procedure Step "
                        "Status", peer)
            return _status(MISSING_ATTRIBUTE, "Performed Procedure Step Status"), None
        if status != IN_PROGRESS:
            # F.7.2.1.2: a performed step is created IN PROGRESS, whatever follows.
            log.warning("MPPS N-CREATE from %s refused (0x0106): status %r, not IN PROGRESS",
                        peer, status)
            return _status(INVALID_ATTRIBUTE_VALUE, "status must be IN PROGRESS"), None
        attributes = self._json(ds, "N-CREATE", peer, uid)
        if isinstance(attributes, Dataset):
            return attributes, None
        try:
            with self.index.reading():
                exists = wl.performed(uid) is not None
                steps = [] if exists else scheduled_steps(ds)
        except PacsError as e:
            log.warning("MPPS N-CREATE from %s failed (0x0110): %s", peer, e)
            return _status(PROCESSING_FAILURE, "index unavailable"), None
        if exists:
            log.warning("MPPS N-CREATE from %s refused (0x0111): performed step %s exists",
                        peer, uid)
            return DUPLICATE_SOP_INSTANCE, None
        values = {**columns(ds), "sop_instance_uid": uid, "calling_aet": peer,
                  "step": steps[0]["id"] if steps else None, "attributes": attributes}
        refused = self._put(values, steps, IN_PROGRESS, "N-CREATE", peer)
        if refused is not None:
            return refused, None
        self._audit(event, values, "N-CREATE")
        log.info("MPPS N-CREATE from %s: performed step %s IN PROGRESS, %s", peer, uid,
                 f"scheduled step {', '.join(str(s['id']) for s in steps)}" if steps
                 else "for no scheduled step pacsd holds")
        if not given:
            ds.AffectedSOPInstanceUID = uid   # pynetdicom puts it in the response's command
        return SUCCESS, ds

    def on_n_set(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        peer = str(event.assoc.requestor.ae_title).strip()
        req = cast(N_SET, event.request)
        if str(req.RequestedSOPClassUID) != MPPS:
            return NO_SUCH_SOP_CLASS, None
        uid = str(req.RequestedSOPInstanceUID or "")
        try:
            with self.index.reading():
                row = wl.performed(uid)
                created = Dataset.from_json(row["attributes"]) if row and row["attributes"] \
                    else Dataset()
                # The steps N-CREATE named (the Scheduled Step Attributes Sequence may not be
                # changed by N-SET, PS3.4 Table F.7.2-1).
                steps = scheduled_steps(created) if row is not None else []
        except PacsError as e:
            log.warning("MPPS N-SET from %s failed (0x0110): %s", peer, e)
            return _status(PROCESSING_FAILURE, "index unavailable"), None
        if row is None:
            log.warning("MPPS N-SET from %s refused (0x0112): no performed step %s", peer, uid)
            return NO_SUCH_SOP_INSTANCE, None
        if row["status"] != IN_PROGRESS:
            # F.7.2.2.2: once COMPLETED or DISCONTINUED it may no longer be updated.
            log.warning("MPPS N-SET from %s refused (0x0110): performed step %s is %s already",
                        peer, uid, row["status"])
            return _status(MAY_NO_LONGER_BE_UPDATED,
                           f"performed step is {row['status']}: no more updates"), None
        ds = created
        try:
            mods = event.modification_list
            if "SpecificCharacterSet" not in mods and "SpecificCharacterSet" in ds:
                # Its values are in the character set the performed step was created with.
                mods.SpecificCharacterSet = ds.SpecificCharacterSet
            for elem in mods:   # N-SET replaces each attribute given, sequences whole
                if elem.tag.group > 0x0002:
                    ds[elem.tag] = elem
            status = _text(ds, "PerformedProcedureStepStatus").upper()
        except Exception as e:  # noqa: BLE001 - a modification list pydicom cannot read
            log.warning("MPPS N-SET from %s refused (0x0110): unreadable modification list: %s",
                        peer, e)
            return _status(PROCESSING_FAILURE, "unreadable modification list"), None
        if status not in STATUSES:
            log.warning("MPPS N-SET from %s refused (0x0106): status %r", peer, status)
            return _status(INVALID_ATTRIBUTE_VALUE,
                           "status: IN PROGRESS, COMPLETED or DISCONTINUED"), None
        if status != IN_PROGRESS:
            # F.7.2.2.2: a step set COMPLETED or DISCONTINUED must carry the final state's
            # Type 1 attributes; its end is what the pages and the audit trail show.
            missing = [k for k in ("PerformedProcedureStepEndDate",
                                   "PerformedProcedureStepEndTime") if not _text(ds, k)]
            if missing:
                log.warning("MPPS N-SET from %s refused (0x0121): performed step %s set %s "
                            "without %s", peer, uid, status, " and ".join(missing))
                return _status(MISSING_ATTRIBUTE_VALUE, ", ".join(missing)), None
        attributes = self._json(ds, "N-SET", peer, uid)
        if isinstance(attributes, Dataset):
            return attributes, None
        values = {**columns(ds), "sop_instance_uid": uid, "step": row["step"],
                  "attributes": attributes}
        refused = self._put(values, steps, status, "N-SET", peer)
        if refused is not None:
            return refused, None
        self._audit(event, values, "N-SET")
        log.info("MPPS N-SET from %s: performed step %s %s, %s", peer, uid, status,
                 f"scheduled step {', '.join(str(s['id']) for s in steps)}" if steps
                 else "for no scheduled step pacsd holds")
        return SUCCESS, mods
