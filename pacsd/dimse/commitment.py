"""Storage Commitment Push Model as SCP (PS3.4 Annex J).

A modality asks, with an N-ACTION (Action Type 1) naming a Transaction UID and the instances it
sent, whether we keep them safely; once told yes it may delete its own copies. We answer the
N-ACTION at once (J.3.2: Success means "request received and will be processed") and decide in
the background. An instance is committed only if the archive holds it durably: its row is in the
index, with the SOP Class the modality names, its file is in storage, and no copy with other
content came under its UID (pacsd.storage.archive keeps those aside; the request names no content, so
such an instance is never vouched for until the conflict is resolved). The archive answers
C-STORE Success only after both were fsync'd and committed, so nothing weaker is ever promised.

The result goes back as an N-EVENT-REPORT (J.3.3) on a new association from us to the node whose
AE title sent the request ([[nodes]] or the admin page), proposing SCP/SCU role selection so
that we act as the Storage Commitment SCP on it. It is sent once the requesting association has
ended (or after REQUESTOR_GRACE seconds if the modality keeps it open: a modality that handles
one association at a time could not accept ours meanwhile), and retried a few times if the node
cannot be reached. We never send the report on the requesting association itself (J.3.3
allows either; every SCU must accept it on a new one, and sending from a background thread on
an association whose own thread is reading invites pynetdicom's reply-stealing race).

A request from an AE title we cannot report to is refused at once (0x0110 with an Error
Comment saying what to configure) rather than acknowledged and never answered: the modality
shows the failure now instead of waiting hours for its own timeout. dcm4che's StgCmtSCP does
the same.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, build_role
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event

from pacsd import query
from pacsd.config import Config, Node
from pacsd.dicom_status import (
    CLASS_INSTANCE_CONFLICT,
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_CLASS,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from pacsd.accounts import Accounts
from pacsd.compat import pynetdicom as compat
from pacsd.errors import PacsError
from pacsd.index import Index
from pacsd.nodes.remote import scu_ae, open_association, close_association
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

PUSH_MODEL = UID("1.2.840.10008.1.20.1")         # Storage Commitment Push Model SOP Class
WELL_KNOWN = UID("1.2.840.10008.1.20.1.1")       # its well-known SOP Instance (J.3.1)
REQUEST_COMMITMENT = 1                                   # Action Type ID (J.3.2.1)
ALL_COMMITTED, FAILURES_EXIST = 1, 2                     # Event Type IDs (J.3.3.1)

# Statuses (pacsd.dicom_status): N-ACTION (PS3.7 10.1.4.1.10) and Failure Reasons (PS3.4
# J.3.3.1.1). NO_SUCH_SOP_INSTANCE: an N-ACTION to another than the well-known instance; as a
# Failure Reason, an instance not stored here.

WORKERS = 4              # transactions checked and reported at once
MAX_PENDING = 64         # transactions queued or running; more are refused (0x0213)
MAX_ITEMS = 100_000      # instances in one request (a very large study is ~20,000)
CHUNK = 500              # SOP Instance UIDs per index query
REQUESTOR_GRACE = 3.0    # seconds we wait for the requesting association to end
RETRY_DELAYS = (15.0, 45.0)   # three tries over about a minute
REPORT_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# PS3.5 9.1 UIDs, loosely: digits and dots, at most 64 characters. Leading zeros are tolerated
# (some modalities make them) so that one such UID does not refuse a whole request.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class Refused(PacsError):
    """An N-ACTION we answer with a failure status."""

    def __init__(self, status: int, message: str, comment: str = "") -> None:
        super().__init__(message)
        self.dicom_status = status
        self.comment = (comment or message)[:64]   # Error Comment is an LO


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class Job:
    aet: str                                  # who asked, and who gets the report
    transaction_uid: str
    items: tuple[tuple[str, str], ...]        # (SOP Class UID, SOP Instance UID), as requested
    requestor: Association | None = None


@dataclass(frozen=True)
class Result:
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]  # (class, instance, Failure Reason)

    @property
    def event_type(self) -> int:
        return FAILURES_EXIST if self.failed else ALL_COMMITTED


def _uid(value: Any, what: str) -> str:
    text = str(value if value is not None else "").strip().rstrip("\0").strip()
    if not text:
        raise Refused(INVALID_ARGUMENT_VALUE, f"{what} is missing or empty")
    if len(text) > 64 or not _UID.fullmatch(text):
        raise Refused(INVALID_ARGUMENT_VALUE, f"{what} {text[:80]!r} is not a UID")
    return text


def parse_request(info: Dataset) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The Action Information of a Request Storage Commitment (PS3.4 J.3.2.1.1): (Transaction
    UID, items). Raises Refused with the N-ACTION status to answer."""
    try:
        transaction = _uid(info.get("TransactionUID"), "Transaction UID (0008,1195)")
        seq = info.get("ReferencedSOPSequence")
        if not seq:
            raise Refused(INVALID_ARGUMENT_VALUE,
                          "Referenced SOP Sequence (0008,1199) is missing or empty")
        if len(seq) > MAX_ITEMS:
            raise Refused(RESOURCE_LIMITATION, f"{len(seq)} instances in one request; at most "
                                               f"{MAX_ITEMS}")
        items = tuple(
            (_uid(item.get("ReferencedSOPClassUID"), f"item {n}: Referenced SOP Class UID"),
             _uid(item.get("ReferencedSOPInstanceUID"), f"item {n}: Referenced SOP Instance UID"))
            for n, item in enumerate(seq, 1))
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom decodes lazily: any malformed element
        raise Refused(PROCESSING_FAILURE, f"unreadable Action Information: {e}") from None
    return transaction, items


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def status(code: int, comment: str = "") -> Dataset:
    """An N-ACTION response status (for the association guard's refusals)."""
    return _status(code, comment)


