"""One audit record: who did what to which patient's studies, when, from where, with what outcome.

Its fields map onto the DICOM audit message (PS3.15 A.5, the IHE ATNA schema):

  action, outcome, time   EventIdentification: EventID, EventActionCode, EventTypeCode,
                          EventOutcomeIndicator, EventDateTime (the codes below, PS3.16
                          CID 400 "Audit Event ID" and CID 401 "Audit Event Type Code")
  user, address           ActiveParticipant (the requestor): UserID, NetworkAccessPointID
  source (the writer)     AuditSourceIdentification and the archive's own ActiveParticipant
  patients, studies       ParticipantObjectIdentification: the patient (type 1 Person, role 1
                          Patient, ID type RFC-3881 "2" Patient Number) and each study (type 2
                          System Object, role 3 Report, ID type DCM 110180 Study Instance UID)
  detail (query keys...)  ParticipantObjectDetail / ParticipantObjectQuery

As JSON (one line of DATA/audit/*.jsonl) the record keeps its plain names; `to_xml()` writes the
A.5 message that syslog carries (pacsd.audit.syslog).
"""

from __future__ import annotations

import base64
import datetime
import time
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr
from xml.sax.saxutils import escape as xml_escape

# (code, display) of DCM, PS3.16 CID 400 (Audit Event ID)
APPLICATION_ACTIVITY = ("110100", "Application Activity")
AUDIT_LOG_USED = ("110101", "Audit Log Used")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
EXPORT = ("110106", "Export")
IMPORT = ("110107", "Import")
ORDER_RECORD = ("110109", "Order Record")
PROCEDURE_RECORD = ("110111", "Procedure Record")
PATIENT_RECORD = ("110110", "Patient Record")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
# PS3.16 CID 401 (Audit Event Type Code)
LOGIN = ("110122", "Login")
LOGOUT = ("110123", "Logout")
OBJECT_SECURITY_CHANGED = ("110135", "Object Security Attributes Changed")

