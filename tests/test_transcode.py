"""Transcoding on send: a destination that does not accept the stored transfer syntax gets the
image decoded (and re-encoded where asked), same SOP Instance UID, same pixels; a node's
[[nodes]] transfer_syntaxes steers what is proposed and sent; every path (C-MOVE, C-GET,
remote.send) with real peers (pynetdicom SCP/SCU, DCMTK storescp)."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    LOCAL,
    associate,
    dcmtk,
    free_port,
    peer_env,
    run_peer,
    store_files,
    terminate,
    wait_for,
    write_config,
)
from data import sample, uid
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsd import config as config_mod
from pacsd import query
from pacsd.nodes import remote
from pacsd.config import ConfigError

MOVE, GET = StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet
CLASSES = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)

# pydicom's test files: name -> the syntax it is stored in, and for the lossless ones an
# uncompressed (or other lossless) file holding the same pixels.
CORPUS = {
    "CT_small.dcm": (ExplicitVRLittleEndian, None),
    "JPEG2000.dcm": (JPEG2000, None),
    "MR_small_jp2klossless.dcm": (JPEG2000Lossless, "MR_small.dcm"),
    "MR_small_RLE.dcm": (RLELossless, "MR_small.dcm"),
    "MR_small_jpeg_ls_lossless.dcm": (JPEGLSLossless, "MR_small.dcm"),
    "SC_rgb_jpeg_gdcm.dcm": (JPEGLosslessSV1, "SC_rgb_rle.dcm"),
    "SC_rgb_rle_2frame.dcm": (RLELossless, None),
    "SC_rgb_jpeg_dcmtk.dcm": (JPEGBaseline8Bit, None),   # lossy, YBR_FULL
    "JPEG-lossy.dcm": (JPEGExtended12Bit, None),         # lossy, 12 bits (pacsd.imaging.jpeg12)
}


class Study:
    def __init__(self, uid_: str, files: dict[str, Path]) -> None:
        self.uid, self.files = uid_, files          # SOP Instance UID -> file

    def expected(self, sop: str) -> np.ndarray:
        return dcmread(self.files[sop]).pixel_array


def _copy(src: Path, dest: Path, study: str, n: int, pixel_data: bytes | None = None) -> str:
    """`src` with new study / series / instance UIDs (pixel data untouched unless given)."""
    ds = dcmread(src)
    ds.PatientID, ds.PatientName = f"TX-{study[-6:]}", "TRANSCODE^TEST"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = uid(study, "series", ds.SOPClassUID)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(study, n)
    if pixel_data is not None:
        ds.PixelData = pixel_data
    ds.save_as(dest, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Study:
    folder = tmp_path_factory.mktemp("corpus")
    study = uid("transcode", "study")
    files = {}
    for n, (name, (ts, _)) in enumerate(CORPUS.items()):
        path = folder / f"{n}.dcm"
        files[_copy(sample(name), path, study, n)] = path
        assert dcmread(path).file_meta.TransferSyntaxUID == ts
    return Study(study, files)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[Study, str]:
    """A study of three: CT (Explicit VR LE), MR (RLE) and an RLE MR whose header announces three
    segments where a 16-bit image has two: no decoder can make anything of it."""
    folder = tmp_path_factory.mktemp("damaged")
    study = uid("transcode", "damaged")
    files = {}
    for n, name in enumerate(("CT_small.dcm", "MR_small_RLE.dcm")):
        files[_copy(sample(name), folder / f"{n}.dcm", study, n)] = folder / f"{n}.dcm"
    rle = dcmread(sample("MR_small_RLE.dcm"))
    frame = bytearray(next(generate_frames(rle.PixelData, number_of_frames=1)))
    frame[0:4] = (3).to_bytes(4, "little")
    bad = _copy(sample("MR_small_RLE.dcm"), folder / "bad.dcm", study, 9,
                pixel_data=encapsulate([bytes(frame)]))
    files[bad] = folder / "bad.dcm"
    return Study(study, files), bad


class Scp:
    """A pynetdicom Storage SCP accepting only `syntaxes`; keeps (syntax, data set) per image."""

    def __init__(self, syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> None:
        self.received: dict[str, tuple[str, Dataset]] = {}
        self.ae = AE(ae_title="SCP")
        for cls in CLASSES:
            self.ae.add_supported_context(cls, list(syntaxes))
        self.server = self.ae.start_server((LOCAL, 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.server_address[1]

    def on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp():
    peers: list[Scp] = []

    def start(*syntaxes) -> Scp:
        peers.append(Scp(*syntaxes))
        return peers[-1]
    yield start
    for p in peers:
        p.close()


def move(port: int, destination: str, study: str) -> Dataset:
    """The final C-MOVE response's status, with its identifier (if any) as `.identifier`."""
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", study
    with associate(port, [build_context(MOVE)]) as assoc:
        status, identifier = list(assoc.send_c_move(q, destination, MOVE))[-1]
    status.identifier = identifier
    return status