def event_information(transaction_uid: str, result: Result, aet: str) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if result.committed:
        ds.RetrieveAETitle = aet   # where the committed instances can be retrieved from
        ds.ReferencedSOPSequence = []
        for cls, inst in result.committed:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = inst
            ds.ReferencedSOPSequence.append(item)
    if result.failed:
        ds.FailedSOPSequence = []
        for cls, inst, reason in result.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = inst
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds


class Commitments:
    """The N-ACTION handler, the background checks and the reports."""

    def __init__(self, cfg: Config, index: Index, store: Store, accounts: Accounts) -> None:
        self.cfg = cfg
        self.index = index
        self.store = store
        self.accounts = accounts
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS
        self.requestor_grace = REQUESTOR_GRACE
        # Daemon threads, started with the first request: a report being sent at exit must not
        # hold the process (pynetdicom's own timeouts bound it anyway).
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._pending = 0   # queued or running
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def pending(self) -> int:
        """Requests queued or being checked / reported."""
        with self._lock:
            return self._pending

    # --- the N-ACTION (on the association's thread: validate, queue, answer) ------------------

    def on_n_action(self, event: Event) -> tuple[Dataset, None]:
        aet = str(event.assoc.requestor.ae_title).strip()
        try:
            job = self._job(event, aet)
            self._queue(job)
        except Refused as e:
            log.warning("storage commitment request from %s (%s) refused, 0x%04X: %s", aet,
                        event.assoc.requestor.address, e.dicom_status, e)
            return _status(e.dicom_status, e.comment), None
        log.info("storage commitment %s from %s: %d instance(s) to check", job.transaction_uid,
                 aet, len(job.items))
        return _status(SUCCESS), None

    def _job(self, event: Event, aet: str) -> Job:
        req = cast(N_ACTION, event.request)
        if str(req.RequestedSOPClassUID) != PUSH_MODEL:
            raise Refused(NO_SUCH_SOP_CLASS, f"N-ACTION for {req.RequestedSOPClassUID}")
        if str(req.RequestedSOPInstanceUID).strip() != WELL_KNOWN:
            raise Refused(NO_SUCH_SOP_INSTANCE,
                          f"Requested SOP Instance UID must be {WELL_KNOWN}")
        if event.action_type != REQUEST_COMMITMENT:
            raise Refused(NO_SUCH_ACTION, f"Action Type ID {event.action_type}; only 1 "
                                          "(Request Storage Commitment) exists")
        try:
            info = event.action_information
        except Exception as e:  # noqa: BLE001 - whatever pydicom's decoder raises
            raise Refused(PROCESSING_FAILURE, f"unreadable Action Information: {e}") from None
        transaction, items = parse_request(info)
        if self.accounts.node_by_aet(aet) is None:
            raise Refused(PROCESSING_FAILURE,
                          f"unknown calling AE title {aet}: no node to report to. Add it to "
                          "[[nodes]] (aet, host, port of its storage commitment SCU) or on the "
                          "admin page", comment=f"calling AE title {aet} is not a known node")
        return Job(aet, transaction, items, event.assoc)

    def _queue(self, job: Job) -> None:
        with self._lock:
            if self._stop.is_set():
                raise Refused(RESOURCE_LIMITATION, "shutting down")
            if self._pending >= MAX_PENDING:
                raise Refused(RESOURCE_LIMITATION, f"{MAX_PENDING} storage commitment "
                                                   "requests already pending")
            self._pending += 1
            if not self._workers:
                self._workers = [threading.Thread(target=self._work, name=f"commitment-{n}",
                                                  daemon=True) for n in range(WORKERS)]
                for t in self._workers:
                    t.start()
            self._jobs.put(job)

    # --- in the background ---------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._pending -= 1

    def _run(self, job: Job) -> None:
        try:
            result = self.check(job.items)
            reasons = [reason for _, _, reason in result.failed]
            log.info("storage commitment %s from %s: %d committed, %d failed (%d not stored, "
                     "%d of another SOP class, %d with their file missing or their content "
                     "disputed)",
                     job.transaction_uid, job.aet, len(result.committed), len(result.failed),
                     reasons.count(NO_SUCH_SOP_INSTANCE),
                     reasons.count(CLASS_INSTANCE_CONFLICT),
                     reasons.count(PROCESSING_FAILURE))
            if job.requestor is not None and job.requestor.is_alive():
                job.requestor.join(self.requestor_grace)
            self.report(job, result)
        except ShuttingDown:
            log.warning("storage commitment %s from %s not checked: shutting down (the "
                        "modality may ask again)", job.transaction_uid, job.aet)
        except Exception:   # a bug: say so, never kill the worker silently
            log.exception("storage commitment %s from %s failed", job.transaction_uid, job.aet)

    def check(self, items: tuple[tuple[str, str], ...]) -> Result:
        """Which of the requested (class, instance) pairs are durably stored here."""
        uids = sorted({inst for _, inst in items})
        found: dict[str, query.StoredInstance] = {}
        try:
            with self.index.reading():
                for i in range(0, len(uids), CHUNK):
                    req = query.Request("IMAGE", {"SOPInstanceUID": "\\".join(uids[i:i + CHUNK])})
                    found.update((s.sop_instance_uid, s) for s in query.instances(req))
            conflicted = self.index.conflicted(sorted(found))
        except Exception as e:  # noqa: BLE001 - the database's errors, whichever backend
            if self._stop.is_set():   # the index closes at shutdown: not a failure to report
                raise ShuttingDown from None
            # Nothing can be promised: every instance fails, and the modality keeps its copies.
            log.warning("storage commitment: the index could not be read (%s); reporting every "
                        "instance as failed (0x0110)", e)
            return Result((), tuple((c, i, PROCESSING_FAILURE) for c, i in items))
        committed: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        lost: list[query.StoredInstance] = []
        disputed: list[str] = []
        for cls, inst in items:
            row = found.get(inst)
            if row is None:
                failed.append((cls, inst, NO_SUCH_SOP_INSTANCE))
            elif row.sop_class_uid != cls:
                log.debug("storage commitment: %s is stored as %s, not %s", inst,
                          row.sop_class_uid, cls)
                failed.append((cls, inst, CLASS_INSTANCE_CONFLICT))
            elif inst in conflicted:
                # A copy with other content came under this UID: the request names no content,
                # so we cannot tell which copy the asker holds. It keeps its copy.
                disputed.append(inst)
                failed.append((cls, inst, PROCESSING_FAILURE))
            elif not self._on_disk(row):
                lost.append(row)
                failed.append((cls, inst, PROCESSING_FAILURE))
            else:
                committed.append((cls, inst))
        if lost:
            # Damage (a file deleted or a volume missing): worth one warning per request.
            log.warning("storage commitment: %d instance(s) indexed but their file is missing "
                        "from storage (first: %s, %s); reported as failed (0x0110). Check the "
                        "storage volume; `pacsd reindex` rebuilds the index from the files",
                        len(lost), lost[0].sop_instance_uid, lost[0].path)
        if disputed:
            log.warning("storage commitment: %d instance(s) were also sent with other content "
                        "(first: %s; copies kept in STORAGE/.conflicts); reported as failed "
                        "(0x0110) until the instance is deleted and sent again",
                        len(disputed), disputed[0])
        return Result(tuple(committed), tuple(failed))

    def _on_disk(self, row: query.StoredInstance) -> bool:
        try:
            return self.store.path(row.path).is_file()
        except (OSError, ValueError):
            return False

    def report(self, job: Job, result: Result) -> bool:
        """Send the N-EVENT-REPORT, trying again after each of `retry_delays`; whether the
        modality answered Success."""
        node = self.accounts.node_by_aet(job.aet)
        if node is None:   # removed from the accounts since the request
            log.warning("storage commitment %s: %s is no longer a known node; add it to "
                        "[[nodes]] or on the admin page. Result not reported",
                        job.transaction_uid, job.aet)
            return False
        info = event_information(job.transaction_uid, result, self.cfg.dicom_aet)
        tries = 1 + len(self.retry_delays)
        for attempt in range(1, tries + 1):
            if attempt > 1 and self._stop.wait(self.retry_delays[attempt - 2]):
                log.warning("storage commitment %s for %s not reported: shutting down (the "
                            "modality may ask again)", job.transaction_uid, job.aet)
                return False
            try:
                status = self._send(node, info, result.event_type)
            except Exception as e:  # noqa: BLE001 - socket, pynetdicom, refusal: try again
                why = str(e) or type(e).__name__
            else:
                if status == SUCCESS:
                    log.info("storage commitment %s reported to %s (%s:%d): event type %d",
                             job.transaction_uid, node.aet, node.host, node.port,
                             result.event_type)
                    return True
                if status is not None:
                    # It was received and refused: sending it again would get the same answer.
                    log.warning("storage commitment %s: %s answered the report with 0x%04X",
                                job.transaction_uid, node.aet, status)
                    return False
                why = "no answer to the N-EVENT-REPORT within the time limit"
            if attempt < tries:
                log.warning("storage commitment %s: report to %s (%s:%d) failed (%s); try %d of "
                            "%d in %g s", job.transaction_uid, node.aet, node.host, node.port,
                            why, attempt + 1, tries, self.retry_delays[attempt - 1])
            else:
                log.error("storage commitment %s: report to %s (%s:%d) failed %d times (%s); "
                          "gave up. Is its storage commitment SCU listening there?",
                          job.transaction_uid, node.aet, node.host, node.port, tries, why)
        return False

    def _send(self, node: Node, info: Dataset, event_type: int) -> int | None:
        """One association: the N-EVENT-REPORT's status, None without an answer."""
        ae = scu_ae(self.cfg)
        # PS3.4 J.3.3 / PS3.7 D.3.3.4: we propose to be the SCP (the peer the SCU).
        assoc = open_association(ae, node, [build_context(PUSH_MODEL, REPORT_SYNTAXES)],
                                 ext_neg=[build_role(PUSH_MODEL, scp_role=True)])
        try:
            if not any(cx.abstract_syntax == PUSH_MODEL for cx in assoc.accepted_contexts):
                raise ConnectionError("the Storage Commitment Push Model was not accepted")
            if not any(cx.abstract_syntax == PUSH_MODEL and cx.as_scp
                       for cx in assoc.accepted_contexts):
                # Many modalities ignore role selection yet take the report: send it anyway.
                log.debug("%s did not accept our SCP role; sending the report anyway", node.aet)
            compat.park_reactor(assoc)   # pynetdicom's race (see there)
            status, _ = assoc.send_n_event_report(info, event_type, PUSH_MODEL, WELL_KNOWN)
            return int(status.Status) if "Status" in status else None
        finally:
            close_association(ae, assoc)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests; requests not yet checked and reports waiting to be retried are
        dropped (logged). Waits at most `timeout` for reports being sent."""
        with self._lock:
            self._stop.set()
            workers, self._workers = self._workers, []
        dropped = 0
        while True:
            try:
                if self._jobs.get_nowait() is not None:
                    dropped += 1
            except queue.Empty:
                break
        with self._lock:
            self._pending -= dropped
        if dropped:
            log.warning("%d storage commitment request(s) not checked at shutdown (the "
                        "modalities may ask again)", dropped)
        for _ in workers:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
