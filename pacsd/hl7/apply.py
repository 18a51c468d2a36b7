"""What an HL7 message does: orders become scheduled steps of the worklist (pacsd.index.worklist);
patient updates and merges change the worklist's steps and, when the patient has studies, the
archive's files through the corrections (pacsd.storage.corrections: new versions, history,
`pacsd undo`), each with an audit record.

`Receiver.answer(frame, peer)` is the whole of it for the listener: bytes in, the ACK's bytes
out, never an exception. One message is applied at a time (HL7 senders keep their order, and
two corrections of one patient must not overlap).

AA: applied (a further step of one requested procedure is left out and said so). AE: understood
but not applied: a missing or bad value, an order to change or cancel that we do not have, a
Study Instance UID already used, a correction the archive refuses, the index unavailable (the
sender may try again). AR: a message we cannot read or do not take (pacsd.hl7.messages).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

from pacsd.audit import AuditRecord, Auditor
from pacsd.errors import PacsError
from pacsd.hl7.header import (DUPLICATE_KEY, INTERNAL, SEGMENT_ERROR, UNKNOWN_KEY, Header,
                              MessageFailed, MessageRefused, ack, read_header, redacted)
from pacsd.hl7.messages import Message, Order, Patient, PatientMerge, PatientUpdate, parse
from pacsd.query import studies, worklist
from pacsd.storage.archive import Archive
from pacsd.storage.corrections import CorrectionRefused, Corrections, NothingToCorrect

log = logging.getLogger(__name__)

# Step columns of a patient's demographics -> the attributes the corrections change.
KEYWORDS = {"patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
            "patient_sex": "PatientSex"}


class Receiver:
    """Parses, applies and acknowledges HL7 messages for one server."""

    def __init__(self, archive: Archive, audit: Auditor | None = None,
                 application: str = "PACSD", encoding: str = "") -> None:
        self.archive, self.index = archive, archive.index
        self.audit = audit or Auditor.off()
        # MSH-3 of our ACKs: separators or escapes in it would break them.
        self.application = re.sub(r"[^\w .-]", "", application)[:180] or "PACSD"
        self.encoding = encoding
        self._lock = threading.Lock()

    # --- the listener's side ----------------------------------------------------------------

    def answer(self, raw: bytes, peer: str) -> bytes:
        """The ACK for one message (a frame's content) from `peer` (its IP address). Never
        raises."""
        header: Header | None = None
        try:
            header = read_header(raw)
            message = parse(raw, self.encoding)
            header = message.header
            with self._lock:
                note = self.apply(message, peer)
            log.info("hl7: %s from %s (%s, control id %s): %s", message.kind, peer,
                     header.sender or "?", header.control_id, note)
            return self._ack(header, "AA", note)
        except (MessageRefused, MessageFailed) as e:
            kind = header.kind if header is not None else "a message"
            log.warning("hl7: %s from %s (%s, control id %s) answered %s: %s", kind or "?",
                        peer, header.sender if header else "?",
                        header.control_id if header else "?", e.ack, redacted(str(e)))
            log.debug("hl7: %s in full: %s", e.ack, e)
            return self._ack(header, e.ack, str(e), e.error)
        except Exception as e:  # noqa: BLE001 - a bug must not take the listener down
            log.exception("hl7: a message from %s could not be applied (%s); answered AE",
                          peer, type(e).__name__)
            return self._ack(header, "AE", "internal error; see pacsd's log", INTERNAL)

    def too_large(self, head: bytes, limit_kb: int, peer: str) -> bytes:
        """The AR for a message longer than [hl7] max_message_kb (`head`: its beginning)."""
        header = read_header(head)
        log.warning("hl7: a message from %s (%s, control id %s) is longer than [hl7] "
                    "max_message_kb = %d: answered AR and the connection closed", peer,
                    header.sender if header else "?", header.control_id if header else "?",
                    limit_kb)
        return self._ack(header, "AR", f"message longer than {limit_kb} KiB", SEGMENT_ERROR)

    def _ack(self, header: Header | None, code: str, text: str, error: str = "") -> bytes:
        try:
            return ack(header, code, text, error, self.application)
        except Exception:  # noqa: BLE001 - an odd header: the standard separators then
            log.debug("hl7: ACK with the message's own header failed", exc_info=True)
            return ack(None, code, text, error, self.application)

    # --- applying -----------------------------------------------------------------------------

    def apply(self, message: Message, peer: str) -> str:
        """Apply every operation of `message`; what was done, in a few words (MSA-3)."""
        notes = []
        for op in message.operations:
            if isinstance(op, Order):
                notes.append(self._order(op, message, peer))
            elif isinstance(op, PatientUpdate):
                notes.append(self._update(op.patient, message, peer))
            elif isinstance(op, PatientMerge):
                notes.append(self._merge(op, message, peer))
        return "; ".join(notes)

    def _order_steps(self, o: Order) -> list[dict[str, Any]]:
        with self.index.reading():
            return worklist.order_steps(placer=o.placer, filler=o.filler,
                                        accession=o.accession)

    def _order(self, o: Order, message: Message, peer: str) -> str:
        """Apply one order; its audit record (schedule / schedule-change) says what it did."""
        action = "schedule" if o.action not in ("change", "cancel") else "schedule-change"
        rec = AuditRecord(action, user=message.header.sender or "hl7", address=peer,
                          via="hl7", studies=[str(v.get("study_instance_uid") or "")
                                              for v in o.steps if v.get("study_instance_uid")],
                          patients=sorted({(str(v.get("patient_id") or ""), "")
                                           for v in o.steps if v.get("patient_id")}))
        try:
            note = self._apply_order(o)
        except MessageFailed as e:
            rec.outcome, rec.detail = "refused", f"HL7 {message.kind}: {e}"
            self.audit.record(rec)
            raise
        rec.detail = f"HL7 {message.kind}: {note}"
        self.audit.record(rec)
        return note

    def _apply_order(self, o: Order) -> str:
        existing = self._order_steps(o)
        extra = (f" ({o.ignored} further step(s) of the same requested procedure left out: "
                 "one step per Study Instance UID)") if o.ignored else ""
        if o.action == "cancel":
            if not existing:
                raise MessageFailed(f"order {o.key}: not known here, nothing to cancel",
                                    UNKNOWN_KEY)
            open_ = [s for s in existing if s["status"] in worklist.OPEN]
            for s in open_:
                self.index.update_step(int(s["id"]), {"status": "CANCELED"})
            return f"order {o.key}: {len(open_)} step(s) canceled"
        if o.action == "change":
            if not existing:
                raise MessageFailed(f"order {o.key}: not known here, nothing to change",
                                    UNKNOWN_KEY)
            changed = 0
            for values in o.steps:
                targets = [s for s in existing if values.get("sps_id")
                           and s["sps_id"] == values["sps_id"]] or existing
                for s in targets:
                    self.index.update_step(int(s["id"]), _keeping_uid(values))
                    changed += 1
            return f"order {o.key}: {changed} step(s) changed{extra}"
        added = again = 0
        for values in o.steps:
            # An order sent again (its ACK was lost) changes the step it made, never a second.
            same = [s for s in existing
                    if s["sps_id"] == values.get("sps_id", "")
                    and s["requested_procedure_id"] == values.get("requested_procedure_id", "")]
            if same:
                self.index.update_step(int(same[0]["id"]), _keeping_uid(values))
                again += 1
                continue
            uid = values["study_instance_uid"]
            with self.index.reading():
                taken = worklist.step_of_study(uid)
            if taken is not None:
                raise MessageFailed(f"order {o.key}: Study Instance UID {uid} is already "
                                    "scheduled by another order", DUPLICATE_KEY)
            self.index.add_step({**values, "source": "hl7"})
            added += 1
        return (f"order {o.key}: {added} step(s) scheduled"
                + (f", {again} already known updated" if again else "") + extra)

    # --- patients -------------------------------------------------------------------------------

    def _update(self, p: Patient, message: Message, peer: str) -> str:
        steps = sum(self.index.update_step_patient(p.patient_id, issuer, p.values)
                    for issuer in _issuers(p.issuer))
        rewritten = 0
        for stored in self._stored(p.patient_id, p.issuer):
            changes = _changes(stored, p.values)
            if changes:
                rewritten += self._correct(
                    lambda c, ch=changes, s=stored: c.update_patient(
                        p.patient_id, ch, _who(peer), issuer=s["issuer"]),
                    message, peer, [p.patient_id],
                    f"HL7 {message.kind}: changed {', '.join(changes)}")
        return f"patient updated: {steps} step(s), {rewritten} stored instance(s) rewritten"

    def _merge(self, op: PatientMerge, message: Message, peer: str) -> str:
        into = op.into
        moved = {"patient_id": into.patient_id, "issuer_of_patient_id": into.issuer,
                 **into.values}
        steps = sum(self.index.merge_step_patients(op.from_id, issuer, moved)
                    for issuer in _issuers(op.from_issuer))
        rewritten = 0
        merged_away = self._stored(op.from_id, op.from_issuer)
        if merged_away:
            detail = f"HL7 {message.kind}: merge {op.from_id} into {into.patient_id}"
            survivors = self._stored(into.patient_id, into.issuer)
            if survivors:
                # Each stored patient the message names (its issuer, or none) into the first
                # stored one of the surviving patient: never a namesake of another issuer.
                for stored in merged_away:
                    rewritten += self._correct(
                        lambda c, s=stored: c.merge_patients(
                            op.from_id, into.patient_id, _who(peer), from_issuer=s["issuer"],
                            into_issuer=survivors[0]["issuer"]),
                        message, peer, [op.from_id, into.patient_id], detail)
            else:   # the surviving patient has no studies: the merged one's take its identity
                for stored in merged_away:
                    changes = {"PatientID": into.patient_id, **_changes(stored, into.values)}
                    if into.issuer:
                        changes["IssuerOfPatientID"] = into.issuer
                    rewritten += self._correct(
                        lambda c, ch=changes, s=stored: c.update_patient(
                            op.from_id, ch, _who(peer), issuer=s["issuer"]),
                        message, peer, [op.from_id, into.patient_id], detail)
        if into.values:   # and the demographics the message gives the surviving patient
            for stored in self._stored(into.patient_id, into.issuer):
                changes = _changes(stored, into.values)
                if changes:
                    rewritten += self._correct(
                        lambda c, ch=changes, s=stored: c.update_patient(
                            into.patient_id, ch, _who(peer), issuer=s["issuer"]),
                        message, peer, [into.patient_id],
                        f"HL7 {message.kind}: changed {', '.join(changes)}")
        return f"patients merged: {steps} step(s) moved, {rewritten} stored instance(s) rewritten"

    def _stored(self, patient_id: str, issuer: str) -> list[dict[str, Any]]:
        """The stored patients an HL7 patient is: same ID, and the issuer it gives or none (a
        modality seldom fills Issuer of Patient ID); any issuer when the message gives none."""
        found = studies.stored_patients(patient_id)
        return [s for s in found if s["studies"] > 0
                and (not issuer or s["issuer"] in (issuer, ""))]

    def _correct(self, work: Any, message: Message, peer: str, patients: list[str],
                 detail: str) -> int:
        """Run one correction with its audit record; the instances it rewrote."""
        rec = AuditRecord("correction", user=message.header.sender or "hl7",
                          address=peer, via="hl7",
                          patients=[(pid, "") for pid in patients], detail=detail)
        try:
            done = work(Corrections(self.archive))
        except NothingToCorrect:
            return 0   # gone meanwhile (another correction, a deletion)
        except CorrectionRefused as e:
            rec.outcome, rec.detail = "refused", f"{detail}; {e}"
            self.audit.record(rec)
            raise MessageFailed(f"the archive refused the correction: {e}") from None
        except PacsError as e:
            rec.outcome, rec.detail = "failed", f"{detail}; {e}"
            self.audit.record(rec)
            raise MessageFailed(f"the correction failed: {e}; send again later") from None
        rec.count = int(done.instances)
        self.audit.record(rec)
        return int(done.instances)


def _issuers(issuer: str) -> list[str | None]:
    """The issuers to update steps of: the one given and none; any when none is given."""
    return [issuer, ""] if issuer else [None]


def _changes(stored: Mapping[str, Any], values: Mapping[str, str]) -> dict[str, str]:
    """The DICOM attributes whose new value (step columns in `values`) differs from the stored
    patient's: an ADT that repeats what we have rewrites no file."""
    out = {}
    for column, keyword in KEYWORDS.items():
        if column not in values:
            continue
        new, old = values[column], str(stored.get(keyword, ""))
        if keyword == "PatientName":
            new, old = new.rstrip("^ "), old.rstrip("^ ")
        if new.strip() != old.strip():
            out[keyword] = new
    return out


def _keeping_uid(values: Mapping[str, str]) -> dict[str, str]:
    """A step's new values without its Study Instance UID: a step keeps the UID it was
    scheduled with (modalities may already use it)."""
    return {k: v for k, v in values.items() if k != "study_instance_uid"}


def _who(peer: str) -> str:
    return f"hl7 from {peer}"
