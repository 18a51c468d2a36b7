"""C-CANCEL (PS3.7 9.3.2.3) honoured by a long C-FIND."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT

from conftest import associate, store_files
from data import ct_slice


def test_c_cancel_stops_a_long_find(make_server, tmp_path):
    server = make_server()
    paths = []
    for st in range(300):
        path = tmp_path / f"{st}.dcm"
        ct_slice(seed=9, patient=1, study=st, series=1, number=1, size=4).save_as(
            path, enforce_file_format=True)
        paths.append(path)
    assert store_files(server.dicom_port, paths) == [0] * 300
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    with associate(server.dicom_port, [build_context(STUDY_ROOT)]) as assoc:
        statuses = []
        for status, _ in assoc.send_c_find(q, STUDY_ROOT, msg_id=7):
            statuses.append(status.Status)
            if len(statuses) == 1:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
    assert statuses[-1] == 0xFE00
    assert len(statuses) - 1 <= 64   # noticed within a few dozen responses, not after all 300


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
