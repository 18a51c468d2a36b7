"""pacsd driven by DCMTK's real command-line tools: echoscu, storescu, findscu, getscu, movescu,
with storescp as a C-MOVE destination and as a recorder of what storescu puts on the wire.

"Byte-identical" below means: the transfer syntax and the data set bytes after the File Meta
group are the same as what storescu sent (receivers write their own group 0002). What storescu
sends is not always the file it read (it drops DataSetTrailingPadding, re-encodes some items),
so the reference is recorded by a storescp +B that received the same files with the same
proposals.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from conftest import (dcmtk, free_port, peer_env, run_peer, serve, terminate, wait_for,
                      write_config)
from data import CHARSET_FILES, TEST_FILES, dataset_bytes, sample, write_series

pytestmark = pytest.mark.peers

LOCAL = "127.0.0.1"
AET = "PACSD"
COMPRESSED = ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm",
              "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"]
# storescu takes the SOP Instance UID from the data set, so rtplan.dcm (whose File Meta names
# another instance) is stored too. The MR_small variants and MR_small_jp2klossless share one
# SOP Instance UID: the first sent is kept, the others are answered Success as duplicates.
PYDICOM_FILES = [n for n, _ in TEST_FILES] + ["MR_small_jp2klossless.dcm"] + CHARSET_FILES


# --- helpers ----------------------------------------------------------------------------------

def run_text(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """run_peer for tools whose output holds values in any character set (findscu -v prints
    Latin-1 names as they are): undecodable bytes are replaced, not fatal."""
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=60,
                          env=peer_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}\n{output(proc)[-3000:]}")
    return proc


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def echo(port: int, called: str = AET, check: bool = True) -> subprocess.CompletedProcess:
    return run_peer([dcmtk("echoscu"), "-to", "5", "-aec", called, LOCAL, str(port)],
                    timeout=30, check=check)


def write_profile(path: Path, files: list[Path]) -> list[str]:
    """A storescu association profile proposing each file's own (SOP class, transfer syntax),
    one presentation context per pair; returns the `-xf FILE PROFILE` arguments."""
    pairs = set()
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        pairs.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    pairs_sorted = sorted(pairs)
    assert len(pairs_sorted) <= 128, "one association holds at most 128 presentation contexts"
    syntaxes = sorted({ts for _, ts in pairs_sorted})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes, 1):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for i, (cls, ts) in enumerate(pairs_sorted, 1):
        lines.append(f"PresentationContext{i} = {cls}\\TS{syntaxes.index(ts) + 1}")
    lines += ["[[Profiles]]", "[AsSent]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "AsSent"]


def storescu(port: int, files: list[Path], *options: str, aet: str = "STORESCU",
             check: bool = True) -> subprocess.CompletedProcess:
    proc = run_peer([dcmtk("storescu"), "-v", "-nh", "-aet", aet, "-aec", AET, *options,
                     LOCAL, str(port), *map(str, files)], check=check)
    if check:
        ok = output(proc).count("Received Store Response (Success)")
        assert ok == len(files), f"{ok} of {len(files)} stored:\n{output(proc)[-3000:]}"
    return proc


def store_as_sent(port: int, files: list[Path], tmp: Path) -> subprocess.CompletedProcess:
    """storescu each file in its own (SOP class, transfer syntax)."""
    return storescu(port, files, *write_profile(tmp / "profile.cfg", files))


@contextmanager
def storescp(folder: Path, aet: str = "STORESCP") -> Iterator[int]:
    """A DCMTK storescp on a free port (+B: files hold exactly the bytes received; +xa: any
    transfer syntax), ready once it answers C-ECHO; yields the port."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):   # free_port() can race with another process: pick again
        port = free_port()
        log = folder.parent / f"storescp-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [dcmtk("storescp"), "+B", "+xa", "-aet", aet, "-od", str(folder), str(port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=peer_env())

        def ready() -> bool:
            return proc.poll() is not None or echo(port, aet, check=False).returncode == 0
        try:
            wait_for(ready, 15, "storescp to answer C-ECHO")
            if proc.poll() is None:
                break
            if attempt == 2:
                raise AssertionError(f"storescp exited {proc.returncode}:\n{log.read_text()}")
        except BaseException:
            terminate(proc)
            raise
    try:
        yield port
    finally:
        terminate(proc)


