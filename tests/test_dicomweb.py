"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over real HTTP, with dicomweb-client and requests."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filereader import _read_file_meta_info, read_preamble

sys.path.insert(0, str(Path(__file__).parent))

from conftest import c_find as find_status, c_get, store_files, write_config  # noqa: E402
from data import ct_slice, dataset_bytes, sample, uid  # noqa: E402

VIEWER = "http://viewer.example"
SAMPLES = ["SC_rgb_rle_2frame.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
           "CT_small.dcm", "waveform_ecg.dcm"]


def write(folder: Path, **kw) -> Path:
    ds = ct_slice(**kw)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kw['seed']}-{kw['patient']}-{kw['study']}-{kw['series']}-{kw['number']}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A server (CORS allowed for VIEWER) holding: seed 5, patient 1 with a CT+MR study in
    January 2024 and a CT study in 2023, patient 2 a CT study in February; pydicom samples."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("dicomweb")
    cfg = config.load(write_config(tmp / "c.toml", tmp / "data",
                                   http={"cors_origins": [VIEWER]}), env={})
    server = Server(cfg).start()
    files = []
    for p, st, se, n, mod, date in [(1, 1, 1, 4, "CT", "20240115"), (1, 1, 2, 2, "MR", "20240115"),
                                    (1, 2, 1, 3, "CT", "20230610"), (2, 1, 1, 2, "CT", "20240203")]:
        files += [write(tmp / "in", seed=5, patient=p, study=st, series=se, number=i, size=32,
                        modality=mod, study_date=date) for i in range(1, n + 1)]
    files += [sample(name) for name in SAMPLES]
    assert store_files(server.dicom_port, files) == [0] * len(files)
    server.files = files
    server.dw = server.http_url + "/dicom-web"
    yield server
    server.stop()


def client(pacs) -> DICOMwebClient:
    return DICOMwebClient(url=pacs.dw)


def c_find(port: int, level: str, **keys) -> list[Dataset]:
    return find_status(port, level, **keys)[1]