# pacsd's actions -> (EventID, EventActionCode, EventTypeCode or None). EventActionCode (A.5.1):
# C create, R read, U update, D delete, E execute.
EVENTS: dict[str, tuple[tuple[str, str], str, tuple[str, str] | None]] = {
    "login": (USER_AUTHENTICATION, "E", LOGIN),
    "logout": (USER_AUTHENTICATION, "E", LOGOUT),
    "query": (QUERY, "E", None),
    "view": (INSTANCES_ACCESSED, "R", None),
    "download": (EXPORT, "R", None),
    "send": (INSTANCES_TRANSFERRED, "R", None),       # we are the source of the transfer
    "retrieve": (INSTANCES_TRANSFERRED, "R", None),   # C-GET, C-MOVE: the same, asked by a peer
    "store": (INSTANCES_TRANSFERRED, "C", None),      # C-STORE, STOW-RS: we receive
    "import": (IMPORT, "C", None),                    # from a node or a file (pacsd import)
    "correction": (INSTANCES_ACCESSED, "U", None),
    "undo": (INSTANCES_ACCESSED, "U", None),
    "delete": (STUDY_DELETED, "D", None),
    "restore": (INSTANCES_ACCESSED, "C", None),
    "empty-bin": (INSTANCES_ACCESSED, "D", None),
    "audit": (AUDIT_LOG_USED, "R", None),
    # Who may see a study: a share link made or revoked, its labels changed.
    "share": (SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    "labels": (SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    # The Modality Worklist's scheduled steps (orders) made, changed or cancelled by hand.
    "schedule": (ORDER_RECORD, "C", None),
    "schedule-change": (ORDER_RECORD, "U", None),
    # A performed procedure step a modality reported (MPPS N-CREATE, N-SET).
    "procedure": (PROCEDURE_RECORD, "U", None),
}
ACTIONS = tuple(EVENTS)
# EventOutcomeIndicator (A.5.1): 0 success, 4 minor failure (refused, not found), 8 serious
# failure (the request failed), 12 major failure.
OUTCOMES = {"ok": "0", "refused": "4", "failed": "8"}
FIELD_MAX = 256      # a user, an address, a detail: cut beyond this
LIST_MAX = 100       # studies or patients in one record


def _cut(text: Any, n: int = FIELD_MAX) -> str:
    return str(text or "")[:n]


@dataclass
class AuditRecord:
    """One audited action. `via`: "http", "dicom" or "cli"; `user`: a user name, a calling AE
    title or the person running a command; `count`: instances concerned, when known."""

    action: str
    outcome: str = "ok"
    user: str = ""
    address: str = ""
    via: str = ""
    studies: list[str] = field(default_factory=list)
    patients: list[tuple[str, str]] = field(default_factory=list)   # (Patient ID, name)
    detail: str = ""
    count: int = 0
    when: float = field(default_factory=time.time)
    source: str = ""   # which process wrote it (set by the Auditor)

    def as_dict(self) -> dict[str, Any]:
        event = EVENTS.get(self.action, (APPLICATION_ACTIVITY, "E", None))
        return {
            "t": round(self.when, 3), "time": iso(self.when), "action": self.action,
            "outcome": self.outcome, "user": _cut(self.user), "address": _cut(self.address),
            "via": self.via, "studies": [_cut(s, 64) for s in self.studies[:LIST_MAX]],
            "patients": [{"id": _cut(p, 64), "name": _cut(n, 64)}
                         for p, n in self.patients[:LIST_MAX]],
            "detail": _cut(self.detail, 1024), "count": int(self.count),
            "event": event[0][0], "source": self.source}

    def to_xml(self, source_id: str) -> str:
        return to_xml(self.as_dict(), source_id)


def iso(when: float) -> str:
    """Local time with its offset, to the millisecond (EventDateTime is an xs:dateTime)."""
    return datetime.datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds")


def _code(tag: str, code: tuple[str, str], system: str = "DCM") -> str:
    return (f"<{tag} csd-code={quoteattr(code[0])} codeSystemName={quoteattr(system)} "
            f"originalText={quoteattr(code[1])}/>")


def to_xml(rec: dict[str, Any], source_id: str) -> str:
    """The PS3.15 A.5 AuditMessage of a record (as `as_dict` made it)."""
    event_id, action_code, type_code = EVENTS.get(rec.get("action", ""),
                                                  (APPLICATION_ACTIVITY, "E", None))
    outcome = OUTCOMES.get(rec.get("outcome", ""), "8")
    a = quoteattr
    out = ["<?xml version=\"1.0\" encoding=\"UTF-8\"?><AuditMessage>",
           f"<EventIdentification EventActionCode={a(action_code)} "
           f"EventDateTime={a(rec.get('time', ''))} EventOutcomeIndicator={a(outcome)}>",
           _code("EventID", event_id)]
    if type_code is not None:
        out.append(_code("EventTypeCode", type_code))
    if rec.get("detail") and outcome != "0":
        out.append(f"<EventOutcomeDescription>{xml_escape(rec['detail'])}"
                   "</EventOutcomeDescription>")
    out.append("</EventIdentification>")
    address = rec.get("address") or ""
    out.append(f"<ActiveParticipant UserID={a(rec.get('user') or 'unknown')} "
               f"UserIsRequestor=\"true\""
               + (f" NetworkAccessPointID={a(address)} NetworkAccessPointTypeCode=\"2\""
                  if address else "") + "/>")
    out.append(f"<ActiveParticipant UserID={a(source_id)} UserIsRequestor=\"false\"/>")
    out.append(f"<AuditSourceIdentification AuditSourceID={a(source_id)}>"
               "<AuditSourceTypeCode csd-code=\"4\" codeSystemName=\"DCM\" "
               "originalText=\"Application Server\"/></AuditSourceIdentification>")
    for p in rec.get("patients") or ():
        out.append(f"<ParticipantObjectIdentification ParticipantObjectID={a(p.get('id', ''))} "
                   "ParticipantObjectTypeCode=\"1\" ParticipantObjectTypeCodeRole=\"1\">"
                   + _code("ParticipantObjectIDTypeCode", ("2", "Patient Number"), "RFC-3881")
                   + (f"<ParticipantObjectName>{xml_escape(p['name'])}</ParticipantObjectName>"
                      if p.get("name") else "")
                   + "</ParticipantObjectIdentification>")
    for uid in rec.get("studies") or ():
        out.append(f"<ParticipantObjectIdentification ParticipantObjectID={a(uid)} "
                   "ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"3\">"
                   + _code("ParticipantObjectIDTypeCode", ("110180", "Study Instance UID"))
                   + (f"<ParticipantObjectDetail type=\"NumberOfInstances\" "
                      f"value={a(base64.b64encode(str(rec['count']).encode()).decode())}/>"
                      if rec.get("count") and len(rec.get("studies") or ()) == 1 else "")
                   + "</ParticipantObjectIdentification>")
    if rec.get("action") == "query" and rec.get("detail"):
        # The query itself (A.5.3.10): type 2 System Object, role 24 Query.
        out.append("<ParticipantObjectIdentification ParticipantObjectID=\"query\" "
                   "ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"24\">"
                   + _code("ParticipantObjectIDTypeCode", ("110181", "SOP Class UID"))
                   + "<ParticipantObjectQuery>"
                   + base64.b64encode(str(rec["detail"]).encode()).decode()
                   + "</ParticipantObjectQuery></ParticipantObjectIdentification>")
    out.append("</AuditMessage>")
    return "".join(out)