def received(folder: Path) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (transfer syntax, data set bytes) of every DICOM file in folder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith((".log", ".cfg")):
            out[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(p)
    return out


def record_sent(files: list[Path], tmp: Path, *options: str) -> dict[str, tuple[str, bytes]]:
    """What storescu puts on the wire for these files and options, as a storescp +B saw it."""
    folder = tmp / "sent"
    with storescp(folder, aet="RECORDER") as port:
        run_peer([dcmtk("storescu"), "-nh", "-aec", "RECORDER", *options, LOCAL, str(port),
                  *map(str, files)])
    sent = received(folder)
    assert len(sent) == len({uid_of(f) for f in files})
    return sent


def uid_of(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True)[keyword].value)


# "Find Response: 3 (Pending)"; with -X: "Received Find Response 3 (Pending)"
_RESPONSE = re.compile(r"^I: (?:Received )?Find Response:? (\d+) \((\w+)\)")
_ELEMENT = re.compile(r"^I: \(([0-9a-f]{4}),([0-9a-f]{4})\) (\w\w) (.*?)\s+#\s*\d+,\s*\d+\s+(\w+)")


def parse_find(text: str) -> tuple[list[dict[str, str]], str]:
    """findscu -v output -> (one {keyword: value} per pending response, final status text);
    with -X the values are in the files, not in the output, and the dicts stay empty."""
    responses: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    final = ""
    for line in text.splitlines():
        m = _RESPONSE.match(line)
        if m:
            assert int(m.group(1)) == len(responses) + 1 and m.group(2) == "Pending", line
            current = {}
            responses.append(current)
            continue
        if line.startswith("I: Received Final Find Response"):
            final, current = line.split("Response", 1)[1].strip(), None
            continue
        m = _ELEMENT.match(line)
        if m and current is not None:
            raw = m.group(4)
            if raw.startswith("["):
                # -v shows a received value raw: odd-length UIDs keep their NUL padding
                value = raw[1:raw.rindex("]")].rstrip("\x00 ").lstrip()
            elif raw.startswith("(no value"):
                value = ""
            else:
                value = raw.lstrip("=")
            current[m.group(5)] = value
    return responses, final


def findscu(port: int, keys: list[str] | None = None, model: str = "-S",
            extract: Path | None = None, query_file: Path | None = None
            ) -> tuple[list[dict[str, str]], list[Dataset]]:
    """Run findscu -v; return the parsed responses and, with `extract`, the responses as written
    by findscu -X (read back with pydicom, so non-ASCII values can be checked exactly)."""
    args = [dcmtk("findscu"), "-v", model, "-aec", AET]
    for k in keys or []:
        args += ["-k", k]
    if extract is not None:
        extract.mkdir(parents=True)
        args += ["-X", "-od", str(extract)]
    args += [LOCAL, str(port)] + ([str(query_file)] if query_file else [])
    proc = run_text(args)
    responses, final = parse_find(output(proc))
    assert final == "(Success)", output(proc)[-2000:]
    datasets = [dcmread(p) for p in sorted(extract.glob("rsp*.dcm"))] if extract else []
    if extract is not None:
        assert len(datasets) == len(responses)
    return responses, datasets


def final_counts(text: str) -> dict[str, int]:
    """The sub-operation counts of the last C-GET/C-MOVE response: getscu -v prints
    "Number of Completed Suboperations : 10", movescu -d "Completed Suboperations    : 10"."""
    counts = {}
    for what in ("Remaining", "Completed", "Failed", "Warning"):
        found = re.findall(rf"{what} Suboperations\s*:\s*(\d+)", text)
        assert found, text[-3000:]
        counts[what.lower()] = int(found[-1])
    return counts