def parts(resp: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """Our own reading of a multipart/related body (independent of the server's code)."""
    boundary = re.search(r'boundary="?([^";]+)', resp.headers["Content-Type"]).group(1)
    delim = b"--" + boundary.encode()
    body = resp.content
    assert body.startswith(delim) and body.endswith(delim + b"--\r\n")
    out = []
    for chunk in body[len(delim):].split(b"\r\n" + delim):
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append((headers, content))
    return out


def split10(data: bytes) -> tuple[str, str, bytes]:
    """(SOP Instance UID, transfer syntax, data set bytes) of a Part 10 file."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID), data[fp.tell():]


def multipart_body(files: list[bytes], boundary: str = "xyzzy-1234") -> tuple[bytes, str]:
    body = b"".join(b"\r\n--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + f for f in files) + b"\r\n--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary="{boundary}"'


STUDY_A, STUDY_B = uid(5, 1, 1, "study"), uid(5, 1, 2, "study")


# --- QIDO-RS ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params,cfind", [
    ({"PatientName": "test^patient00*"}, {"PatientName": "test^patient00*"}),
    ({"00100020": "PID5-001"}, {"PatientID": "PID5-001"}),
    ({"StudyDate": "20240101-20240131"}, {"StudyDate": "20240101-20240131"}),
    ({"ModalitiesInStudy": "MR"}, {"ModalitiesInStudy": "MR"}),
    ({"StudyInstanceUID": f"{STUDY_A},{STUDY_B}"}, {"StudyInstanceUID": [STUDY_A, STUDY_B]}),
])
def test_qido_studies_match_c_find(pacs, params, cfind):
    keys = ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber",
            "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries", "ModalitiesInStudy"]
    expected = c_find(pacs.dicom_port, "STUDY", **{**{k: "" for k in keys}, **cfind})
    got = [Dataset.from_json(d) for d in client(pacs).search_for_studies(search_filters=params)]
    assert expected and len(got) == len(expected)
    by_uid = {d.StudyInstanceUID: d for d in got}
    assert set(by_uid) == {e.StudyInstanceUID for e in expected}
    for e in expected:
        d = by_uid[e.StudyInstanceUID]
        for k in keys:
            assert str(d.get(k, "")) == str(e.get(k, "")), k
        # (dicomweb-client sends a Host header without the port: compare paths)
        assert urlparse(d.RetrieveURL).path == f"/dicom-web/studies/{e.StudyInstanceUID}"
        assert all(k in d for k in ("PatientBirthDate", "PatientSex", "StudyID"))   # 10.6.3-3


def test_qido_series_and_instances(pacs):
    dw = client(pacs)
    series = [Dataset.from_json(d) for d in dw.search_for_series(STUDY_A)]
    assert sorted((s.Modality, s.NumberOfSeriesRelatedInstances) for s in series) == [
        ("CT", 4), ("MR", 2)]
    assert all(s.StudyInstanceUID == STUDY_A and "PatientName" not in s for s in series)
    mr = next(s for s in series if s.Modality == "MR")
    expected = c_find(pacs.dicom_port, "IMAGE", StudyInstanceUID=STUDY_A,
                      SeriesInstanceUID=mr.SeriesInstanceUID, SOPInstanceUID="",
                      InstanceNumber="")
    insts = [Dataset.from_json(d) for d in dw.search_for_instances(STUDY_A, mr.SeriesInstanceUID)]
    assert sorted((i.SOPInstanceUID, i.InstanceNumber) for i in insts) == sorted(
        (e.SOPInstanceUID, e.InstanceNumber) for e in expected)
    assert all(i.Rows == 32 and i.RetrieveURL.endswith(f"/instances/{i.SOPInstanceUID}")
               for i in insts)
    # All series (with the study's attributes) and a study's instances (with the series').
    everything = [Dataset.from_json(d) for d in dw.search_for_series(
        search_filters={"Modality": "CT", "PatientID": "PID5-*"})]
    assert len(everything) == 3 and all("PatientName" in s for s in everything)
    in_study = [Dataset.from_json(d) for d in dw.search_for_instances(STUDY_A)]
    assert len(in_study) == 6 and {i.Modality for i in in_study} == {"CT", "MR"}


def test_qido_limit_offset_includefield(pacs):
    dw = client(pacs)
    everything = dw.search_for_studies(search_filters={"PatientID": "PID5-*"})
    assert len(everything) == 3
    pages = [dw.search_for_studies(search_filters={"PatientID": "PID5-*"}, limit=2, offset=o)
             for o in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 1, 0]
    assert [d["0020000D"] for p in pages for d in p] == [d["0020000D"] for d in everything]
    assert len(dw.search_for_studies(search_filters={"PatientID": "PID5-*"},
                                     get_remaining=True, limit=1)) == 3
    one = dw.search_for_studies(search_filters={"PatientID": "PID5-002"},
                                fields=["StudyDescription", "00080080"])[0]
    assert one["00081030"]["Value"] == ["CT CHEST 1"]
    assert one["00080080"]["Value"] == ["Test Hospital"]          # InstitutionName, by tag
    assert "00080080" not in dw.search_for_studies(search_filters={"PatientID": "PID5-002"})[0]
    full = requests.get(pacs.dw + "/studies?PatientID=PID5-002&includefield=all", timeout=10)
    assert "00101010" in full.json()[0]                              # PatientAge: every key
    r = requests.get(pacs.dw + "/studies?PatientID=PID5-002&fuzzymatching=true", timeout=10)
    assert r.status_code == 200 and "fuzzymatching" in r.headers["Warning"]
    r = requests.get(pacs.dw + "/studies?PatientID=PID5-002&Modality=MR", timeout=10)
    assert len(r.json()) == 1 and "Modality is below the study level" in r.headers["Warning"]


@pytest.mark.parametrize("query,status", [
    ("PatientName=Nobody*", 200), ("StudyDate=2024x", 400), ("limit=-1", 400),
    ("limit=x", 400), ("NoSuchKeyword=1", 400), ("GGGG0010=1", 400)])
def test_qido_empty_and_bad_parameters(pacs, query, status):
    r = requests.get(f"{pacs.dw}/studies?{query}", timeout=10)
    assert r.status_code == status, r.text
    if status == 200:
        # No match: 200 and [] (CP-2473; it was 204 before issue 18).
        assert r.json() == [] and r.headers["Content-Type"] == "application/dicom+json"
        assert client(pacs).search_for_studies(search_filters={"PatientName": "Nobody*"}) == []
        for level in ("series", "instances", f"studies/{STUDY_A}/series?Modality=XA"):
            r = requests.get(f"{pacs.dw}/{level}{'' if '?' in level else '?Modality=XA'}",
                             timeout=10)
            assert (r.status_code, r.json()) == (200, [])


def test_qido_sop_classes_in_study(pacs):
    """SOP Classes in Study (0008,0062): the distinct SOP classes of the study's instances,
    when asked for by keyword, tag or includefield=all."""
    expected: dict[str, set[str]] = {}
    for path in pacs.files:
        ds = dcmread(path, stop_before_pixels=True)
        expected.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPClassUID)
    for asked in ("SOPClassesInStudy", "00080062", "all"):
        got = requests.get(pacs.dw + "/studies?includefield=" + asked, timeout=10).json()
        answered = {d["0020000D"]["Value"][0]: set(d["00080062"]["Value"]) for d in got}
        assert {k: v for k, v in answered.items() if k in expected} == expected, asked
    one = client(pacs).search_for_studies(search_filters={"StudyInstanceUID": STUDY_A},
                                          fields=["00080062"])
    assert one[0]["00080062"] == {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}
    # Not by default (it reads every instance row of the studies), nor at the series level.
    assert all("00080062" not in d for d in requests.get(pacs.dw + "/studies", timeout=10).json())
    series = requests.get(f"{pacs.dw}/studies/{STUDY_A}/series?includefield=00080062",
                          timeout=10).json()
    assert len(series) == 2 and all("00080062" not in s for s in series)


# --- WADO-RS ----------------------------------------------------------------------------------

def sent(pacs) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (transfer syntax, data set bytes) of every file stored."""
    out = {}
    for path in pacs.files:
        ts, data = dataset_bytes(path)
        out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = (ts, data)
    return out


def test_wado_retrieve_is_byte_identical(pacs):
    originals = sent(pacs)
    series = uid(5, 1, 1, 1, "series")
    for url, n in [(f"/studies/{STUDY_A}", 6), (f"/studies/{STUDY_A}/series/{series}", 4),
                   (f"/studies/{STUDY_A}/series/{series}/instances/"
                    f"{uid(5, 1, 1, 1, 3, 'sop')}", 1)]:
        r = requests.get(pacs.dw + url, timeout=10, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
        got = parts(r)
        assert len(got) == n
        for headers, content in got:
            sop, ts, data = split10(content)
            assert (ts, data) == originals[sop]
            assert headers["Content-Type"] == f"application/dicom; transfer-syntax={ts}"
            # Each part names its instance (PS3.18 8.7.3.5).
            assert re.fullmatch(re.escape(f"{pacs.dw}/studies/{STUDY_A}/series/") + r"[0-9.]+"
                                + re.escape(f"/instances/{sop}"), headers["Content-Location"])
    # Every sample too, whatever its transfer syntax.
    for path in pacs.files[-len(SAMPLES):]:
        ds = dcmread(path, stop_before_pixels=True)
        r = requests.get(f"{pacs.dw}/studies/{ds.StudyInstanceUID}/series/"
                         f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}", timeout=10)
        sop, ts, data = split10(parts(r)[0][1])
        assert (ts, data) == originals[sop]


def test_wado_with_dicomweb_client(pacs):
    dw = client(pacs)
    series = uid(5, 1, 1, 1, "series")
    study = dw.retrieve_study(STUDY_A)
    assert len(study) == 6 and {d.StudyInstanceUID for d in study} == {STUDY_A}
    one = dw.retrieve_series(STUDY_A, series)
    assert sorted(d.InstanceNumber for d in one) == [1, 2, 3, 4]
    original = dcmread(pacs.files[0])
    inst = dw.retrieve_instance(STUDY_A, series, original.SOPInstanceUID)
    assert inst.PixelData == original.PixelData and inst.PatientName == original.PatientName
    with pytest.raises(requests.HTTPError) as e:
        dw.retrieve_study("1.2.3.4")
    assert e.value.response.status_code == 404


def test_wado_accept_and_transfer_syntax(pacs):
    rle = dcmread(sample("SC_rgb_rle_2frame.dcm"), stop_before_pixels=True)
    url = f"{pacs.dw}/studies/{rle.StudyInstanceUID}"
    ts = str(rle.file_meta.TransferSyntaxUID)
    ok = requests.get(url, timeout=10, headers={
        "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ts}'})
    assert ok.status_code == 200 and len(parts(ok)) == 1
    refused = requests.get(url, timeout=10, headers={
        "Accept": 'multipart/related; type="application/dicom"; '
                  'transfer-syntax=1.2.840.10008.1.2.1'})
    assert refused.status_code == 406
    assert requests.get(url, timeout=10, headers={"Accept": "text/html"}).status_code == 406
    assert requests.get(pacs.dw + "/studies/1.2.x", timeout=10).status_code == 400


def test_metadata(pacs):
    dw = client(pacs)
    series = uid(5, 1, 1, 1, "series")
    meta = dw.retrieve_series_metadata(STUDY_A, series)
    assert len(meta) == 4
    for item in meta:
        # No pixels: their BulkDataURI (PS3.18 F.2.6; before issue 18 Pixel Data was left out).
        assert set(item["7FE00010"]) == {"vr", "BulkDataURI"}
        assert item["00083002"]["Value"] == ["1.2.840.10008.1.2.1"]
        ds = Dataset.from_json(item)
        assert ds.Rows == 32 and ds.SeriesInstanceUID == series and ds.WindowWidth == 400
    assert len(dw.retrieve_study_metadata(STUDY_A)) == 6
    sop = uid(5, 1, 1, 1, 2, "sop")
    assert Dataset.from_json(dw.retrieve_instance_metadata(STUDY_A, series, sop)
                             ).SOPInstanceUID == sop


def test_frames(pacs):
    dw = client(pacs)
    original = dcmread(pacs.files[0])
    frames = dw.retrieve_instance_frames(original.StudyInstanceUID, original.SeriesInstanceUID,
                                         original.SOPInstanceUID, frame_numbers=[1])
    assert frames == [original.PixelData]
    # RLE, two frames: the encapsulated frames as stored, in the order asked.
    rle = dcmread(sample("SC_rgb_rle_2frame.dcm"))
    url = (f"{pacs.dw}/studies/{rle.StudyInstanceUID}/series/{rle.SeriesInstanceUID}/"
           f"instances/{rle.SOPInstanceUID}/frames")
    r = requests.get(url + "/2,1", timeout=10)
    assert r.status_code == 200 and 'type="image/dicom-rle"' in r.headers["Content-Type"]
    expected = list(generate_frames(rle.PixelData, number_of_frames=2))
    assert [c for _, c in parts(r)] == [expected[1], expected[0]]
    assert [h["Content-Location"] for h, _ in parts(r)] == [url + "/2", url + "/1"]
    r = requests.get(url + "/1", timeout=10, headers={
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert parts(r)[0][0]["Content-Type"] == (
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.5")
    assert requests.get(url + "/1", timeout=10, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'}).status_code == 406
    assert requests.get(url + "/3", timeout=10).status_code == 404
    assert requests.get(url + "/0", timeout=10).status_code == 400
    j2k = dcmread(sample("JPEG2000.dcm"))
    r = requests.get(f"{pacs.dw}/studies/{j2k.StudyInstanceUID}/series/{j2k.SeriesInstanceUID}/"
                     f"instances/{j2k.SOPInstanceUID}/frames/1", timeout=10)
    (headers, content), = parts(r)
    assert headers["Content-Type"] == "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.91"
    assert content == next(generate_frames(j2k.PixelData, number_of_frames=1))
    # Big endian: frames come little endian (PS3.18 8.7.3.3.2).
    be = dcmread(sample("MR_small_bigendian.dcm"))
    r = requests.get(f"{pacs.dw}/studies/{be.StudyInstanceUID}/series/{be.SeriesInstanceUID}/"
                     f"instances/{be.SOPInstanceUID}/frames/1", timeout=10)
    assert parts(r)[0][1] == be.pixel_array.astype("<i2").tobytes()


def test_rendered_and_thumbnail(pacs):
    original = dcmread(pacs.files[0], stop_before_pixels=True)
    url = (f"{pacs.dw}/studies/{original.StudyInstanceUID}/series/"
           f"{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}")
    r = requests.get(url + "/rendered", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.content[:2] == b"\xff\xd8"
    r = requests.get(url + "/rendered?window=40,400&viewport=16,16", timeout=10,
                     headers={"Accept": "image/png"})
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    assert Image.open(io.BytesIO(r.content)).size == (16, 16)
    for thumb in (url + "/thumbnail", f"{pacs.dw}/studies/{STUDY_A}/thumbnail"):
        r = requests.get(thumb, timeout=10)
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    assert requests.get(url + "/rendered", timeout=10,
                        headers={"Accept": "image/gif"}).status_code == 406


# --- STOW-RS ----------------------------------------------------------------------------------

def test_stow_then_c_get_byte_identical(pacs, tmp_path):
    paths = [write(tmp_path, seed=6, patient=1, study=1, series=1, number=i, size=32)
             for i in (1, 2, 3)]
    body, ctype = multipart_body([p.read_bytes() for p in paths])
    r = requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                      timeout=30)
    assert r.status_code == 200, r.text
    resp = Dataset.from_json(r.json())
    study = uid(6, 1, 1, "study")
    assert resp.RetrieveURL == f"{pacs.dw}/studies/{study}"
    assert len(resp.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in resp
    ref = resp.ReferencedSOPSequence[0]
    assert ref.RetrieveURL.startswith(f"{pacs.dw}/studies/{study}/series/")
    status, got = c_get(pacs.dicom_port, {"QueryRetrieveLevel": "STUDY",
                                          "StudyInstanceUID": study},
                        "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assert status == 0
    expected = {str(dcmread(p).SOPInstanceUID): dataset_bytes(p) for p in paths}
    assert got == expected
    # dicomweb-client's own STOW, to the study's URL.
    ds = dcmread(write(tmp_path, seed=6, patient=1, study=1, series=2, number=1, size=32))
    out = client(pacs).store_instances([ds], study_instance_uid=study)
    assert out.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_stow_partial_failure_and_study_mismatch(pacs, tmp_path):
    good = write(tmp_path, seed=7, patient=1, study=1, series=1, number=1, size=16)
    bad = ct_slice(seed=7, patient=1, study=1, series=1, number=2, size=16)
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.03.4"   # invalid
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    body, ctype = multipart_body([good.read_bytes(), (tmp_path / "bad.dcm").read_bytes(),
                                  b"not dicom at all"])
    r = requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                      timeout=30)
    assert r.status_code == 202, r.text
    resp = Dataset.from_json(r.json())
    assert [i.ReferencedSOPInstanceUID for i in resp.ReferencedSOPSequence] == [
        str(dcmread(good).SOPInstanceUID)]
    failed = resp.FailedSOPSequence
    assert [(i.get("ReferencedSOPInstanceUID"), i.FailureReason) for i in failed] == [
        ("1.2.03.4", 0xC000), (None, 0xC000)]
    # Into another study's URL: nothing stored, 409, the reason per instance.
    other = write(tmp_path, seed=7, patient=1, study=2, series=1, number=1, size=16)
    body, ctype = multipart_body([other.read_bytes()])
    r = requests.post(f"{pacs.dw}/studies/{STUDY_A}", data=body,
                      headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 409
    assert Dataset.from_json(r.json()).FailedSOPSequence[0].FailureReason == 0xC409
    assert requests.post(pacs.dw + "/studies", data=b"x", timeout=10, headers={
        "Content-Type": "application/json"}).status_code == 415
    assert requests.post(pacs.dw + "/studies", data=b"nothing", timeout=10, headers={
        "Content-Type": ctype}).status_code == 400


# --- CORS -------------------------------------------------------------------------------------

def test_cors_preflight_and_headers(pacs):
    r = requests.options(pacs.dw + "/studies", timeout=10, headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "GET" in r.headers["Access-Control-Allow-Methods"]
    r = requests.get(pacs.dw + "/studies", timeout=10, headers={"Origin": VIEWER})
    assert r.headers["Access-Control-Allow-Origin"] == VIEWER
    r = requests.get(pacs.dw + "/studies", timeout=10, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_multipart_reader_across_read_boundaries():
    """STOW-RS bodies are read in pieces: parts, delimiters and headers may be cut anywhere."""
    from pacsd.web.multipart import MalformedBody, read_parts
    files = [bytes(range(256)) * 40, b"", b"\r\n--xyzzy-123 almost a delimiter", b"x" * 5000]
    body, _ = multipart_body(files)
    for step in (1, 7, 4096, len(body)):
        stream = io.BytesIO(body)
        got = [(h["content-type"], bytes(v)) for h, v in
               read_parts(lambda n, s=stream, k=step: s.read(min(n, k)), len(body), "xyzzy-1234")]
        assert got == [("application/dicom", f) for f in files]
    with pytest.raises(MalformedBody):
        list(read_parts(io.BytesIO(body[:-40]).read, None, "xyzzy-1234"))


def test_multipart_writer_length_is_what_it_writes():
    """WADO-RS announces Content-Length before streaming: it must be exact, big parts or small."""
    from pacsd.web.multipart import SMALL, read_parts, stream, stream_length
    contents = [b"", b"a" * 10, b"b" * (SMALL - 1), b"c" * SMALL, b"d" * (3 * SMALL + 5)]
    heads = [f"Content-Type: application/dicom; n={i}" for i in range(len(contents))]
    chunked = [(h, [c[i:i + SMALL] for i in range(0, len(c), SMALL)])
               for h, c in zip(heads, contents)]
    body = b"".join(stream(chunked, "b0und"))
    assert len(body) == stream_length(heads, map(len, contents), "b0und")
    got = [bytes(v) for _, v in read_parts(io.BytesIO(body).read, len(body), "b0und")]
    assert got == contents


def test_stow_chunked_request_body(pacs, tmp_path):
    path = write(tmp_path, seed=8, patient=1, study=1, series=1, number=1, size=256)
    body, ctype = multipart_body([path.read_bytes()])
    pieces = (body[i:i + 10000] for i in range(0, len(body), 10000))   # no Content-Length
    r = requests.post(pacs.dw + "/studies", data=pieces, headers={"Content-Type": ctype},
                      timeout=30)
    assert r.status_code == 200, r.text
    sop = str(dcmread(path).SOPInstanceUID)
    status, got = c_get(pacs.dicom_port, {"QueryRetrieveLevel": "IMAGE",
                                          "StudyInstanceUID": uid(8, 1, 1, "study"),
                                          "SeriesInstanceUID": uid(8, 1, 1, 1, "series"),
                                          "SOPInstanceUID": sop},
                        "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assert status == 0 and got == {sop: dataset_bytes(path)}


def test_the_requests_an_ohif_viewer_makes(pacs):
    """Replays the DICOMweb data source of OHIF v3 (study list, series list, series metadata,
    frames, thumbnail), from a browser origin allowed by [http] cors_origins."""
    h = {"Origin": VIEWER, "Accept": "application/dicom+json"}
    # Study list: OHIF asks for StudyDescription and ModalitiesInStudy, 101 at a time.
    r = requests.get(pacs.dw + "/studies", headers=h, timeout=10, params={
        "limit": "101", "offset": "0", "fuzzymatching": "false",
        "includefield": "00081030,00080060", "PatientName": "*Patient001*",
        "PatientID": "PID5-001"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == VIEWER
    studies = r.json()
    assert {s["0020000D"]["Value"][0] for s in studies} == {STUDY_A, STUDY_B}
    study = next(s for s in studies if s["0020000D"]["Value"][0] == STUDY_A)
    assert study["00081030"]["Value"] == ["CT CHEST 1"]
    assert sorted(study["00080061"]["Value"]) == ["CT", "MR"]
    assert study["00100010"]["vr"] == "PN" and "Alphabetic" in study["00100010"]["Value"][0]
    # Series of the study, then each series' metadata.
    series = requests.get(f"{pacs.dw}/studies/{STUDY_A}/series", headers=h, timeout=10).json()
    assert len(series) == 2
    ct = next(s for s in series if s["00080060"]["Value"] == ["CT"])
    se_uid = ct["0020000E"]["Value"][0]
    meta = requests.get(f"{pacs.dw}/studies/{STUDY_A}/series/{se_uid}/metadata", headers=h,
                        timeout=10).json()
    assert len(meta) == 4
    first = meta[0]
    for tag in ("00080018", "00280010", "00280011", "00280100", "00281050", "00200013"):
        assert tag in first, tag   # what the viewer needs to lay out and window the image
    # Pixel data, as OHIF's image loader asks for it.
    sop = first["00080018"]["Value"][0]
    r = requests.get(f"{pacs.dw}/studies/{STUDY_A}/series/{se_uid}/instances/{sop}/frames/1",
                     timeout=10, headers={"Origin": VIEWER, "Accept": "multipart/related; "
                                          "type=application/octet-stream; transfer-syntax=*"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == VIEWER
    [(headers, frame)] = parts(r)
    assert headers["Content-Type"].startswith("application/octet-stream")
    assert len(frame) == 32 * 32 * 2
    thumb = requests.get(f"{pacs.dw}/studies/{STUDY_A}/series/{se_uid}/thumbnail",
                         headers={"Origin": VIEWER, "Accept": "image/jpeg"}, timeout=10)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"


def test_empty_attributes_have_no_value(pacs, tmp_path):
    """PS3.18 F.2.5: an attribute without a value carries only its "vr", in metadata (also
    an empty sequence) and in QIDO-RS results."""
    ds = ct_slice(seed=9, patient=1, study=1, series=1, number=1, size=16)
    ds.ReferencedImageSequence = []
    ds.AdditionalPatientHistory = ""
    ds.StudyDescription = ""
    path = tmp_path / "empty.dcm"
    ds.save_as(path, enforce_file_format=True)
    body, ctype = multipart_body([path.read_bytes()])
    assert requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                         timeout=30).status_code == 200
    meta = requests.get(f"{pacs.dw}/studies/{ds.StudyInstanceUID}/series/"
                        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/metadata",
                        timeout=10).json()[0]
    assert meta["00081140"] == {"vr": "SQ"} and meta["001021B0"] == {"vr": "LT"}
    assert meta["00081030"] == {"vr": "LO"}
    study = requests.get(f"{pacs.dw}/studies?StudyInstanceUID={ds.StudyInstanceUID}"
                         "&includefield=StudyDescription", timeout=10).json()[0]
    assert study["00081030"] == {"vr": "LO"}
    assert all(v.get("Value") not in ([], [""], [None]) for v in study.values())


def test_truncated_pixel_data_is_refused_with_a_reason(pacs, tmp_path, caplog):
    """A stored file cut short inside its Pixel Data (a damaged disk, a copy cut off: ingest
    refuses such objects, the disk may still make one) renders as 422 with the reason (WADO-RS
    rendered and thumbnail, WADO-URI), one log line, not a 500; it is still retrievable as
    stored."""
    from pacsd.query.studies import instance_path
    ds = ct_slice(seed=10, patient=1, study=1, series=1, number=1, size=64)
    path = tmp_path / "short.dcm"
    ds.save_as(path, enforce_file_format=True)
    body, ctype = multipart_body([path.read_bytes()])
    assert requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                         timeout=30).status_code == 200
    stored = pacs.runtime.archive.store.path(instance_path(ds.SOPInstanceUID))
    with open(stored, "r+b") as f:
        f.truncate(stored.stat().st_size - 4096)   # half of the 64 x 64 x 16-bit frame
    inst = (f"{pacs.dw}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
            f"instances/{ds.SOPInstanceUID}")
    wado_uri = (f"{pacs.http_url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&"
                f"seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}")
    for url in (inst + "/rendered", inst + "/frames/1/rendered", inst + "/thumbnail",
                wado_uri, wado_uri + "&contentType=image/png"):
        caplog.clear()
        with caplog.at_level("DEBUG", logger="pacsd"):
            r = requests.get(url, timeout=10)
        assert r.status_code == 422, (url, r.status_code, r.text)
        assert "truncated: frame 1 needs 8192 bytes of it, 4096 are stored" in r.text
        lines = [rec for rec in caplog.records if rec.levelno >= 30]
        assert len(lines) == 1 and "truncated" in lines[0].getMessage(), lines
    r = requests.get(inst, timeout=10)
    assert r.status_code == 200 and split10(parts(r)[0][1])[0] == ds.SOPInstanceUID
    # Native YBR_FULL_422 holds two bytes a pixel, not three: not taken for a truncated one.
    # (stored here: it shares its study with other samples of the fixture's)
    body, ctype = multipart_body([sample("SC_ybr_full_422_uncompressed.dcm").read_bytes()])
    assert requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                         timeout=30).status_code == 200
    ybr = dcmread(sample("SC_ybr_full_422_uncompressed.dcm"), stop_before_pixels=True)
    r = requests.get(f"{pacs.dw}/studies/{ybr.StudyInstanceUID}/series/{ybr.SeriesInstanceUID}/"
                     f"instances/{ybr.SOPInstanceUID}/rendered", timeout=10)
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def test_bulk_data_uris_and_the_bulk_data_they_name(pacs):
    """Metadata gives Pixel Data, Waveform Data and large binary values as BulkDataURI (PS3.18
    F.2.6); dicomweb-client's retrieve_bulkdata gets their bytes, little endian, from pacsd."""
    dw = client(pacs)
    ct = dcmread(pacs.files[0])
    base = (f"{pacs.dw}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/"
            f"instances/{ct.SOPInstanceUID}")
    meta = dw.retrieve_instance_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                         ct.SOPInstanceUID)
    assert meta["7FE00010"] == {"vr": "OW", "BulkDataURI": base + "/bulkdata/7FE00010"}
    assert dw.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"]) == [ct.PixelData]
    # A waveform: WaveformData inside WaveformSequence items, by its path.
    ecg = dcmread(sample("waveform_ecg.dcm"))
    ecg_meta = dw.retrieve_instance_metadata(ecg.StudyInstanceUID, ecg.SeriesInstanceUID,
                                             ecg.SOPInstanceUID)
    items = ecg_meta["54000100"]["Value"]
    assert len(items) == len(ecg.WaveformSequence) == 2
    for i, item in enumerate(items):
        uri = item["54001010"]["BulkDataURI"]
        assert uri.endswith(f"/bulkdata/54000100/{i}/54001010") and "Value" not in item["54001010"]
        assert dw.retrieve_bulkdata(uri) == [ecg.WaveformSequence[i].WaveformData]
    # Big endian OW pixels come little endian; RLE frames come one part each, as stored.
    be = dcmread(sample("MR_small_bigendian.dcm"))
    uri = dw.retrieve_instance_metadata(be.StudyInstanceUID, be.SeriesInstanceUID,
                                        be.SOPInstanceUID)["7FE00010"]["BulkDataURI"]
    assert dw.retrieve_bulkdata(uri) == [be.pixel_array.astype("<i2").tobytes()]
    rle = dcmread(sample("SC_rgb_rle_2frame.dcm"))
    uri = dw.retrieve_instance_metadata(rle.StudyInstanceUID, rle.SeriesInstanceUID,
                                        rle.SOPInstanceUID)["7FE00010"]["BulkDataURI"]
    r = requests.get(uri, timeout=10, headers={
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert [c for _, c in parts(r)] == list(generate_frames(rle.PixelData, number_of_frames=2))
    # Large private values, at the top and inside a sequence, explicit and implicit VR: their
    # bytes read from where they lie in the file (implicit: VR UN, as the dictionary has none).
    for seed, implicit in ((12, False), (13, True)):
        ds = ct_slice(seed=seed, patient=1, study=1, series=1, number=1, size=16)
        ds.private_block(0x0009, "PACSD TEST", create=True).add_new(0x01, "OB", b"\x01\x02" * 2500)
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item.private_block(0x0009, "PACSD TEST", create=True).add_new(0x02, "OB", b"\x07" * 3000)
        ds.ReferencedImageSequence = [item]
        if implicit:
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        path = Path(pacs.files[0]).parent / f"private-{seed}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
        body, ctype = multipart_body([path.read_bytes()])
        assert requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                             timeout=30).status_code == 200
        m = dw.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                          ds.SOPInstanceUID)
        top, nested = m["00091001"], m["00081140"]["Value"][0]["00091002"]
        assert (top["vr"], nested["vr"]) == (("UN", "UN") if implicit else ("OB", "OB"))
        assert dw.retrieve_bulkdata(top["BulkDataURI"]) == [b"\x01\x02" * 2500]
        assert nested["BulkDataURI"].endswith("/bulkdata/00081140/0/00091002")
        assert dw.retrieve_bulkdata(nested["BulkDataURI"]) == [b"\x07" * 3000]
        assert m["00090010"] == {"vr": "LO", "Value": ["PACSD TEST"]}   # its creator
    # Every part says what it is; bad paths and what is not bulk data are refused.
    r = requests.get(base + "/bulkdata/7FE00010", timeout=10)
    assert parts(r)[0][0]["Content-Location"] == base + "/bulkdata/7FE00010"
    for path, status in [("00100010", 404), ("7FE0001", 400), ("00081140/x/00081150", 400),
                         ("00081140/0/00081150", 404), ("54000100/0/54001010", 404),
                         ("/".join(["54000100/0"] * 12) + "/54001010", 400)]:
        assert requests.get(f"{base}/bulkdata/{path}", timeout=10).status_code == status, path
    assert requests.get(f"{base.replace(ct.SOPInstanceUID, '1.2.3')}/bulkdata/7FE00010",
                        timeout=10).status_code == 404


# --- XML (PS3.19 Native DICOM Model) ------------------------------------------------------------

NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
XML_ACCEPT = 'multipart/related; type="application/dicom+xml"'
_NUMBERS = {"DS", "IS", "FL", "FD", "US", "SS", "UL", "SL", "UV", "SV"}


def _native(root) -> dict[str, tuple[str, list]]:
    """tag -> (VR, values) of a NativeDicomModel's top-level attributes (numbers as floats,
    person names as their components, bulk data as ("BulkData", uri))."""
    out = {}
    for attr in root.findall(NATIVE + "DicomAttribute"):
        vr = attr.get("vr")
        values: list = []
        for child in attr:
            name = child.tag.removeprefix(NATIVE)
            if name == "Value":
                text = child.text or ""
                values.append(float(text) if vr in _NUMBERS and text else text)
            elif name == "PersonName":
                values.append([(g.tag.removeprefix(NATIVE), c.tag.removeprefix(NATIVE), c.text)
                               for g in child for c in g])
            elif name == "BulkData":
                values.append(("BulkData", child.get("uri")))
            elif name == "Item":
                values.append(len(child))
        out[attr.get("tag")] = (vr, values)
    return out


def test_xml_metadata_and_search_as_dcmtk_writes_it(pacs, tmp_path):
    """application/dicom+xml (PS3.18 8.7.3.4): metadata, one NativeDicomModel part per instance,
    with what DCMTK's dcm2xml -nat writes of the same file; QIDO-RS results likewise; other
    media types 406."""
    import subprocess
    import xml.etree.ElementTree as ET
    original = pacs.files[0]
    ds = dcmread(original, stop_before_pixels=True)
    url = (f"{pacs.dw}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
           f"instances/{ds.SOPInstanceUID}")
    r = requests.get(url + "/metadata", timeout=10, headers={"Accept": XML_ACCEPT})
    assert r.status_code == 200 and 'type="application/dicom+xml"' in r.headers["Content-Type"]
    [(headers, body)] = parts(r)
    assert headers["Content-Type"].startswith("application/dicom+xml")
    assert headers["Content-Location"] == url
    ours = _native(ET.fromstring(body))
    dcmtk = subprocess.run(["/usr/bin/dcm2xml", "-nat", "+Xn", str(original)], check=True,
                           capture_output=True).stdout
    theirs = _native(ET.fromstring(dcmtk))
    compared = [t for t, (vr, _) in theirs.items() if vr not in ("OB", "OW", "UN")]
    assert len(compared) > 30
    for tag in compared:
        assert ours[tag] == theirs[tag], tag
    assert ours["7FE00010"] == ("OW", [("BulkData", url + "/bulkdata/7FE00010")])
    # Private attributes name their creator, as dcm2xml writes them.
    ecg = sample("waveform_ecg.dcm")
    e = dcmread(ecg, stop_before_pixels=True)
    r = requests.get(f"{pacs.dw}/studies/{e.StudyInstanceUID}/series/{e.SeriesInstanceUID}/"
                     f"instances/{e.SOPInstanceUID}/metadata", timeout=10,
                     headers={"Accept": XML_ACCEPT})
    ours = {a.get("tag"): a.get("privateCreator")
            for a in ET.fromstring(parts(r)[0][1]).findall(NATIVE + "DicomAttribute")}
    dcmtk = ET.fromstring(subprocess.run(["/usr/bin/dcm2xml", "-nat", "+Xn", str(ecg)],
                                         check=True, capture_output=True).stdout)
    theirs = {a.get("tag"): a.get("privateCreator")
              for a in dcmtk.findall(NATIVE + "DicomAttribute")}
    private = {t: c for t, c in theirs.items() if int(t[:4], 16) % 2}
    assert len(private) > 3 and {t: ours[t] for t in private} == private
    # Several instances: one part each.
    r = requests.get(f"{pacs.dw}/studies/{STUDY_A}/metadata", timeout=10,
                     headers={"Accept": XML_ACCEPT})
    assert len(parts(r)) == 6
    # QIDO-RS: one part per result, the same attributes as in JSON.
    q = f"{pacs.dw}/studies?PatientID=PID5-001"
    as_json = requests.get(q, timeout=10).json()
    r = requests.get(q, timeout=10, headers={"Accept": XML_ACCEPT})
    got = [_native(ET.fromstring(b)) for _, b in parts(r)]
    assert len(got) == len(as_json) == 2
    for doc, obj in zip(got, as_json):
        assert set(doc) == set(obj)
        assert doc["0020000D"] == ("UI", obj["0020000D"]["Value"])
        assert doc["00100010"][1] == [[("Alphabetic", "FamilyName", "Test"),
                                       ("Alphabetic", "GivenName", "Patient001")]]
    for target in (q, url + "/metadata"):
        r = requests.get(target, timeout=10, headers={"Accept": "text/html"})
        assert r.status_code == 406 and "application/dicom+xml" in r.text
        assert requests.get(target, timeout=10, headers={
            "Accept": "text/html, application/dicom+json"}).status_code == 200


def test_metadata_cache_follows_the_stored_file(pacs, tmp_path):
    """Each instance's metadata is built once into STORAGE/.cache/metadata; a stored file
    rewritten gets its metadata built again, and a deleted one loses its entry."""
    from pacsd.query.studies import instance_path
    ds = ct_slice(seed=11, patient=1, study=1, series=1, number=1, size=16)
    path = tmp_path / "cached.dcm"
    ds.save_as(path, enforce_file_format=True)
    body, ctype = multipart_body([path.read_bytes()])
    assert requests.post(pacs.dw + "/studies", data=body, headers={"Content-Type": ctype},
                         timeout=30).status_code == 200
    url = (f"{pacs.dw}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
           f"instances/{ds.SOPInstanceUID}/metadata")
    store = pacs.runtime.archive.store
    rel = instance_path(ds.SOPInstanceUID)
    entry = store.root / ".cache" / "metadata" / (rel + ".json")
    assert not entry.exists()
    first = requests.get(url, timeout=10).json()[0]
    assert entry.exists() and first["00081030"]["Value"] == ["CT CHEST 1"]
    assert requests.get(url, timeout=10).json()[0] == first
    # The stored file rewritten in place (a repair, a restore): the entry is not used.
    ds.StudyDescription = "CT CHEST REPAIRED"
    ds.save_as(store.path(rel), enforce_file_format=True)
    assert requests.get(url, timeout=10).json()[0]["00081030"]["Value"] == ["CT CHEST REPAIRED"]
    # Deleted with its study.
    assert requests.delete(f"{pacs.http_url}/api/studies/{ds.StudyInstanceUID}", timeout=10,
                           headers={"X-Requested-With": "pacsd"}).status_code == 200
    assert not entry.exists() and not store.path(rel).exists()