def summaries(caplog, label: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pacsd.nodes.remote" and r.getMessage().startswith(label + ": sent ")]


def check_pixels(study: Study, received: dict[str, tuple[str, Dataset]]) -> None:
    """Same instances, same pixels: lossless ones identical to the uncompressed original, lossy
    ones to what pydicom decodes from the stored file."""
    assert set(received) == set(study.files)
    for sop, (ts, ds) in received.items():
        stored = dcmread(study.files[sop])
        assert ds.SOPInstanceUID == stored.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, stored.pixel_array), sop
        reference = CORPUS.get(_name(stored), (None, None))[1]
        if reference is not None:
            assert np.array_equal(ds.pixel_array, dcmread(sample(reference)).pixel_array)


def _name(ds: Dataset) -> str:
    """Which CORPUS entry a stored copy came from (the instance number in its UID)."""
    n = next(i for i, _ in enumerate(CORPUS) if uid(ds.StudyInstanceUID, i) == ds.SOPInstanceUID)
    return list(CORPUS)[n]


def test_move_decodes_for_a_destination_that_takes_only_uncompressed(make_server, scp, corpus,
                                                                     caplog):
    caplog.set_level(logging.INFO, logger="pacsd")
    dest = scp()
    server = make_server(nodes=[{"name": "plain", "aet": "PLAIN", "host": LOCAL,
                                 "port": dest.port}])
    assert store_files(server.dicom_port, list(corpus.files.values())) == [0] * len(CORPUS)
    final = move(server.dicom_port, "PLAIN", corpus.uid)
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (9, 0)
    check_pixels(corpus, dest.received)
    got = {ts for ts, _ in dest.received.values()}
    assert got == {ExplicitVRLittleEndian}, got
    # One line for the whole association, not one per image.
    lines = wait_for(lambda: summaries(caplog, "C-MOVE to PLAIN from PYNETDICOM"), 5,
                     "the C-MOVE summary line")
    assert len(lines) == 1
    assert re.fullmatch(r"sent 1 as stored, 8 transcoded \((.+)\), 0 failed",
                        lines[0].split(": ", 1)[1])
    for pair in ("JPEG 2000 -> Explicit VR LE: 1", "RLE Lossless -> Explicit VR LE: 2",
                 "JPEG Baseline -> Explicit VR LE: 1", "JPEG Extended -> Explicit VR LE: 1"):
        assert pair in lines[0]