def final_status(text: str) -> int:
    """The DIMSE status of the last response in a -d dump."""
    found = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", text)
    assert found, text[-3000:]
    return int(found[-1], 16)


def by_study(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for f in files:
        out.setdefault(uid_of(f, "StudyInstanceUID"), []).append(f)
    return out


# --- the data the query tests share -----------------------------------------------------------

def corpus(tmp: Path) -> dict[str, list[Path]]:
    """Patient Test^Patient001 (PID1-001): 2 CT studies x 2 series x 5 images on 20240115;
    Test^Patient001/002 (PID2-001/002): one MR study each, 1 series x 2 images, 20240220;
    and chrFren (ISO_IR 100), chrX1 (ISO_IR 192)."""
    a = write_series(tmp / "a", seed=1, studies=2, series=2, images=5, size=64,
                     study_date="20240115")
    b = write_series(tmp / "b", seed=2, patients=2, images=2, size=64, modality="MR",
                     study_date="20240220")
    return {"a": a, "b": b, "charset": [sample("chrFren.dcm"), sample("chrX1.dcm")]}


@pytest.fixture
def loaded(make_server, tmp_path):
    server = make_server()
    data = corpus(tmp_path / "data")
    storescu(server.dicom_port, data["a"] + data["b"] + data["charset"])
    assert server.index.counts()["studies"] == 2 + 2 + 2
    return server, data


# --- 1. C-ECHO --------------------------------------------------------------------------------

def test_echoscu(server):
    proc = echo(server.dicom_port)
    assert proc.returncode == 0


# --- 2. C-STORE -------------------------------------------------------------------------------

def test_storescu_generated_series_and_pydicom_files(server, tmp_path):
    generated = write_series(tmp_path / "gen", studies=2, series=2, images=5, size=64)
    files = generated + [sample(n) for n in PYDICOM_FILES]
    store_as_sent(server.dicom_port, files, tmp_path)

    metas = [dcmread(f, stop_before_pixels=True) for f in files]
    assert server.index.counts() | {"bytes": 0} == {
        "patients": len({(m.get("PatientID", ""), m.get("IssuerOfPatientID", "")) for m in metas}),
        "studies": len({m.StudyInstanceUID for m in metas}),
        "series": len({m.SeriesInstanceUID for m in metas}),
        "instances": len({m.SOPInstanceUID for m in metas}),
        "bytes": 0}
    # 4 of the 16 pydicom files (MR_small_*) share one SOP Instance UID
    assert server.index.counts()["instances"] == 20 + 13
    assert len(list(server.cfg.storage_path.rglob("*.dcm"))) == 20 + 13


@pytest.mark.parametrize("name", COMPRESSED)
def test_storescu_compressed_file_is_kept_compressed(make_server, tmp_path, name):
    server = make_server()
    path = sample(name)
    store_as_sent(server.dicom_port, [path], tmp_path)
    assert server.index.counts()["instances"] == 1
    stored = list(server.cfg.storage_path.rglob("*.dcm"))
    assert len(stored) == 1
    original, kept = dcmread(path), dcmread(stored[0])
    assert kept.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert kept.file_meta.TransferSyntaxUID.is_compressed
    assert kept.SOPInstanceUID == original.SOPInstanceUID
    assert kept.PixelData == original.PixelData   # the encapsulated fragments, not re-encoded
    # ... and C-FIND knows it in that syntax
    responses, [ds] = findscu(server.dicom_port, [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={original.StudyInstanceUID}",
        f"SeriesInstanceUID={original.SeriesInstanceUID}",
        f"SOPInstanceUID={original.SOPInstanceUID}", "AvailableTransferSyntaxUID"],
        extract=tmp_path / "find")
    assert len(responses) == 1 and ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.AvailableTransferSyntaxUID == original.file_meta.TransferSyntaxUID


# --- 3. C-FIND --------------------------------------------------------------------------------

STUDY_KEYS = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID",
              "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"]


