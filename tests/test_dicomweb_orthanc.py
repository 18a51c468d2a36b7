"""Orthanc's DICOMweb plugin (1.7, on Orthanc 1.10) as a client of pacsd's DICOMweb: its QIDO-RS
proxy, its WADO-RS retrieve into Orthanc, and metadata with bulk data through its /get."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).parent))

from conftest import store_files, write_config  # noqa: E402
from data import dataset_bytes, sample, write_series  # noqa: E402
from orthanc import orthanc  # noqa: E402


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """pacsd holding a CT series and a waveform, and an Orthanc whose DICOMweb plugin knows
    pacsd as the DICOMweb server "pacsd"."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("orthanc-dicomweb")
    server = Server(config.load(write_config(tmp / "c.toml", tmp / "data"), env={})).start()
    try:
        files = write_series(tmp / "in", seed=21, images=3, size=64) + [
            sample("waveform_ecg.dcm")]
        assert store_files(server.dicom_port, files) == [0] * len(files)
        with orthanc(tmp / "orthanc", dicomweb=True, DicomWeb={
                "Enable": True, "Servers": {"pacsd": [server.http_url + "/dicom-web/"]}}) as peer:
            server.files, server.orthanc, server.tmp = files, peer.rest, tmp
            yield server
    finally:
        server.stop()


def test_orthanc_qido_no_match_and_matches(peers):
    """Orthanc's QIDO-RS proxy: a search with no match is an empty list (pacsd answers 200 []),
    and a match comes with its attributes."""
    rest = peers.orthanc
    none = json.loads(rest("/dicom-web/servers/pacsd/qido", {
        "Uri": "/studies", "Arguments": {"PatientID": "NOBODY-AT-ALL"}}))
    assert none == []
    ct = dcmread(peers.files[0], stop_before_pixels=True)
    found = json.loads(rest("/dicom-web/servers/pacsd/qido", {
        "Uri": "/studies", "Arguments": {"StudyInstanceUID": ct.StudyInstanceUID,
                                         "includefield": "SOPClassesInStudy"}}))
    # (Orthanc gives each attribute its own way: {"Name", "vr", "Value": text, ...})
    assert [s["0020000D"]["Value"] for s in found] == [ct.StudyInstanceUID]
    assert found[0]["00080062"]["Value"] == ct.SOPClassUID


def test_orthanc_retrieves_a_study_over_wado_rs(peers):
    """Orthanc's /retrieve reads pacsd's multipart WADO-RS answer and stores every instance,
    byte for byte."""
    rest = peers.orthanc
    ct = dcmread(peers.files[0], stop_before_pixels=True)
    rest("/dicom-web/servers/pacsd/retrieve", {"Resources": [{"Study": ct.StudyInstanceUID}]})
    ids = json.loads(rest("/instances"))
    assert len(ids) == 3
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
                for p in peers.files[:3]}
    for i in ids:
        data = rest(f"/instances/{i}/file")
        got = peers.tmp / f"orthanc-{i}.dcm"
        got.write_bytes(data)
        sop = str(dcmread(got, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(got) == expected[sop]


def test_orthanc_reads_metadata_and_its_bulk_data(peers):
    """Metadata through Orthanc's /get: WaveformData by BulkDataURI, whose bytes Orthanc's /get
    fetches from the bulk data resource."""
    rest = peers.orthanc
    ecg = dcmread(peers.files[-1])
    base = (f"/studies/{ecg.StudyInstanceUID}/series/{ecg.SeriesInstanceUID}/"
            f"instances/{ecg.SOPInstanceUID}")
    [meta] = json.loads(rest("/dicom-web/servers/pacsd/get", {"Uri": base + "/metadata"}))
    uri = meta["54000100"]["Value"][0]["54001010"]["BulkDataURI"]
    assert uri == f"{peers.http_url}/dicom-web{base}/bulkdata/54000100/0/54001010"
    body = rest("/dicom-web/servers/pacsd/get", {
        "Uri": uri.removeprefix(peers.http_url + "/dicom-web"),
        "HttpHeaders": {"Accept": 'multipart/related; type="application/octet-stream"'}})
    assert ecg.WaveformSequence[0].WaveformData in body
    with pytest.raises(urllib.error.HTTPError):
        rest("/dicom-web/servers/pacsd/get", {"Uri": base + "/bulkdata/00100010"})
