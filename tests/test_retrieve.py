"""C-MOVE and C-GET with pynetdicom peers: destinations, sub-operation counts, bytes unchanged."""

from __future__ import annotations

import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage)
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelMove)

from conftest import LOCAL, associate, store_files
from data import dataset_bytes, sample, write_series

MOVE = StudyRootQueryRetrieveInformationModelMove


class Destination:
    """A pynetdicom Storage SCP that accepts only uncompressed syntaxes and records what it gets."""

    def __init__(self, aet: str = "DEST",
                 syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> None:
        self.received: dict[str, tuple[str, bytes]] = {}
        self.ae = AE(ae_title=aet)
        for cls in (CTImageStorage, MRImageStorage, "1.2.840.10008.5.1.4.1.1.7"):
            self.ae.add_supported_context(cls, list(syntaxes))
        self.server = self.ae.start_server((LOCAL, 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.server_address[1]

    def on_store(self, event) -> int:
        self.received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def dest():
    d = Destination()
    yield d
    d.close()


def move(port: int, destination: str, level: str, model=MOVE, **keys):
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(port, [build_context(model)]) as assoc:
        return [status for status, _ in assoc.send_c_move(q, destination, model)]


def test_move_a_study_to_a_configured_node(make_server, dest, tmp_path):
    server = make_server(nodes=[{"name": "viewer", "aet": "DEST", "host": LOCAL,
                                 "port": dest.port}])
    files = write_series(tmp_path / "in", seed=11, series=2, images=5, size=32)
    assert store_files(server.dicom_port, files) == [0] * 10
    study = dcmread(files[0]).StudyInstanceUID
    statuses = move(server.dicom_port, "DEST", "STUDY", StudyInstanceUID=study)
    final = statuses[-1]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (10, 0)
    # Pending responses count down the remaining sub-operations (C.4.2.3.1).
    assert [s.NumberOfRemainingSuboperations for s in statuses[:-1]] == list(range(9, -1, -1))
    expected = {str(dcmread(f).SOPInstanceUID): dataset_bytes(f) for f in files}
    assert dest.received == expected


def test_move_sub_associations_wait_for_work_and_leave_nothing_open(make_server, dest, tmp_path):
    import psutil

    from pacsd.compat.pynetdicom_pace import BriskDUL
    server = make_server(nodes=[{"aet": "DEST", "host": LOCAL, "port": dest.port}])
    files = write_series(tmp_path / "in", seed=12, images=3, size=32)
    assert store_files(server.dicom_port, files) == [0] * 3
    study = dcmread(files[0]).StudyInstanceUID
    kinds = []

    def on_store(event) -> int:   # pacsd's side of the sub-association, seen while it sends
        kinds.extend(type(a.dul) for a in server.dicom.ae.active_associations if a.is_requestor)
        return dest.on_store(event)
    dest.server.bind(evt.EVT_C_STORE, on_store)
    wake_ups = psutil.Process().net_connections  # the socket pairs pace makes (AF_UNIX)
    before = len(wake_ups("unix"))
    for _ in range(5):
        assert move(server.dicom_port, "DEST", "STUDY", StudyInstanceUID=study)[-1].Status == 0
    assert len(dest.received) == 3 and len(kinds) == 15
    assert all(k is BriskDUL for k in kinds), kinds
    deadline = time.monotonic() + 10   # the associations' threads end just after the move
    while len(wake_ups("unix")) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(wake_ups("unix")) == before   # closed as each connection closed


def test_move_converts_only_when_the_destination_refuses_the_stored_syntax(make_server):
    dest = Destination(syntaxes=[ExplicitVRLittleEndian])
    try:
        server = make_server(nodes=[{"aet": "DEST", "host": LOCAL, "port": dest.port}])
        implicit, jpeg2000 = sample("MR_small_implicit.dcm"), sample("JPEG2000.dcm")
        assert store_files(server.dicom_port, [implicit, jpeg2000]) == [0, 0]
        mr = dcmread(implicit)
        final = move(server.dicom_port, "DEST", "STUDY", StudyInstanceUID=mr.StudyInstanceUID)[-1]
        assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 1)
        ts, body = dest.received[str(mr.SOPInstanceUID)]
        assert ts == ExplicitVRLittleEndian   # converted by pynetdicom: same data, other encoding
        from pydicom.filereader import read_dataset
        from io import BytesIO
        got = read_dataset(BytesIO(body), is_implicit_VR=False, is_little_endian=True)
        assert got.PixelData == mr.PixelData and got.PatientName == mr.PatientName
        # JPEG 2000 is decoded for it (GDCM is installed) and sent uncompressed, same pixels.
        j2k = dcmread(jpeg2000)
        final = move(server.dicom_port, "DEST", "STUDY", StudyInstanceUID=j2k.StudyInstanceUID)[-1]
        assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 1)
        ts, body = dest.received[str(j2k.SOPInstanceUID)]
        assert ts == ExplicitVRLittleEndian
        got = read_dataset(BytesIO(body), is_implicit_VR=False, is_little_endian=True)
        got.file_meta = FileMetaDataset()
        got.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert (got.pixel_array == j2k.pixel_array).all()
        # A class the destination does not accept at all (it refuses the association): a
        # failure, reported as such, never as a success.
        sr = sample("test-SR.dcm")
        assert store_files(server.dicom_port, [sr]) == [0]
        sr_ds = dcmread(sr, stop_before_pixels=True)
        final = move(server.dicom_port, "DEST", "STUDY", StudyInstanceUID=sr_ds.StudyInstanceUID)[-1]
        assert final.Status != 0x0000
        assert getattr(final, "NumberOfCompletedSuboperations", 0) == 0
        assert str(sr_ds.SOPInstanceUID) not in dest.received
    finally:
        dest.close()


def test_move_to_an_unknown_destination_is_refused(server, tmp_path):
    files = write_series(tmp_path / "in", seed=12, images=2, size=16)
    store_files(server.dicom_port, files)
    study = dcmread(files[0]).StudyInstanceUID
    statuses = move(server.dicom_port, "NOBODY", "STUDY", StudyInstanceUID=study)
    assert [s.Status for s in statuses] == [0xA801]


def test_move_patient_root_at_patient_level(make_server, dest, tmp_path):
    server = make_server(nodes=[{"aet": "DEST", "host": LOCAL, "port": dest.port}])
    files = write_series(tmp_path / "in", seed=13, studies=2, images=3, size=16)
    store_files(server.dicom_port, files)
    final = move(server.dicom_port, "DEST", "PATIENT", PatientRootQueryRetrieveInformationModelMove,
                 PatientID=dcmread(files[0]).PatientID)[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0, 6)
    assert len(dest.received) == 6


def test_move_without_the_unique_key_is_refused(server):
    statuses = move(server.dicom_port, "DEST", "SERIES", StudyInstanceUID="1.2.3")
    assert statuses[-1].Status != 0x0000