def test_findscu_study_level(loaded):
    server, data = loaded
    responses, _ = findscu(server.dicom_port, STUDY_KEYS)
    assert len(responses) == server.index.counts()["studies"] == 6
    for r in responses:
        assert r["QueryRetrieveLevel"] == "STUDY"
        assert r["RetrieveAETitle"] == AET

    got = {r["StudyInstanceUID"]: r for r in responses}
    for study, files in by_study(data["a"] + data["b"]).items():
        r = got[study]
        first = dcmread(files[0], stop_before_pixels=True)
        assert r["NumberOfStudyRelatedInstances"] == str(len(files))
        assert r["NumberOfStudyRelatedSeries"] == str(
            len({uid_of(f, "SeriesInstanceUID") for f in files}))
        assert r["ModalitiesInStudy"] == first.Modality
        assert r["PatientID"] == first.PatientID
        assert r["StudyDate"] == first.StudyDate
        # PS3.4 C.4.1.1.3.2: a Specific Character Set only when a value is not ASCII; the
        # query named none, so UTF-8 then.
        if str(first.PatientName).isascii():
            assert "SpecificCharacterSet" not in r
        else:
            assert r["SpecificCharacterSet"] == "ISO_IR 192"


def test_findscu_wildcard_person_name_is_case_insensitive(loaded):
    server, data = loaded
    responses, _ = findscu(server.dicom_port, [*STUDY_KEYS[:4], "PatientName=test^patient00*"])
    assert {r["StudyInstanceUID"] for r in responses} == set(by_study(data["a"] + data["b"]))
    responses, _ = findscu(server.dicom_port, [*STUDY_KEYS[:4], "PatientName=TEST^PATIENT002"])
    assert [r["PatientID"] for r in responses] == ["PID2-002"]
    assert [r["PatientName"] for r in responses] == ["Test^Patient002"]
    responses, _ = findscu(server.dicom_port, [*STUDY_KEYS[:4], "PatientName=nobody*"])
    assert responses == []


def test_findscu_date_range_and_uid_list(loaded):
    server, data = loaded
    january = set(by_study(data["a"]))
    responses, _ = findscu(server.dicom_port, [*STUDY_KEYS[:5], "StudyDate=20240101-20240131"])
    assert {r["StudyInstanceUID"] for r in responses} == january
    assert {r["StudyDate"] for r in responses} == {"20240115"}
    responses, _ = findscu(server.dicom_port, [*STUDY_KEYS[:5], "StudyDate=20240201-"])
    assert {r["StudyInstanceUID"] for r in responses} == set(by_study(data["b"]))

    wanted = [next(iter(by_study(data["a"]))), next(iter(by_study(data["b"])))]
    responses, _ = findscu(server.dicom_port,
                           ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(wanted)])
    assert sorted(r["StudyInstanceUID"] for r in responses) == sorted(wanted)


def test_findscu_series_and_image_level(loaded):
    server, data = loaded
    study, files = next(iter(by_study(data["a"]).items()))
    responses, _ = findscu(server.dicom_port, [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID",
        "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"])
    series = {uid_of(f, "SeriesInstanceUID") for f in files}
    assert {r["SeriesInstanceUID"] for r in responses} == series and len(responses) == 2
    assert {r["SeriesNumber"] for r in responses} == {"1", "2"}
    assert all(r["Modality"] == "CT" and r["NumberOfSeriesRelatedInstances"] == "5"
               for r in responses)
    assert all(r["QueryRetrieveLevel"] == "SERIES" for r in responses)

    one = sorted(series)[0]
    responses, _ = findscu(server.dicom_port, [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", f"SeriesInstanceUID={one}",
        "SOPInstanceUID", "SOPClassUID", "InstanceNumber"])
    expected = {uid_of(f) for f in files if uid_of(f, "SeriesInstanceUID") == one}
    assert {r["SOPInstanceUID"] for r in responses} == expected and len(responses) == 5
    assert sorted(int(r["InstanceNumber"]) for r in responses) == [1, 2, 3, 4, 5]
    assert {r["SOPClassUID"] for r in responses} == {"CTImageStorage"}   # dcmdump names it


