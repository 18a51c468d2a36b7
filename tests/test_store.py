"""C-STORE into the archive: what is kept, how, and what is refused (with pynetdicom as SCU)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from conftest import associate, store_files
from data import ct_slice, dataset_bytes, uid

LAYOUT = re.compile(r"\d{4}/\d{2}/\d{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm")


def stored_files(server) -> list[Path]:
    """The stored images (copies with other content kept aside in .conflicts are not)."""
    root = server.cfg.storage_path
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] not in (".conflicts", ".trash"))


def everything_under(root: Path) -> set[Path]:
    """Every path under the data folder but the audit trail (which records the attempt)."""
    audit = root / "audit"
    return {p for p in root.rglob("*") if p != audit and audit not in p.parents}


def test_bytes_kept_as_received_with_our_file_meta(server, tmp_path):
    path = tmp_path / "a.dcm"
    ct_slice(seed=1, patient=1, study=1, series=1, number=1, size=32).save_as(
        path, enforce_file_format=True)
    assert store_files(server.dicom_port, [path], aet="CT_SCANNER") == [0]
    [kept] = stored_files(server)
    rel = kept.relative_to(server.cfg.storage_path).as_posix()
    assert LAYOUT.fullmatch(rel), rel   # server-chosen name, never a UID
    assert dataset_bytes(kept) == dataset_bytes(path)
    meta = dcmread(kept, stop_before_pixels=True).file_meta
    assert meta.SourceApplicationEntityTitle == "CT_SCANNER"
    assert meta.ImplementationVersionName.startswith("PACSD")
    assert [p for p in (server.cfg.storage_path / ".tmp").rglob("*") if p.is_file()] == []


def test_duplicate_keeps_the_first_copy_and_answers_success(make_server, tmp_path):
    # Other content under a stored UID is refused by default (tests/reliability/
    # test_patient_safety.py); on_conflict = "success" restores the earlier answer.
    server = make_server(storage={"on_conflict": "success"})
    first, second = tmp_path / "1.dcm", tmp_path / "2.dcm"
    ds = ct_slice(seed=2, patient=1, study=1, series=1, number=1, size=16)
    ds.save_as(first, enforce_file_format=True)
    ds.StudyDescription = "CHANGED"
    ds.save_as(second, enforce_file_format=True)
    assert store_files(server.dicom_port, [first, second]) == [0, 0]
    [kept] = stored_files(server)
    assert dataset_bytes(kept) == dataset_bytes(first)
    assert server.index.counts()["instances"] == 1


def test_duplicate_replaces_when_overwrite_is_configured(make_server, tmp_path):
    server = make_server(storage={"overwrite": True})
    first, second = tmp_path / "1.dcm", tmp_path / "2.dcm"
    ds = ct_slice(seed=3, patient=1, study=1, series=1, number=1, size=16)
    ds.save_as(first, enforce_file_format=True)
    ds.InstanceNumber = 99
    ds.save_as(second, enforce_file_format=True)
    assert store_files(server.dicom_port, [first, second]) == [0, 0]
    [kept] = stored_files(server)
    assert dataset_bytes(kept) == dataset_bytes(second)
    assert server.index.counts()["instances"] == 1
    # The replaced copy is a previous version, in the recycle bin, byte for byte.
    [previous] = list((server.cfg.storage_path / ".trash").rglob("*.dcm"))
    assert dataset_bytes(previous) == dataset_bytes(first)
    [entry] = server.index.bin_entries()
    assert (entry.action, entry.uid, entry.instances) == ("overwrite", ds.SOPInstanceUID, 1)


@pytest.mark.parametrize("bad", [
    "../../etc/x", "/etc/passwd", "1.2.abc", "1." + "2" * 64, "1.02.3", "1.2\\3", ""])
def test_hostile_study_uids_are_refused_and_nothing_is_written(server, tmp_path, bad):
    before = everything_under(server.cfg.data)
    ds = ct_slice(seed=4, patient=1, study=1, series=1, number=1, size=8)
    ds.StudyInstanceUID = bad
    with associate(server.dicom_port, [build_context(CTImageStorage, [ExplicitVRLittleEndian]),
                                        build_context(Verification)]) as assoc:
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0xC000
        assert assoc.send_c_echo().Status == 0   # the association and server go on
    assert everything_under(server.cfg.data) == before
    assert server.index.counts()["instances"] == 0


@pytest.mark.parametrize("bad", ["../../x", "1.2.abc", "/tmp/evil"])
def test_hostile_sop_instance_uids_are_refused(server, bad):
    ds = ct_slice(seed=4, patient=1, study=1, series=1, number=2, size=8)
    ds.SOPInstanceUID = bad
    with associate(server.dicom_port,
                   [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.send_c_store(ds).Status == 0xC000
    assert stored_files(server) == []


def test_missing_series_uid_is_refused(server):
    ds = ct_slice(seed=5, patient=1, study=1, series=1, number=1, size=8)
    del ds.SeriesInstanceUID
    with associate(server.dicom_port,
                   [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as assoc:
        assert assoc.send_c_store(ds).Status == 0xC000
    assert stored_files(server) == []


def test_sop_class_not_matching_the_data_set_is_refused(server, tmp_path):
    # The file meta (hence the request and its context) says MR; the data set says CT.
    from pacsd.imaging.header import file_meta_bytes
    ds = ct_slice(seed=6, patient=1, study=1, series=1, number=1, size=8)
    honest, path = tmp_path / "honest.dcm", tmp_path / "liar.dcm"
    ds.save_as(honest, enforce_file_format=True)
    ts, body = dataset_bytes(honest)
    path.write_bytes(file_meta_bytes(MRImageStorage, ds.SOPInstanceUID, ts) + body)
    assert store_files(server.dicom_port, [path]) == [0xA900]
    assert stored_files(server) == []


def test_truncated_data_set_is_refused_and_the_server_goes_on(server, tmp_path):
    good, cut = tmp_path / "good.dcm", tmp_path / "cut.dcm"
    ct_slice(seed=7, patient=1, study=1, series=1, number=1, size=64).save_as(
        good, enforce_file_format=True)
    data = good.read_bytes()
    # Cut inside the header (before Pixel Data), in the middle of an element.
    cut.write_bytes(data[:data.index(b"\x10\x00\x10\x00") + 12])
    statuses = store_files(server.dicom_port, [cut, good])
    assert statuses[0] in (0xC000, 0xA900) and statuses[1] == 0
    assert len(stored_files(server)) == 1
    assert [p for p in (server.cfg.storage_path / ".tmp").rglob("*") if p.is_file()] == []


def test_many_instances_spread_over_folders_and_index_agrees(server, tmp_path):
    paths = []
    for n in range(1, 21):
        p = tmp_path / f"{n}.dcm"
        ct_slice(seed=8, patient=1, study=1, series=1 + n % 2, number=n, size=8).save_as(
            p, enforce_file_format=True)
        paths.append(p)
    assert store_files(server.dicom_port, paths) == [0] * 20
    from pacsd.index.models import Instance
    with server.index.reading():
        rows = {r.path for r in Instance.select(Instance.path)}
    on_disk = {p.relative_to(server.cfg.storage_path).as_posix() for p in stored_files(server)}
    assert rows == on_disk and len(rows) == 20
    assert server.index.counts() == {"patients": 1, "studies": 1, "series": 2, "instances": 20,
                                     "bytes": sum(p.stat().st_size for p in stored_files(server))}
    assert uid(8, 1, 1, "study")   # (deterministic UIDs: the generator is seeded)


@pytest.mark.parametrize("sop", ["1", "1.2", "1.2.3.99", "9" * 63, "1." + "9" * 62])
def test_file_meta_matches_pydicom_for_every_uid_length(sop):
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from pacsd.imaging.header import (IMPLEMENTATION_UID, IMPLEMENTATION_VERSION, PREAMBLE,
                              file_meta_bytes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.99"
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = "CT99"
    buf = BytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(buf, meta, enforce_standard=True)
    assert file_meta_bytes("1.2.840.10008.5.1.4.1.1.99", sop, ExplicitVRLittleEndian,
                           "CT99") == buf.getvalue()


def test_server_sockets_have_tcp_nodelay(server):
    import socket
    with associate(server.dicom_port, [build_context(Verification)]):
        [assoc] = server.dicom.ae.active_associations
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_every_storage_class_with_every_syntax_is_accepted(server):
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    supported = {cx.abstract_syntax: set(cx.transfer_syntax)
                 for cx in server.dicom.ae.supported_contexts}
    for cx in AllStoragePresentationContexts:
        assert supported[cx.abstract_syntax] == set(ALL_TRANSFER_SYNTAXES), cx.abstract_syntax
