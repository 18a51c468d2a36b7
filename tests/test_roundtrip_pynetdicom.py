"""Store pydicom's test files with pynetdicom, get them back with C-GET: bytes unchanged."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from conftest import c_get, store_files
from data import CHARSET_FILES, TEST_FILES, dataset_bytes, sample

# rtplan.dcm's File Meta names another SOP Instance than its data set: see the last test.
# (Several MR_small variants share one SOP Instance UID, hence one server per file.)
FILES = [n for n, _ in TEST_FILES if n != "rtplan.dcm"] + CHARSET_FILES


@pytest.mark.parametrize("name", FILES)
def test_store_then_get_returns_identical_bytes(make_server, name):
    server = make_server()
    path = sample(name)
    assert store_files(server.dicom_port, [path]) == [0]
    ds = dcmread(path, stop_before_pixels=True)
    ts, body = dataset_bytes(path)
    keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
            "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": ds.SOPInstanceUID}
    status, received = c_get(server.dicom_port, keys, str(ds.SOPClassUID), ts)
    assert status == 0x0000
    assert received == {str(ds.SOPInstanceUID): (ts, body)}


def test_request_and_data_set_disagreeing_on_the_instance_is_refused(server):
    # Sent by path, pynetdicom takes the Affected SOP Instance UID from rtplan.dcm's File Meta,
    # which differs from the data set's SOPInstanceUID.
    assert store_files(server.dicom_port, [sample("rtplan.dcm")]) == [0xC000]
    assert server.index.counts()["instances"] == 0
    assert list(server.cfg.storage_path.rglob("*.dcm")) == []
