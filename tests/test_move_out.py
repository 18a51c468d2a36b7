"""What pacsd does as the SCU when it sends, against DCMTK peers: a C-MOVE to a destination that
is unknown (0xA801), down or refusing every context (0xA702 with the counts and the reason); the
stored bytes sent unchanged to a peer that takes the stored syntax, converted for one that does
not; Explicit VR Big Endian files converted losslessly (C-MOVE, C-GET, WADO-URI)."""

from __future__ import annotations

import io
import logging
import re
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage)
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove, Verification)

from conftest import (LOCAL, associate, dcmtk, free_port, peer_env, run_peer, store_files,
                      terminate, wait_for)
from data import dataset_bytes, sample, uid, write_series

MOVE = StudyRootQueryRetrieveInformationModelMove
UNCOMPRESSED = {"LittleOnly": ["LittleEndianExplicit", "LittleEndianImplicit"],
                "ExplicitOnly": ["LittleEndianExplicit"]}


def profile(path: Path, syntaxes: list[str] | None) -> list[str]:
    """A storescp association profile taking CT and MR Image Storage in `syntaxes` only
    (None: Verification only, no storage at all); the `-xf FILE PROFILE` arguments."""
    lines = ["[[TransferSyntaxes]]", "[Plain]"]
    lines += [f"TransferSyntax{n} = {ts}" for n, ts in enumerate(syntaxes or
                                                                   ["LittleEndianImplicit"], 1)]
    lines += ["[[PresentationContexts]]", "[Contexts]",
              "PresentationContext1 = VerificationSOPClass\\Plain"]
    if syntaxes is not None:
        lines += ["PresentationContext2 = CTImageStorage\\Plain",
                  "PresentationContext3 = MRImageStorage\\Plain"]
    lines += ["[[Profiles]]", "[Test]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "Test"]


def answers_echo(port: int, aet: str) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCAL, port, ae_title=aet)
    ok = assoc.is_established
    if ok:
        assoc.release()
    ae.shutdown()
    return ok


