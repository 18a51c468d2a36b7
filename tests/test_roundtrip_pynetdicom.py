"""Store pydicom's test files with pynetdicom, get them back with C-GET: bytes unchanged."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from conftest import associate, store_files
from data import CHARSET_FILES, TEST_FILES, dataset_bytes, sample

# rtplan.dcm's File Meta names another SOP Instance than its data set: see the last test.
# (Several MR_small variants share one SOP Instance UID, hence one server per file.)
FILES = [n for n, _ in TEST_FILES if n != "rtplan.dcm"] + CHARSET_FILES


def get_back(port: int, ds: Dataset, sop_class: str, ts: str) -> tuple[int, dict]:
    """C-GET one instance, proposing only its stored (class, syntax); (status, received)."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = sop_class, False, True
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet),
                build_context(sop_class, [ts])]
    with associate(port, contexts, ext_neg=[role],
                   evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = ds.StudyInstanceUID
        q.SeriesInstanceUID = ds.SeriesInstanceUID
        q.SOPInstanceUID = ds.SOPInstanceUID
        final = list(assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet))[-1][0]
    return int(final.Status), received


@pytest.mark.parametrize("name", FILES)
def test_store_then_get_returns_identical_bytes(make_server, name):
    server = make_server()
    path = sample(name)
    assert store_files(server.dicom_port, [path]) == [0]
    ds = dcmread(path, stop_before_pixels=True)
    ts, body = dataset_bytes(path)
    status, received = get_back(server.dicom_port, ds, str(ds.SOPClassUID), ts)
    assert status == 0x0000
    assert received == {str(ds.SOPInstanceUID): (ts, body)}


def test_request_and_data_set_disagreeing_on_the_instance_is_refused(server):
    # Sent by path, pynetdicom takes the Affected SOP Instance UID from rtplan.dcm's File Meta,
    # which differs from the data set's SOPInstanceUID.
    assert store_files(server.dicom_port, [sample("rtplan.dcm")]) == [0xC000]
    assert server.index.counts()["instances"] == 0
    assert list(server.cfg.storage_path.rglob("*.dcm")) == []
