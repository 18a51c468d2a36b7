"""C-CANCEL (PS3.7 9.3.2.3) honoured by a long C-FIND."""

from __future__ import annotations

import logging
import re

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context

from conftest import LOCAL, associate, dcmtk, run_peer, store_files
from data import ct_slice


@pytest.mark.peers
def test_c_cancel_stops_a_long_find(make_server, tmp_path, caplog):
    """DCMTK's findscu cancels after the first answer (`--cancel 1`), from its own process as a
    peer does (a pynetdicom client in this process would share the GIL with the server's sender
    and measure that race instead): pacsd answers Cancel within a few dozen matches of 300."""
    caplog.set_level(logging.INFO, logger="pacsd.dimse.find")
    server = make_server()
    paths = []
    for st in range(300):
        path = tmp_path / f"{st}.dcm"
        ct_slice(seed=9, patient=1, study=st, series=1, number=1, size=4).save_as(
            path, enforce_file_format=True)
        paths.append(path)
    assert store_files(server.dicom_port, paths) == [0] * 300
    for _ in range(3):
        out = run_peer([dcmtk("findscu"), "-v", "-S", "--cancel", "1", "-aet", "FINDSCU",
                        "-aec", "PACSD", "-k", "QueryRetrieveLevel=STUDY", "-k",
                        "StudyInstanceUID", LOCAL, str(server.dicom_port)])
        text = out.stdout + out.stderr
        assert "Sending Cancel Request" in text and "Received Final Find Response (Cancel" in text
    counts = [int(m) for m in re.findall(r"cancelled after (\d+) match",
                                         "\n".join(r.getMessage() for r in caplog.records))]
    assert len(counts) == 3 and max(counts) <= 64, counts   # not after all 300


def test_c_cancel_stops_a_c_get(make_server, tmp_path):
    from pynetdicom import evt
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    server = make_server()
    paths = []
    for n in range(40):
        path = tmp_path / f"{n}.dcm"
        ct_slice(seed=10, patient=1, study=1, series=1, number=n, size=4).save_as(
            path, enforce_file_format=True)
        paths.append(path)
    assert store_files(server.dicom_port, paths) == [0] * 40
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ct_slice(seed=10, patient=1, study=1, series=1, number=0,
                                  size=4).StudyInstanceUID
    with associate(server.dicom_port, [build_context(GET),
                                       build_context(CTImageStorage, [ExplicitVRLittleEndian])],
                   ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        statuses = []
        for status, _ in assoc.send_c_get(q, GET, msg_id=9):
            statuses.append(status)
            if len(statuses) == 1:
                assoc.send_c_cancel(9, assoc.accepted_contexts[0].context_id)
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfRemainingSuboperations > 0
    assert len(received) < 40