def test_findscu_patient_level(loaded):
    server, data = loaded
    responses, _ = findscu(server.dicom_port, [
        "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances"], model="-P")
    assert len(responses) == server.index.counts()["patients"] == 5
    got = {r["PatientID"]: r for r in responses}
    assert got["PID1-001"]["PatientName"] == "Test^Patient001"
    assert (got["PID1-001"]["NumberOfPatientRelatedStudies"],
            got["PID1-001"]["NumberOfPatientRelatedSeries"],
            got["PID1-001"]["NumberOfPatientRelatedInstances"]) == ("2", "4", "20")
    assert (got["PID2-002"]["NumberOfPatientRelatedStudies"],
            got["PID2-002"]["NumberOfPatientRelatedInstances"]) == ("1", "2")
    assert all(r["QueryRetrieveLevel"] == "PATIENT" for r in responses)

    # Patient Root, STUDY level below one patient
    responses, _ = findscu(server.dicom_port, [
        "QueryRetrieveLevel=STUDY", "PatientID=PID1-001", "StudyInstanceUID",
        "NumberOfStudyRelatedInstances"], model="-P")
    assert {r["StudyInstanceUID"] for r in responses} == set(by_study(data["a"]))
    assert {r["NumberOfStudyRelatedInstances"] for r in responses} == {"10"}


def test_findscu_non_ascii_patients(loaded, tmp_path):
    server, _ = loaded
    fren, x1 = (dcmread(sample(n), stop_before_pixels=True) for n in ("chrFren.dcm", "chrX1.dcm"))

    # Found by a lower-case wildcard; a query naming no character set gets the name in UTF-8
    # (PS3.4 C.4.1.1.3.2: the default repertoire cannot carry it).
    _, [ds] = findscu(server.dicom_port, [*STUDY_KEYS[:4], "PatientName=buc^j*"],
                      extract=tmp_path / "fren")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Buc^Jérôme" == str(fren.PatientName)
    assert ds.PatientID == fren.PatientID
    assert ds.StudyInstanceUID == fren.StudyInstanceUID

    _, [ds] = findscu(server.dicom_port, [*STUDY_KEYS[:4], "PatientID=X1EXAMPLE"],
                      extract=tmp_path / "x1-by-id")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Wang^XiaoDong=王^小東" == str(x1.PatientName)

    # Matched on the non-ASCII name itself, the query encoded in each character set.
    for name, charset, value, patient in [
            ("fren-latin1", "ISO_IR 100", "Buc^Jérôme", fren),
            ("x1-utf8", "ISO_IR 192", "Wang^XiaoDong=王^小東", x1),
            ("x1-utf8-wildcard", "ISO_IR 192", "*=王^小東", x1)]:
        q = Dataset()
        q.SpecificCharacterSet = charset
        q.QueryRetrieveLevel = "STUDY"
        q.PatientName = value
        q.PatientID = ""
        q.StudyInstanceUID = ""
        query_file = tmp_path / f"{name}.dcm"
        q.save_as(query_file, implicit_vr=False, little_endian=True)
        _, found = findscu(server.dicom_port, extract=tmp_path / name, query_file=query_file)
        assert [(d.PatientID, str(d.PatientName)) for d in found] == [
            (patient.PatientID, str(patient.PatientName))], name
        assert [d.SpecificCharacterSet for d in found] == [charset], name   # as asked


# --- 4. C-GET ---------------------------------------------------------------------------------

def getscu(port: int, folder: Path, keys: list[str], *options: str) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-v", "-S", "-aec", AET, "+B", "-od", str(folder), *options]
    for k in keys:
        args += ["-k", k]
    proc = run_peer(args + [LOCAL, str(port)], check=False)
    return final_counts(output(proc))


