"""Storage Commitment Push Model (PS3.4 Annex J) with a pynetdicom modality: its SCU sends the
N-ACTION, its SCP takes the N-EVENT-REPORT that pacsd sends on an association of its own.

DCMTK 3.6.7 has no storage commitment tool: pynetdicom plays the modality on both sides, and
Orthanc (its storage commitment SCU, driven through its REST API) is the independent peer.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LOCAL, associate, free_port, store_files, wait_for
from data import read, write_series
from orthanc import orthanc
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE, build_context, evt

from pacsd import query
from pacsd.dimse.commitment import PUSH_MODEL, WELL_KNOWN

MODALITY = "MODALITY"


@dataclass
class Report:
    event_type: int
    info: Dataset
    calling: str
    called: str
    sop_class: str
    sop_instance: str
    we_are_scu: bool          # the modality's role on the report's context
    at: float


class Modality:
    """The modality's side that receives storage commitment results: a pynetdicom SCP taking
    N-EVENT-REPORT, accepting the SCP role the caller proposes (PS3.7 D.3.3.4)."""

    def __init__(self, port: int = 0, aet: str = MODALITY, roles: bool = True) -> None:
        self.reports: queue.Queue[Report] = queue.Queue()
        self.ae = AE(ae_title=aet)
        if roles:
            self.ae.add_supported_context(PUSH_MODEL, scu_role=True, scp_role=True)
        else:   # like many modalities: role selection not negotiated
            self.ae.add_supported_context(PUSH_MODEL)
        self.server = None
        self.port = port
        self.aet = aet

    def start(self) -> Modality:
        self.server = self.ae.start_server((LOCAL, self.port), block=False, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, self.on_report)])
        self.port = self.server.server_address[1]
        return self

    def on_report(self, event):
        cx = next(c for c in event.assoc.accepted_contexts
                  if c.context_id == event.context.context_id)
        self.reports.put(Report(
            event.event_type, event.event_information, event.assoc.requestor.ae_title,
            event.assoc.acceptor.ae_title, str(event.request.AffectedSOPClassUID),
            str(event.request.AffectedSOPInstanceUID), bool(cx.as_scu and not cx.as_scp),
            time.monotonic()))
        return 0x0000, None

    def node(self) -> dict:
        return {"name": "modality", "aet": self.aet, "host": LOCAL, "port": self.port}

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def modality():
    m = Modality().start()
    yield m
    m.close()


def action_info(transaction: str | None, items: list[tuple[str, str]] | None) -> Dataset:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    if items is not None:
        ds.ReferencedSOPSequence = []
        for cls, inst in items:
            item = Dataset()
            if cls is not None:
                item.ReferencedSOPClassUID = cls
            if inst is not None:
                item.ReferencedSOPInstanceUID = inst
            ds.ReferencedSOPSequence.append(item)
    return ds


def n_action(assoc, info: Dataset | None, action_type: int = 1, instance: str = WELL_KNOWN
             ) -> Dataset:
    status, _ = assoc.send_n_action(info, action_type, PUSH_MODEL, instance)
    assert "Status" in status, "no N-ACTION response"
    return status


def request(port: int, info: Dataset | None, aet: str = MODALITY, hold: float = 0.0
            ) -> tuple[Dataset, float]:
    """One association: N-ACTION, then (after `hold` seconds) release. (status, release time)"""
    with associate(port, [build_context(PUSH_MODEL)], aet=aet) as assoc:
        status = n_action(assoc, info)
        time.sleep(hold)
        released = time.monotonic()
    return status, released


def stored(paths: list[Path]) -> list[tuple[str, str]]:
    return [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in map(read, paths)]


def items_of(seq) -> list[tuple]:
    return [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            + ((int(i.FailureReason),) if "FailureReason" in i else ()) for i in seq]


def test_commitment_reports_stored_missing_and_conflicting(make_server, modality, tmp_path,
                                                          caplog):
    caplog.set_level(logging.INFO, logger="pacsd.dimse.commitment")
    srv = make_server(nodes=[modality.node()])
    paths = write_series(tmp_path / "in", images=4, size=64)
    assert store_files(srv.dicom_port, paths, aet=MODALITY) == [0] * 4
    (c1, s1), (c2, s2), (_, s3), (c4, s4) = stored(paths)
    # s4's file vanishes from storage behind the index's back (a damaged disk).
    with srv.dicom.archive.index.reading():
        (row,) = query.instances(query.Request("IMAGE", {"SOPInstanceUID": s4}))
    srv.dicom.archive.store.path(row.path).unlink()
    never_sent = generate_uid()
    transaction = generate_uid()
    asked = [(c1, s1), (c2, s2), (MRImageStorage, s3), (CTImageStorage, never_sent), (c4, s4)]

    t0 = time.monotonic()
    # The modality keeps its association open a moment after the answer: the report must wait
    # for it to end (a modality that handles one association at a time).
    status, released = request(srv.dicom_port, action_info(transaction, asked), hold=0.3)
    assert int(status.Status) == 0x0000
    report = modality.reports.get(timeout=10)
    assert report.at >= released, "the report came while the requesting association was open"
    assert report.at - released < 2.0

    assert report.event_type == 2                      # failures exist
    assert report.info.TransactionUID == transaction
    assert report.info.RetrieveAETitle == "PACSD"
    assert items_of(report.info.ReferencedSOPSequence) == [(c1, s1), (c2, s2)]
    assert sorted(items_of(report.info.FailedSOPSequence)) == sorted([
        (MRImageStorage, s3, 0x0119),        # stored as CT: Class-Instance conflict
        (CTImageStorage, never_sent, 0x0112),  # No such object instance
        (c4, s4, 0x0110),                    # indexed but its file is gone: Processing failure
    ])
    # On a new association from us, with the role selection accepted: we are the SCP.
    assert (report.calling, report.called) == ("PACSD", MODALITY)
    assert (report.sop_class, report.sop_instance) == (PUSH_MODEL, WELL_KNOWN)
    assert report.we_are_scu
    assert any("file" in r.getMessage() and "missing" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)

    # Everything committed: Event Type 1, no Failed SOP Sequence.
    transaction2 = generate_uid()
    t1 = time.monotonic()
    status, _ = request(srv.dicom_port, action_info(transaction2, [(c1, s1), (c2, s2)]))
    assert int(status.Status) == 0x0000
    report = modality.reports.get(timeout=10)
    answered_in = report.at - t1
    assert report.event_type == 1
    assert report.info.TransactionUID == transaction2
    assert items_of(report.info.ReferencedSOPSequence) == [(c1, s1), (c2, s2)]
    assert "FailedSOPSequence" not in report.info
    assert answered_in < 2.0, f"report took {answered_in:.2f} s"
    assert modality.reports.empty()
    wait_for(lambda: srv.dicom.commitments.pending == 0, 5, "the workers to finish")
    assert any(f"{transaction2} reported to {MODALITY}" in r.getMessage()
               for r in caplog.records)
    print(f"first report {report.at - t0:.2f} s after the request; "
          f"second {answered_in * 1000:.0f} ms")


def test_unknown_calling_ae_is_refused_at_once(make_server, modality, tmp_path, caplog):
    """No node to report to: refusing now (0x0110 with an Error Comment) beats acknowledging a
    request whose answer would never come."""
    srv = make_server(nodes=[modality.node()])
    paths = write_series(tmp_path / "in", images=1, size=64)
    assert store_files(srv.dicom_port, paths, aet="STRANGER") == [0]
    status, _ = request(srv.dicom_port, action_info(generate_uid(), stored(paths)),
                        aet="STRANGER")
    assert int(status.Status) == 0x0110
    assert "STRANGER" in status.ErrorComment
    assert srv.dicom.commitments.pending == 0          # nothing queued: no report will come
    assert modality.reports.empty()
    (line,) = [r.getMessage() for r in caplog.records if "STRANGER" in r.getMessage()
               and r.levelno == logging.WARNING]
    assert "[[nodes]]" in line and "0x0110" in line


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")   # the bad UIDs we send on purpose
def test_malformed_requests_get_a_failure_status(make_server, modality, caplog):
    srv = make_server(nodes=[modality.node()])
    good = [(CTImageStorage, generate_uid())]
    cases = [
        ("no Action Information", None, 1, WELL_KNOWN, 0x0115),
        ("no Transaction UID", action_info(None, good), 1, WELL_KNOWN, 0x0115),
        ("empty Transaction UID", action_info("", good), 1, WELL_KNOWN, 0x0115),
        ("Transaction UID not a UID", action_info("1.2.abc", good), 1, WELL_KNOWN, 0x0115),
        ("Transaction UID too long", action_info("1." * 40 + "1", good), 1, WELL_KNOWN, 0x0115),
        ("no Referenced SOP Sequence", action_info(generate_uid(), None), 1, WELL_KNOWN, 0x0115),
        ("empty Referenced SOP Sequence", action_info(generate_uid(), []), 1, WELL_KNOWN,
         0x0115),
        ("item without its instance", action_info(generate_uid(), [(CTImageStorage, None)]), 1,
         WELL_KNOWN, 0x0115),
        ("item without its class", action_info(generate_uid(), [(None, "1.2.3")]), 1,
         WELL_KNOWN, 0x0115),
        ("item with a bad UID", action_info(generate_uid(), [(CTImageStorage, "1.2.x")]), 1,
         WELL_KNOWN, 0x0115),
        ("Action Type 2", action_info(generate_uid(), good), 2, WELL_KNOWN, 0x0123),
        ("not the well-known instance", action_info(generate_uid(), good), 1, "1.2.3.4",
         0x0112),
    ]
    with associate(srv.dicom_port, [build_context(PUSH_MODEL)], aet=MODALITY) as assoc:
        for what, info, action_type, instance, expected in cases:
            caplog.clear()
            status = n_action(assoc, info, action_type, instance)
            assert int(status.Status) == expected, what
            assert status.get("ErrorComment"), what
            assert srv.dicom.commitments.pending == 0, what
            assert any("refused" in r.getMessage() and f"0x{expected:04X}" in r.getMessage()
                       for r in caplog.records), what
        # The association survives them all: a good request is still answered.
        status = n_action(assoc, action_info(generate_uid(), good))
        assert int(status.Status) == 0x0000
    report = modality.reports.get(timeout=10)
    assert report.event_type == 2
    assert items_of(report.info.FailedSOPSequence) == [(*good[0], 0x0112)]


def test_report_is_retried_until_the_modality_listens(make_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pacsd.dimse.commitment")
    late = Modality(port=free_port())          # not listening yet
    srv = make_server(nodes=[late.node()])
    srv.dicom.commitments.retry_delays = (0.4, 2.0)
    paths = write_series(tmp_path / "in", images=2, size=64)
    assert store_files(srv.dicom_port, paths, aet=MODALITY) == [0, 0]
    transaction = generate_uid()
    status, _ = request(srv.dicom_port, action_info(transaction, stored(paths)))
    assert int(status.Status) == 0x0000
    wait_for(lambda: any("try 2 of 3" in r.getMessage() for r in caplog.records), 10,
             "the first report attempt to fail")
    late.start()
    try:
        report = late.reports.get(timeout=10)
    finally:
        late.close()
    assert report.event_type == 1 and report.info.TransactionUID == transaction
    assert items_of(report.info.ReferencedSOPSequence) == stored(paths)
    wait_for(lambda: any(f"{transaction} reported" in r.getMessage() for r in caplog.records),
             5, "the success line")


def test_report_gives_up_after_three_tries(make_server, tmp_path, caplog):
    nobody = Modality(port=free_port())        # never listens
    srv = make_server(nodes=[nobody.node()])
    srv.dicom.commitments.retry_delays = (0.1, 0.1)
    transaction = generate_uid()
    status, _ = request(srv.dicom_port, action_info(transaction, [(CTImageStorage, "1.2.3")]))
    assert int(status.Status) == 0x0000
    wait_for(lambda: srv.dicom.commitments.pending == 0, 10, "the report to be given up")
    errors = [r.getMessage() for r in caplog.records
              if r.levelno == logging.ERROR and r.name == "pacsd.dimse.commitment"]
    assert len(errors) == 1 and transaction in errors[0] and "3 times" in errors[0]
    assert sum("try" in r.getMessage() and transaction in r.getMessage()
               for r in caplog.records) == 2


# --- Orthanc as the modality: another implementation's storage commitment SCU -----------------

def test_orthanc_as_storage_commitment_scu(make_server, tmp_path):
    """Orthanc (1.6+) asks through its REST API (POST /modalities/{id}/storage-commitment) and
    shows the report it received (GET /storage-commitment/{transaction})."""
    dicom = free_port()
    srv = make_server(nodes=[{"name": "orthanc", "aet": "ORTHANC", "host": LOCAL,
                              "port": dicom}])
    with orthanc(tmp_path / "orthanc", dicom_port=dicom, DicomModalities={
            "pacsd": {"AET": "PACSD", "Host": LOCAL, "Port": srv.dicom_port}}) as peer:
        paths = write_series(tmp_path / "in", images=3, size=64)
        assert store_files(srv.dicom_port, paths, aet="ORTHANC") == [0] * 3
        (c1, s1), (c2, s2), (_, s3) = stored(paths)
        missing = generate_uid()
        asked = [(c1, s1), (c2, s2), (MRImageStorage, s3), (CTImageStorage, missing)]
        job = peer.rest_json("/modalities/pacsd/storage-commitment", {
            "Timeout": 10, "DicomInstances": [
                {"SOPClassUID": c, "SOPInstanceUID": i} for c, i in asked]}, timeout=10)
        result = wait_for(lambda: (r := peer.rest_json(job["Path"], timeout=10))["Status"]
                          != "Pending" and r, 10, "Orthanc to receive the report")
    assert result["Status"] == "Failure" and result["RemoteAET"] == "PACSD"
    assert [(s["SOPClassUID"], s["SOPInstanceUID"]) for s in result["Success"]] == [
        (c1, s1), (c2, s2)]
    assert sorted((f["SOPClassUID"], f["SOPInstanceUID"], f["FailureReason"])
                  for f in result["Failures"]) == sorted([
        (MRImageStorage, s3, 0x0119), (CTImageStorage, missing, 0x0112)])


def test_shutdown_does_not_wait_for_a_report_being_retried(make_server, caplog):
    nobody = Modality(port=free_port())        # never listens
    srv = make_server(nodes=[nobody.node()])
    srv.dicom.commitments.retry_delays = (60.0, 60.0)
    transaction = generate_uid()
    status, _ = request(srv.dicom_port, action_info(transaction, [(CTImageStorage, "1.2.3")]))
    assert int(status.Status) == 0x0000
    wait_for(lambda: any("try 2 of 3" in r.getMessage() for r in caplog.records), 10,
             "the first attempt to fail")
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3.0   # not the 5 s bound, nor the 60 s back-off
    assert any(transaction in r.getMessage() and "shutting down" in r.getMessage()
               for r in caplog.records)


def test_report_reaches_a_modality_that_ignores_role_selection(make_server, tmp_path):
    plain = Modality(roles=False).start()
    try:
        srv = make_server(nodes=[plain.node()])
        paths = write_series(tmp_path / "in", images=1, size=64)
        assert store_files(srv.dicom_port, paths, aet=MODALITY) == [0]
        transaction = generate_uid()
        status, _ = request(srv.dicom_port, action_info(transaction, stored(paths)))
        assert int(status.Status) == 0x0000
        report = plain.reports.get(timeout=10)
    finally:
        plain.close()
    assert not report.we_are_scu             # no role negotiated: default roles
    assert report.event_type == 1 and report.info.TransactionUID == transaction