@contextmanager
def storescp(folder: Path, *options: str, aet: str = "STORESCP") -> Iterator[int]:
    """DCMTK storescp (+B: the bytes received, as they are) with `options`; yields its port."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder.parent / f"storescp-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([dcmtk("storescp"), "+B", *options, "-aet", aet, "-od",
                                 str(folder), str(port)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=peer_env())
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return answers_echo(port, aet)
        wait_for(ready, 15, "storescp to answer C-ECHO", interval=0.1)
        yield port
    finally:
        terminate(proc)


def movescu(port: int, destination: str, study: str) -> str:
    proc = run_peer([dcmtk("movescu"), "-d", "-S", "-aec", "PACSD", "-aem", destination,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                     LOCAL, str(port)], check=False)
    return proc.stdout + proc.stderr


def final(text: str) -> dict[str, object]:
    """The last C-MOVE response movescu -d dumped: status, counts, Error Comment."""
    out: dict[str, object] = {}
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", text)
    assert statuses, text[-3000:]
    out["status"] = int(statuses[-1], 16)
    for what in ("Remaining", "Completed", "Failed", "Warning"):
        found = re.findall(rf"{what} Suboperations\s*:\s*(\d+|none)", text)
        out[what.lower()] = (int(found[-1]) if found and found[-1] != "none" else None)
    comment = re.findall(r"\(0000,0902\) LO \[([^\]]*)\]", text)
    out["comment"] = comment[-1] if comment else None
    return out


def received(folder: Path) -> dict[str, tuple[str, bytes]]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
            for p in sorted(folder.iterdir()) if p.is_file()}


def copy_as(src: Path, dest: Path, tag: str, n: int, *, implicit: bool = False,
            big_endian: bool = False) -> Path:
    """`src` as a new instance (own study, series and instance UIDs), written in Implicit VR LE
    or Explicit VR Big Endian (pydicom writes big endian as it reads it: words swapped)."""
    ds = dcmread(src)
    ds.PatientID, ds.PatientName = f"OUT-{tag}", "MOVE^OUT"
    ds.StudyInstanceUID = uid(tag, "study")
    ds.SeriesInstanceUID = uid(tag, "series", n)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(tag, "sop", n)
    if big_endian:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian   # the source is BE already
    elif implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(dest, enforce_file_format=True)
    return dest


def study_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def pixels_of(body: bytes, ts: str, like: Path) -> np.ndarray:
    """The pixel array of a received data set (no File Meta), decoded in `ts`."""
    from pydicom.filereader import read_dataset
    uid_ = ExplicitVRLittleEndian if ts == ExplicitVRLittleEndian else ImplicitVRLittleEndian
    ds = read_dataset(io.BytesIO(body), is_implicit_VR=uid_ == ImplicitVRLittleEndian,
                      is_little_endian=True)
    ds.file_meta = dcmread(like, stop_before_pixels=True).file_meta
    ds.file_meta.TransferSyntaxUID = uid_
    return ds.pixel_array


# --- 4. 0xA801 only for an unknown AE title ----------------------------------------------------

def test_unknown_down_and_refusing_destinations(make_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pacsd")
    files = write_series(tmp_path / "in", seed=41, images=3, size=16)
    study = study_of(files[0])
    with socket.socket() as closed:   # a port known to be closed: bound, never listening
        closed.bind((LOCAL, 0))
        down = closed.getsockname()[1]
        with storescp(tmp_path / "none", *profile(tmp_path / "none.cfg", None),
                      aet="NOSTORE") as refusing:
            server = make_server(nodes=[
                {"name": "down", "aet": "DOWN", "host": LOCAL, "port": down},
                {"name": "refusing", "aet": "NOSTORE", "host": LOCAL, "port": refusing}])
            assert store_files(server.dicom_port, files) == [0] * 3

            # An AE title no node has: Move Destination unknown.
            assert final(movescu(server.dicom_port, "NOBODY", study))["status"] == 0xA801

            # A known node whose port is closed: A702, every sub-operation failed, the reason.
            got = final(movescu(server.dicom_port, "DOWN", study))
            assert got == {"status": 0xA702, "remaining": None, "completed": 0, "failed": 3,
                           "warning": 0, "comment": "destination refused the connection"}, got

            # A known node that answers but accepts none of the contexts proposed.
            got = final(movescu(server.dicom_port, "NOSTORE", study))
            assert (got["status"], got["completed"], got["failed"]) == (0xA702, 0, 3), got
            assert got["comment"] == "destination accepted no presentation context"
            assert not list((tmp_path / "none").iterdir())

    lines = [r.getMessage() for r in caplog.records if r.name == "pacsd.dimse.retrieve"
             and r.levelno == logging.WARNING]
    assert [line for line in lines if "NOBODY" in line and "0xA801" in line]
    down_lines = [line for line in lines if "(DOWN@" in line]
    assert down_lines == [f"C-MOVE from MOVESCU to down (DOWN@{LOCAL}:{down}): none of 3 "
                          "instance(s) sent (0xA702): the connection was refused (nothing "
                          "listens on that port, or the host is unreachable)"], lines
    refusing_lines = [line for line in lines if "(NOSTORE@" in line]
    assert len(refusing_lines) == 1 and "accepted none of the presentation contexts proposed " \
        "(CT Image Storage" in refusing_lines[0], lines


def test_failed_list_and_pynetdicom_destination_with_no_storage(make_server, tmp_path):
    """A pynetdicom listener that supports Verification only: the final response carries the
    Failed SOP Instance UID List (PS3.4 C.4.2.1.4.2) and the counts."""
    ae = AE(ae_title="ECHOONLY")
    ae.add_supported_context(Verification)
    listener = ae.start_server((LOCAL, 0), block=False)
    try:
        server = make_server(nodes=[{"aet": "ECHOONLY", "host": LOCAL,
                                     "port": listener.server_address[1]}])
        files = write_series(tmp_path / "in", seed=42, images=4, size=16)
        assert store_files(server.dicom_port, files) == [0] * 4
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", study_of(files[0])
        with associate(server.dicom_port, [build_context(MOVE)]) as assoc:
            responses = list(assoc.send_c_move(q, "ECHOONLY", MOVE))
        status, identifier = responses[-1]
        assert len(responses) == 1   # no Pending: nothing was attempted
        assert status.Status == 0xA702
        assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations,
                status.NumberOfWarningSuboperations) == (0, 4, 0)
        assert status.ErrorComment == "destination accepted no presentation context"
        assert sorted(identifier.FailedSOPInstanceUIDList) == sorted(map(sop_of, files))
    finally:
        listener.shutdown()


# --- 6. stored bytes out unchanged --------------------------------------------------------------

def test_implicit_goes_out_as_stored_or_converted(make_server, tmp_path):
    implicit = copy_as(sample("MR_small.dcm"), tmp_path / "implicit.dcm", "implicit", 1,
                       implicit=True)
    explicit = copy_as(sample("CT_small.dcm"), tmp_path / "explicit.dcm", "implicit", 2)
    assert dcmread(explicit).StudyInstanceUID == dcmread(implicit).StudyInstanceUID
    study = study_of(implicit)
    with storescp(tmp_path / "default") as default_port, \
            storescp(tmp_path / "explicit", *profile(tmp_path / "e.cfg",
                                                     UNCOMPRESSED["ExplicitOnly"]),
                     aet="EXPLICIT") as explicit_port:
        server = make_server(nodes=[
            {"aet": "STORESCP", "host": LOCAL, "port": default_port},
            {"aet": "EXPLICIT", "host": LOCAL, "port": explicit_port}])
        assert store_files(server.dicom_port, [implicit, explicit]) == [0, 0]
        # storescp's defaults accept Explicit and Implicit VR: each file goes as it is stored.
        got = final(movescu(server.dicom_port, "STORESCP", study))
        assert (got["status"], got["completed"]) == (0, 2), got
        sent = received(tmp_path / "default")
        assert sent[sop_of(implicit)] == dataset_bytes(implicit)
        assert sent[sop_of(explicit)] == dataset_bytes(explicit)
        # A peer taking Explicit VR only: the Implicit file converted, same pixels.
        got = final(movescu(server.dicom_port, "EXPLICIT", study))
        assert (got["status"], got["completed"]) == (0, 2), got
        sent = received(tmp_path / "explicit")
        ts, body = sent[sop_of(implicit)]
        assert ts == ExplicitVRLittleEndian
        assert np.array_equal(pixels_of(body, ts, implicit), dcmread(implicit).pixel_array)
        assert sent[sop_of(explicit)] == dataset_bytes(explicit)


# --- 5. Explicit VR Big Endian ------------------------------------------------------------------

def test_big_endian_converted_for_move_get_and_wado(make_server, tmp_path):
    big = copy_as(sample("MR_small_bigendian.dcm"), tmp_path / "big.dcm", "big", 1,
                  big_endian=True)
    rgb = copy_as(sample("SC_rgb_small_odd_big_endian.dcm"), tmp_path / "rgb.dcm", "big", 2,
                  big_endian=True)   # 8-bit pixels encoded OW: byte pairs swapped
    files = {sop_of(big): big, sop_of(rgb): rgb}
    expected = {sop: dcmread(f).pixel_array for sop, f in files.items()}
    study = study_of(big)
    with storescp(tmp_path / "little", *profile(tmp_path / "l.cfg", UNCOMPRESSED["LittleOnly"]),
                  aet="LITTLE") as port:
        server = make_server(nodes=[{"aet": "LITTLE", "host": LOCAL, "port": port}])
        # (the RGB one is Secondary Capture, which LITTLE does not take: stored, not moved)
        assert store_files(server.dicom_port, [big, rgb]) == [0, 0]
        got = final(movescu(server.dicom_port, "LITTLE", study))
        assert got["status"] == 0xB000 and (got["completed"], got["failed"]) == (1, 1), got
        [(ts, body)] = received(tmp_path / "little").values()
    assert ts == ExplicitVRLittleEndian
    assert np.array_equal(pixels_of(body, ts, big), expected[sop_of(big)])

    # C-GET with getscu: it proposes Explicit VR LE first, and pacsd accepts that.
    (tmp_path / "get").mkdir()
    proc = run_peer([dcmtk("getscu"), "-v", "-S", "-aec", "PACSD", "-od",
                     str(tmp_path / "get"), "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study}", LOCAL, str(server.dicom_port)],
                    check=False)
    assert "Number of Completed Suboperations : 2" in proc.stdout + proc.stderr, proc.stderr
    for path in (tmp_path / "get").iterdir():
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(ds.pixel_array, expected[str(ds.SOPInstanceUID)])

    # WADO-URI, transferSyntax=Explicit VR Little Endian.
    for sop, path in files.items():
        ds = dcmread(path, stop_before_pixels=True)
        r = requests.get(server.http_url + "/wado", timeout=30, params={
            "requestType": "WADO", "studyUID": study, "seriesUID": ds.SeriesInstanceUID,
            "objectUID": sop, "contentType": "application/dicom",
            "transferSyntax": ExplicitVRLittleEndian})
        assert r.status_code == 200, r.text
        got_ds = dcmread(io.BytesIO(r.content))
        assert got_ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(got_ds.pixel_array, expected[sop])
        assert got_ds.SOPClassUID in (MRImageStorage, ds.SOPClassUID)


def test_contexts_stored_syntax_first_within_128():
    """Each stored (class, syntax) in a context of its own plus a conversion context with the
    plain syntaxes not yet offered; past 128, a conversion context per class first (Explicit and
    Implicit both), then the stored syntaxes' own contexts, most instances first."""
    from pacsd.nodes import remote
    from pacsd.query import StoredInstance

    def inst(n: int, cls: str, ts: str) -> StoredInstance:
        return StoredInstance(f"1.2.3.{n}", cls, ts, f"{n}.dcm")
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    jpeg = "1.2.840.10008.1.2.4.50"
    cxs = remote.move_contexts([inst(1, ct, ImplicitVRLittleEndian),
                                inst(2, ct, ExplicitVRLittleEndian),
                                inst(3, mr, ImplicitVRLittleEndian), inst(4, mr, jpeg)])
    got = sorted((str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax))) for cx in cxs)
    assert got == sorted([(ct, (ImplicitVRLittleEndian,)), (ct, (ExplicitVRLittleEndian,)),
                          (mr, (ImplicitVRLittleEndian,)), (mr, (jpeg,)),
                          (mr, (ExplicitVRLittleEndian,))])
    # 100 classes, each stored in two syntaxes, one of them by more instances.
    many = []
    for c in range(100):
        cls = f"1.2.840.10008.5.1.4.1.1.{1000 + c}"
        many += [inst(c * 10 + k, cls, ImplicitVRLittleEndian) for k in range(1 + (c == 7) * 5)]
        many.append(inst(c * 10 + 9, cls, jpeg))
    cxs = remote.move_contexts(many)
    assert len(cxs) == remote.MAX_CONTEXTS
    plain = [cx for cx in cxs if len(cx.transfer_syntax) == 2]
    assert len(plain) == 100 and len({cx.abstract_syntax for cx in plain}) == 100
    own = [cx for cx in cxs if len(cx.transfer_syntax) == 1]
    assert own[0].abstract_syntax == "1.2.840.10008.5.1.4.1.1.1007"   # the most instances
    assert own[0].transfer_syntax == [ImplicitVRLittleEndian]


def test_rle_of_an_odd_sized_image_does_not_kill_the_process(tmp_path):
    """GDCM's RLE encoder aborts the process (an uncaught C++ exception) on an image of an odd
    number of bytes; transcode uses pydicom's. Run apart: on failure only that process dies."""
    import sys
    script = ("import sys, numpy as np; from pydicom import dcmread; "
              "from pydicom.uid import RLELossless; from pacsd.imaging import transcode; "
              "out = transcode.transcode(sys.argv[1], RLELossless); "
              "assert out.file_meta.TransferSyntaxUID == RLELossless; "
              "assert np.array_equal(out.pixel_array, dcmread(sys.argv[1]).pixel_array); "
              "print('same pixels')")
    proc = subprocess.run([sys.executable, "-c", script, str(sample("SC_rgb_small_odd.dcm"))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "same pixels" in proc.stdout, proc.stderr[-2000:]
