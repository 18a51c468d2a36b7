"""The DICOM side's audit trail (pacsd.audit): association-level records, never one per image.

  C-STORE       one "store" record per association and study, written when the association
                ends, with the count of instances stored (the store path adds one per image to
                a dict of the association: `count_stored`); refusals as one "store" record
                "refused" with their count
  C-FIND        one "query" record per request, with its level, keys and number of matches;
                a Modality Worklist query as level WORKLIST, with the keys of its Scheduled
                Procedure Step item
  C-GET         one "retrieve" record per request, C-MOVE one "send" (to its destination),
                with the studies named and the number of instances
  rejected      a refused association is a failed authentication ("login", refused)
The patients of the studies are filled in by the audit writer, off the association's thread.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacsd.audit import AuditRecord, Auditor
from pacsd.dicom_status import CANCEL, PENDING, PENDING_OPTIONAL_KEYS
from pacsd.dimse.worklist import MWL_FIND

log = logging.getLogger(__name__)

BY_STUDY = "by_study"   # the key, in an association's stats, of {study UID: instances stored}
_LIST_KEYS = ("StudyInstanceUID",)


def count_stored(stats: dict[str, Any], study_uid: str) -> None:
    """One stored instance (the C-STORE path: a dict update, nothing else)."""
    per = stats.get(BY_STUDY)
    if per is not None:
        per[study_uid] = per.get(study_uid, 0) + 1


def _who(assoc: Association) -> tuple[str, str]:
    # Before the association is accepted (a rejection) only the request's primitive has it.
    aet = (str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
           or str(assoc.requestor.ae_title))
    return aet.strip(), str(assoc.requestor.address)


def _elements(identifier: Dataset) -> Iterator[Any]:
    """The identifier's elements, and those of the first item of each sequence (the
    Scheduled Procedure Step of a worklist query)."""
    for elem in identifier:
        if elem.VR == "SQ" and not elem.tag.is_private and elem.value:
            yield from (e for e in elem.value[0] if e.VR != "SQ")
        else:
            yield elem


def _keys(identifier: Dataset | None) -> tuple[str, list[str], list[tuple[str, str]], str]:
    """(level, studies named, patients named, the keys as text) of a request's identifier."""
    if identifier is None:
        return "", [], [], ""
    level = str(identifier.get("QueryRetrieveLevel", "") or "")
    keys: list[str] = []
    studies: list[str] = []
    patients: list[tuple[str, str]] = []
    for elem in _elements(identifier):
        if elem.tag.is_private or elem.VR == "SQ" or not elem.keyword:
            continue
        value = elem.value
        text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) or (
            hasattr(value, "__iter__") and not isinstance(value, (str, bytes))) else str(
                value if value is not None else "")
        if not text or elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        keys.append(f"{elem.keyword}={text[:64]}")
        if elem.keyword == "StudyInstanceUID":
            studies = [u for u in text.split("\\") if u][:100]
        elif elem.keyword == "PatientID" and "*" not in text and "?" not in text:
            patients = [(text[:64], "")]
    return level, studies, patients, " ".join(keys)[:1024]


class DimseAudit:
    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor

    @property
    def enabled(self) -> bool:
        return self.auditor.enabled

    def new_stats(self) -> dict[str, Any]:
        """An association's stats, with room for its studies when auditing."""
        return {BY_STUDY: {}} if self.auditor.enabled else {}

    def association_ended(self, assoc: Association, stats: dict[str, Any] | None) -> None:
        """Take the association's studies out of `stats` and record them."""
        per = stats.pop(BY_STUDY, None) if stats else None
        if not self.auditor.enabled or stats is None:
            return
        aet, address = _who(assoc)
        for study, n in (per or {}).items():
            self.auditor.record(AuditRecord("store", "ok", aet, address, "dicom", [study],
                                            count=n))
        failed = int(stats.get("failed", 0))
        if failed:
            self.auditor.record(AuditRecord("store", "refused", aet, address, "dicom",
                                            count=failed, detail=f"{failed} refused"))

    def rejected(self, assoc: Association, why: str) -> None:
        aet, address = _who(assoc)
        self.auditor.record(AuditRecord("login", "refused", aet, address, "dicom",
                                        detail=f"association rejected: {why}"))

    def find(self, handler: Callable[[Event], Iterator[Any]]) -> Callable[[Event], Iterator[Any]]:
        """EVT_C_FIND handler `handler`, recorded."""
        def audited(event: Event) -> Iterator[Any]:
            matches, final = 0, None
            try:
                for item in handler(event):
                    if item[0] in (PENDING, PENDING_OPTIONAL_KEYS):
                        matches += 1
                    else:
                        final = item[0]
                    yield item
            finally:
                self._request(event, "query", matches, final, "matches")
        return audited

    def retrieve(self, handler: Callable[[Event], Iterator[Any]], action: str
                 ) -> Callable[[Event], Iterator[Any]]:
        """EVT_C_GET ("retrieve") or EVT_C_MOVE ("send") handler `handler`, recorded."""
        def audited(event: Event) -> Iterator[Any]:
            count, final = 0, None
            try:
                for item in handler(event):
                    if isinstance(item, int) and not count:
                        count = item   # the number of sub-operations
                    elif isinstance(item, tuple) and len(item) == 2 and isinstance(
                            item[0], Dataset):
                        final = int(item[0].get("Status", 0xC000))
                    elif isinstance(item, tuple) and len(item) == 2 and isinstance(
                            item[0], int) and item[0] not in (PENDING, PENDING_OPTIONAL_KEYS):
                        final = item[0]
                    elif isinstance(item, tuple) and item and item[0] is None:
                        final = 0xA801   # Move Destination unknown
                    yield item
            finally:
                self._request(event, action, count, final, "instances")
        return audited

    def _request(self, event: Event, action: str, n: int, final: Any, what: str) -> None:
        try:
            level, studies, patients, keys = _keys(event.identifier)
        except Exception:  # noqa: BLE001 - an unreadable identifier: recorded without keys
            level, studies, patients, keys = "", [], [], ""
        if not level and str(getattr(event.request, "AffectedSOPClassUID", "")) == MWL_FIND:
            level = "WORKLIST"
        aet, address = _who(event.assoc)
        outcome = "ok" if final in (None, 0, CANCEL) else "refused"
        detail = f"{level} {keys}".strip()
        if action == "send":
            detail = f"to {str(event.move_destination or '').strip()}; {detail}"
        if outcome != "ok":
            detail += f"; status 0x{int(final):04X}"
        self.auditor.record(AuditRecord(action, outcome, aet, address, "dicom", studies,
                                        patients, detail, count=n))
