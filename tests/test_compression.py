"""Lossless compression at rest (pacsd.storage.compression): stored uncompressed CT images are
re-encoded as JPEG-LS Lossless, pixel for pixel the same (decoded again by pydicom/GDCM and by
DCMTK's dcmdjpls), sent as stored to a peer that takes JPEG-LS and decoded for one that does
not; a `pacsd compress` killed at random moments leaves each image in one version, whole."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
from pathlib import Path

import numpy
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless

from conftest import c_get, dcmtk, pacsd_cmd, run_peer, store_files, write_config
from data import write_series
from reliability.storm import kill_command_midway, start


def stored(data: Path) -> dict[str, tuple[str, Path]]:
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT sop_instance_uid, transfer_syntax_uid, path FROM instance")
        return {sop: (ts, data / "storage" / path) for sop, ts, path in rows}
    finally:
        db.close()


def originals(files: list[Path]) -> dict[str, numpy.ndarray]:
    return {str(dcmread(f).SOPInstanceUID): dcmread(f).pixel_array for f in files}


def test_compressed_images_are_the_same_pixels_and_go_out_as_each_peer_takes_them(
        make_server, tmp_path):
    files = write_series(tmp_path / "in", seed=51, images=4, size=128)
    server = make_server(compression=[{"name": "all"}])
    server.compressor.stop()   # driven by hand below, not by its timer
    assert store_files(server.dicom_port, files) == [0] * 4
    pixels = originals(files)
    before = {sop: path.stat().st_size for sop, (_, path) in stored(server.cfg.data).items()}
    out = subprocess.run(pacsd_cmd("compress", "--config", str(server.cfg.source)),
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and "compressed 4 image(s)" in out.stdout, out.stdout + out.stderr
    now = stored(server.cfg.data)
    assert {ts for ts, _ in now.values()} == {str(JPEGLSLossless)}
    for sop, (_, path) in now.items():
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert numpy.array_equal(ds.pixel_array, pixels[sop]), sop
        assert path.stat().st_size < before[sop]
        # An independent decoder: DCMTK's dcmdjpls gives back the same pixels.
        plain = path.with_suffix(".plain.dcm")
        run_peer([dcmtk("dcmdjpls"), str(path), str(plain)])
        assert numpy.array_equal(dcmread(plain).pixel_array, pixels[sop])
        plain.unlink()
    assert server.index.counts()["instances"] == 4
    assert not list((server.cfg.storage_path / ".trash").rglob("*.dcm"))   # nothing kept
    # Out: as stored to a peer that takes JPEG-LS, decoded for one that takes only Explicit LE.
    study = str(dcmread(files[0]).StudyInstanceUID)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    status, got = c_get(server.dicom_port, keys, CTImageStorage, JPEGLSLossless)
    assert status == 0 and {ts for ts, _ in got.values()} == {str(JPEGLSLossless)}
    status, got = c_get(server.dicom_port, keys, CTImageStorage, ExplicitVRLittleEndian)
    assert status == 0 and len(got) == 4
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    for sop, (_, body) in got.items():
        ds = read_dataset(DicomBytesIO(body), is_implicit_VR=False, is_little_endian=True)
        ds.file_meta = dcmread(files[0]).file_meta
        assert numpy.array_equal(ds.pixel_array, pixels[sop])
    # Nothing left to do: a second run compresses nothing.
    out = subprocess.run(pacsd_cmd("compress", "--config", str(server.cfg.source)),
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "compressed 0 image(s)" in out.stdout


@pytest.mark.timeout(240)
def test_kills_in_the_middle_of_compression_leave_each_image_whole(tmp_path):
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data, compression=[{"name": "all"}])
    log = tmp_path / "serve.log"
    pixels: dict[str, numpy.ndarray] = {}
    rnd = random.Random(52)
    kills = 0
    proc = start(config, data, log)
    try:
        for round_ in range(3):   # each round: new uncompressed images, then a killed pass
            files = write_series(tmp_path / f"in{round_}", seed=52 + round_, images=20,
                                 size=128)
            pixels |= originals(files)
            assert store_files(proc.port, files) == [0] * 20
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(30) == 0
            killed = kill_command_midway(["compress", "--config", str(config)], data,
                                         rnd.uniform(0.05, 0.4))
            proc = start(config, data, log)   # settles what the killed command left
            now = stored(data)
            assert set(now) == set(pixels), f"round {round_}: instances lost"
            for sop, (ts, path) in now.items():
                ds = dcmread(path)
                assert str(ds.file_meta.TransferSyntaxUID) == ts, sop
                assert numpy.array_equal(ds.pixel_array, pixels[sop]), sop
            live = {p for p in (data / "storage").rglob("*.dcm")
                    if not {".trash", ".tmp"} & set(p.relative_to(data / "storage").parts)}
            assert live == {path for _, path in now.values()}, "files no row names"
            kills += killed
        assert kills, "no pass was killed at its work: the test tested nothing"
    finally:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGTERM)
            proc.proc.wait(30)
