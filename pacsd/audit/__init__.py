"""The audit trail (issue 22): every access and change, over HTTP, DICOM and the command line,
as one record each: who (a user, or a calling AE title, and the address), when, what (the
patients and studies), the outcome.

  record.py   AuditRecord, the actions and their DICOM audit codes (PS3.15 A.5, PS3.16
              CID 400/401), the A.5 XML message
  writer.py   Auditor: records queued, written by a thread as JSON lines under DATA/audit,
              fsync'd per batch, rotated by size and age, removed past [audit] keep_days
  syslog.py   the same records to a syslog collector (RFC 5424 over UDP, TCP or TLS)
  reader.py   search(): what `pacsd audit` and GET /api/audit show

Any part may record: `auditor.record(AuditRecord("view", user=..., studies=[...]))`; the web
side finds its Auditor as `rt.audit` (pacsd.web.runtime), the DICOM side as `DicomServer.audit`.
"""

from pacsd.audit.reader import Search, search, when
from pacsd.audit.record import ACTIONS, EVENTS, AuditRecord, to_xml
from pacsd.audit.writer import Auditor, Resolver, folder_of

__all__ = ["ACTIONS", "EVENTS", "AuditRecord", "Auditor", "Resolver", "Search", "folder_of",
           "search", "to_xml", "when"]