def test_getscu_study_is_byte_identical(server, tmp_path):
    files = write_series(tmp_path / "gen", studies=2, series=2, images=5, size=64)
    # getscu proposes one context per storage class, [Explicit LE, Explicit BE, Implicit LE],
    # and pacsd accepts the first of its own list that is offered: Explicit VR Little Endian.
    # Sent in it (storescu -xe), the files go back out exactly as they came in.
    sent = record_sent(files, tmp_path, "-xe")
    storescu(server.dicom_port, files, "-xe")
    study, members = next(iter(by_study(files).items()))
    counts = getscu(server.dicom_port, tmp_path / "got",
                    ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    assert counts == {"remaining": 0, "completed": 10, "failed": 0, "warning": 0}
    got = received(tmp_path / "got")
    assert set(got) == {uid_of(f) for f in members}
    for uid, (ts, body) in got.items():
        assert ts == ExplicitVRLittleEndian
        assert (ts, body) == sent[uid], uid


def test_getscu_converts_to_a_syntax_it_accepts(server, tmp_path):
    files = write_series(tmp_path / "gen", images=3, size=64)
    storescu(server.dicom_port, files, "-xi")   # kept in Implicit VR Little Endian
    study = uid_of(files[0], "StudyInstanceUID")
    # getscu +xi proposes Explicit VR Little Endian only (despite its name, in DCMTK 3.6.7)
    counts = getscu(server.dicom_port, tmp_path / "got",
                    ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], "+xi")
    assert counts == {"remaining": 0, "completed": 3, "failed": 0, "warning": 0}
    got = {str(d.SOPInstanceUID): d for d in map(dcmread, (tmp_path / "got").iterdir())}
    assert set(got) == {uid_of(f) for f in files}
    for f in files:
        original = dcmread(f)
        copy = got[str(original.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert Dataset(copy) == Dataset(original)   # same elements and values


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"])
def test_getscu_of_compressed_file_it_does_not_accept(make_server, tmp_path, name):
    """getscu (DCMTK 3.6.7) has no -xf profile: it proposes one context per storage class, its
    preferred syntax first (+xr: RLE) and the uncompressed ones after it, and pacsd (pynetdicom)
    picks the first of its own list that is offered, Explicit VR Little Endian. So an RLE file
    comes back decoded (here: getscu proposes only uncompressed syntaxes), as the same
    instance with the same pixels."""
    server = make_server()
    path = sample(name)
    store_as_sent(server.dicom_port, [path], tmp_path)
    original = dcmread(path)
    counts = getscu(server.dicom_port, tmp_path / "got",
                    ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={original.StudyInstanceUID}"])
    assert counts == {"remaining": 0, "completed": 1, "failed": 0, "warning": 0}
    [got] = list((tmp_path / "got").iterdir())
    copy = dcmread(got)
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert not copy.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(copy.pixel_array, original.pixel_array)
    assert copy.PatientName == original.PatientName and copy.Rows == original.Rows


# --- 5. C-MOVE --------------------------------------------------------------------------------

def movescu(port: int, destination: str, keys: list[str]) -> subprocess.CompletedProcess:
    # -d: only the debug dump shows the sub-operation counts of each C-MOVE response
    args = [dcmtk("movescu"), "-d", "-S", "-aec", AET, "-aem", destination]
    for k in keys:
        args += ["-k", k]
    return run_peer(args + [LOCAL, str(port)], check=False)


def test_movescu_to_storescp_is_byte_identical(make_server, tmp_path):
    generated = write_series(tmp_path / "gen", studies=2, series=2, images=5, size=64)
    compressed = [sample(n) for n in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm",
                                      "JPEG2000.dcm")]
    files = generated + compressed
    profile = write_profile(tmp_path / "profile.cfg", files)
    dest = tmp_path / "dest"
    with storescp(dest) as port:
        # The destination itself records what storescu sends; then it is emptied.
        run_peer([dcmtk("storescu"), "-nh", "-aec", "STORESCP", *profile, LOCAL, str(port),
                  *map(str, files)])
        sent = received(dest)
        assert len(sent) == len(files)
        for p in dest.iterdir():
            p.unlink()

        server = make_server(nodes=[{"name": "store", "aet": "STORESCP", "host": LOCAL,
                                     "port": port}])
        storescu(server.dicom_port, files, *profile)

        studies = by_study(files)
        # one generated study, the study of the two SC files, the JPEG 2000 file's study
        wanted = [uid_of(f, "StudyInstanceUID") for f in (generated[0], *compressed[1:])]
        expected = {uid_of(f) for s in wanted for f in studies[s]}
        proc = movescu(server.dicom_port, "STORESCP",
                       ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(wanted)])
        assert proc.returncode == 0, output(proc)[-3000:]
        assert final_status(output(proc)) == 0x0000
        assert final_counts(output(proc)) == {"remaining": 0, "completed": len(expected),
                                              "failed": 0, "warning": 0}
        got = received(dest)
    assert set(got) == expected and len(expected) == 10 + 3
    for uid, item in got.items():
        assert item == sent[uid], uid
    assert {got[uid_of(f)][0] for f in compressed} == {
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.91"}


def test_movescu_to_unknown_destination_is_refused(make_server, tmp_path):
    server = make_server(nodes=[{"name": "store", "aet": "STORESCP", "host": LOCAL,
                                 "port": free_port()}])
    files = write_series(tmp_path / "gen", images=2, size=64)
    storescu(server.dicom_port, files)
    proc = movescu(server.dicom_port, "NOBODY", [
        "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid_of(files[0], 'StudyInstanceUID')}"])
    assert "Refused: MoveDestinationUnknown" in output(proc), output(proc)[-3000:]
    assert final_status(output(proc)) == 0xA801
    assert proc.returncode != 0


# --- 6. calling AE titles ---------------------------------------------------------------------

def test_storescu_calling_aet_must_be_allowed(make_server, tmp_path):
    server = make_server(dicom={"allowed_calling_aets": ["MODALITY1"]})
    files = write_series(tmp_path / "gen", images=3, size=64)

    proc = storescu(server.dicom_port, files, aet="INTRUDER", check=False)
    assert proc.returncode != 0
    assert "Association Rejected" in output(proc), output(proc)[-3000:]
    assert "Received Store Response" not in output(proc)
    assert server.index.counts()["instances"] == 0
    assert list(server.cfg.storage_path.rglob("*.dcm")) == []
    assert echo(server.dicom_port, check=False).returncode != 0   # ECHOSCU is not allowed either

    storescu(server.dicom_port, files, aet="MODALITY1")
    assert server.index.counts()["instances"] == 3


# --- 7. `pacsd serve` as a real process -------------------------------------------------------

def test_pacsd_serve_process_with_dcmtk(tmp_path):
    data = tmp_path / "data"
    config = write_config(tmp_path / "pacsd.toml", data, dicom={"aet": AET})
    files = write_series(tmp_path / "gen", studies=2, images=3, size=64)
    with serve(config, data) as proc:
        assert echo(proc.port).returncode == 0
        storescu(proc.port, files)
        responses, _ = findscu(proc.port, STUDY_KEYS)
        assert sorted(r["StudyInstanceUID"] for r in responses) == sorted(by_study(files))
        assert {r["NumberOfStudyRelatedInstances"] for r in responses} == {"3"}
        assert proc.stop() == 0, proc.output()


def test_a_client_that_leaves_nagle_on_is_not_held_by_delayed_acks(server):
    """DCMTK without TCP_NODELAY=1 (Debian's default) writes a PDU's header and its PDV in two
    writes; the second waits for our ACK of the first, which a kernel delays by 40 ms unless
    pacsd acknowledges at once (TCP_QUICKACK, pacsd.dimse.limits). 20 C-ECHOs on one
    association: well under a second with quick ACKs, at least 0.8 s without."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    args = [dcmtk("echoscu"), "-aec", "PACSD", "--repeat", "20", "127.0.0.1",
            str(server.dicom_port)]
    subprocess.run(args, check=True, env=env, timeout=60)   # warm: dictionaries in the cache
    began = time.monotonic()
    subprocess.run(args, check=True, env=env, timeout=60)
    took = time.monotonic() - began
    assert took < 0.6, f"20 C-ECHOs took {took:.2f} s"