def test_get_sends_what_the_requestor_accepted(make_server, corpus, caplog):
    """C-GET: the requestor proposed Explicit and Implicit VR LE for CT and MR, Implicit only for
    Secondary Capture: each image arrives in the best of what was accepted for its class."""
    caplog.set_level(logging.INFO, logger="pacsd")
    server = make_server()
    assert store_files(server.dicom_port, list(corpus.files.values())) == [0] * len(CORPUS)
    received: dict[str, tuple[str, Dataset]] = {}

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received[str(ds.SOPInstanceUID)] = (str(event.context.transfer_syntax), ds)
        return 0x0000

    contexts, roles = [build_context(GET)], []
    for cls in CLASSES:
        syntaxes = ([ImplicitVRLittleEndian] if cls == SecondaryCaptureImageStorage
                    else [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        contexts += [build_context(cls, [ts]) for ts in syntaxes]
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = cls, False, True
        roles.append(role)
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", corpus.uid
    with associate(server.dicom_port, contexts, ext_neg=roles,
                   evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        final = list(assoc.send_c_get(q, GET))[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 9
    check_pixels(corpus, received)
    for ts, ds in received.values():
        want = (ImplicitVRLittleEndian if ds.SOPClassUID == SecondaryCaptureImageStorage
                else ExplicitVRLittleEndian)
        assert ts == want, (ds.SOPClassUID.name, ts)
    lines = wait_for(lambda: summaries(caplog, "C-GET from PYNETDICOM"), 5, "C-GET summary")
    # CT_small goes as stored; the three Secondary Captures and the lossy JPEG to Implicit.
    assert lines[0].endswith(", 0 failed") and "sent 1 as stored, 8 transcoded" in lines[0]
    assert "JPEG Baseline -> Implicit VR LE: 1" in lines[0]


def test_a_node_preferring_implicit_gets_implicit_even_for_explicit_files(make_server, scp,
                                                                          corpus, caplog):
    caplog.set_level(logging.INFO, logger="pacsd")
    dest = scp()   # would accept Explicit VR LE too
    server = make_server(nodes=[{"name": "old", "aet": "OLDBOX", "host": LOCAL,
                                 "port": dest.port, "transfer_syntaxes": ["1.2.840.10008.1.2"]}])
    assert store_files(server.dicom_port, list(corpus.files.values())) == [0] * len(CORPUS)
    final = move(server.dicom_port, "OLDBOX", corpus.uid)
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 9)
    check_pixels(corpus, dest.received)
    assert {ts for ts, _ in dest.received.values()} == {ImplicitVRLittleEndian}
    lines = wait_for(lambda: summaries(caplog, "C-MOVE to OLDBOX from PYNETDICOM"), 5,
                     "summary")
    assert "sent 0 as stored, 9 transcoded" in lines[0]
    assert "Explicit VR LE -> Implicit VR LE: 1" in lines[0]


def test_move_to_dcmtk_storescp_with_default_options(make_server, corpus, tmp_path):
    storescp = dcmtk("storescp")
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    with open(tmp_path / "storescp.log", "wb") as log:
        proc = subprocess.Popen([storescp, "-aet", "STORESCP", "-od", str(out), str(port)],
                                env=peer_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "storescp.log").read_text()
            ae = AE(ae_title="PROBE")
            ae.add_requested_context(Verification)
            assoc = ae.associate(LOCAL, port, ae_title="STORESCP")
            ok = assoc.is_established
            if ok:
                assoc.release()
            ae.shutdown()
            return ok
        wait_for(answers, 10, "storescp to listen", interval=0.1)
        server = make_server(nodes=[{"aet": "STORESCP", "host": LOCAL, "port": port}])
        assert store_files(server.dicom_port, list(corpus.files.values())) == [0] * len(CORPUS)
        # DCMTK on both ends: movescu asks, storescp receives what pacsd transcoded for it.
        run_peer([dcmtk("movescu"), "-S", "-aec", "PACSD", "-aem", "STORESCP",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={corpus.uid}",
                  LOCAL, str(server.dicom_port)])
        wait_for(lambda: len(list(out.iterdir())) == len(CORPUS), 10, "all files at storescp")
    finally:
        terminate(proc)
    received = {}
    for f in out.iterdir():
        ds = dcmread(f)
        received[str(ds.SOPInstanceUID)] = (str(ds.file_meta.TransferSyntaxUID), ds)
    check_pixels(corpus, received)
    # storescp accepts only uncompressed syntaxes by default and prefers Explicit VR LE.
    assert {ts for ts, _ in received.values()} == {ExplicitVRLittleEndian}


def test_send_to_a_node_that_wants_rle(make_server, scp, corpus, caplog):
    """remote.send (the web page's and routing's path), to a node listing RLE Lossless first:
    what is stored in a syntax it accepted goes as it is, everything else is decoded and
    RLE-encoded by pydicom."""
    caplog.set_level(logging.INFO, logger="pacsd")
    dest = scp([RLELossless, ExplicitVRLittleEndian])
    server = make_server(nodes=[{"name": "rle", "aet": "RLEBOX", "host": LOCAL,
                                 "port": dest.port,
                                 "transfer_syntaxes": ["RLELossless", "ExplicitVRLittleEndian"]}])
    assert store_files(server.dicom_port, list(corpus.files.values())) == [0] * len(CORPUS)
    node = server.cfg.nodes[0]
    assert node.transfer_syntaxes == (RLELossless, ExplicitVRLittleEndian)
    with server.index.reading():
        insts = query.instances(query.Request("STUDY", {"StudyInstanceUID": corpus.uid}))
    assert remote.send(server.cfg, node, insts, server.runtime.archive.store) == (9, 0)
    check_pixels(corpus, dest.received)
    # CT_small is stored in Explicit VR LE, which the node accepted too: sent as it is.
    assert {ds.SOPClassUID: ts for ts, ds in dest.received.values()
            if ts != RLELossless} == {CTImageStorage: ExplicitVRLittleEndian}
    lines = wait_for(lambda: summaries(caplog, "send to rle (RLEBOX)"), 5, "summary")
    assert "sent 3 as stored, 6 transcoded" in lines[0] and lines[0].endswith(", 0 failed")
    assert "JPEG Baseline -> RLE Lossless: 1" in lines[0]


def test_an_image_that_cannot_be_decoded_fails_and_the_rest_arrive(make_server, scp, damaged,
                                                                    caplog):
    caplog.set_level(logging.INFO, logger="pacsd")
    study, bad = damaged
    dest = scp()
    server = make_server(nodes=[{"aet": "PLAIN", "host": LOCAL, "port": dest.port}])
    assert store_files(server.dicom_port, list(study.files.values())) == [0, 0, 0]
    final = move(server.dicom_port, "PLAIN", study.uid)
    # PS3.4 C.4.2.1.5: some sub-operations failed -> Warning B000, the failed UID listed.
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert final.identifier.FailedSOPInstanceUIDList == bad   # C.4.2.1.4.1
    assert set(dest.received) == set(study.files) - {bad}
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "pacsd.nodes.remote"]
    assert any(bad in w and "RLE Lossless -> Explicit VR LE" in w for w in warnings), warnings
    lines = wait_for(lambda: summaries(caplog, "C-MOVE to PLAIN from PYNETDICOM"), 5, "summary")
    assert lines == [("C-MOVE to PLAIN from PYNETDICOM: sent 1 as stored, 1 transcoded "
                      "(RLE Lossless -> Explicit VR LE), 1 failed")]


def test_a_syntax_we_cannot_make_is_a_failure_not_a_drop(make_server, scp, corpus, caplog):
    """A node taking only JPEG Baseline: the image stored so goes as it is; pacsd never encodes
    to a lossy syntax, so the other eight are failed sub-operations, each with a warning."""
    caplog.set_level(logging.INFO, logger="pacsd")
    dest = scp([JPEGBaseline8Bit])
    server = make_server(nodes=[{"aet": "LOSSY", "host": LOCAL, "port": dest.port,
                                 "transfer_syntaxes": [JPEGBaseline8Bit]}])
    assert store_files(server.dicom_port, list(corpus.files.values())) == [0] * len(CORPUS)
    final = move(server.dicom_port, "LOSSY", corpus.uid)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 8)
    assert {ts for ts, _ in dest.received.values()} == {JPEGBaseline8Bit}
    not_sent = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "pacsd.nodes.remote" and "not sent" in r.getMessage()]
    assert len(not_sent) == 8
    lines = wait_for(lambda: summaries(caplog, "C-MOVE to LOSSY from PYNETDICOM"), 5, "summary")
    assert lines[0].endswith("sent 1 as stored, 0 transcoded, 8 failed")


def test_transfer_syntaxes_in_the_config(tmp_path):
    def load(syntaxes):
        path = write_config(tmp_path / "c.toml", tmp_path / "data",
                            nodes=[{"name": "viewer", "aet": "V", "host": LOCAL, "port": 104,
                                    "transfer_syntaxes": syntaxes}])
        return config_mod.load(path, env={}).nodes[0]
    node = load(["JPEGLSLossless", "1.2.840.10008.1.2.1", "ImplicitVRLittleEndian"])
    assert node.transfer_syntaxes == (JPEGLSLossless, ExplicitVRLittleEndian,
                                      ImplicitVRLittleEndian)
    assert load([]).transfer_syntaxes == ()
    for bad in (["1.2.3.4"], ["CTImageStorage"], "1.2.840.10008.1.2"):
        with pytest.raises(ConfigError, match="viewer"):
            load(bad)
