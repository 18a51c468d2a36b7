"""WADO-RS frames decoded on request: compressed frames asked for as application/octet-stream
with transfer-syntax=1.2.840.10008.1.2.1 come back as native little endian pixels (what the
built-in viewer reads); `*` or no octet-stream keeps the stored bitstream."""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests
from pydicom import dcmread
from pydicom.encaps import generate_frames

from conftest import store_files, write_config
from data import sample

NATIVE = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'
ANY = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

# (sample, what it exercises)
SAMPLES = [
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless, 16-bit signed"),
    ("JPEG2000.dcm", "JPEG 2000, 16-bit signed"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless, 16-bit signed"),
    ("MR_small_RLE.dcm", "RLE, 16-bit signed"),
    ("JPGExtended.dcm", "JPEG extended, 12-bit unsigned"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline, YBR_FULL -> RGB"),
    ("SC_rgb_rle_2frame.dcm", "RLE, RGB, two frames"),
    ("CT_small.dcm", "uncompressed (unchanged path)"),
]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("frames")
    server = Server(config.load(write_config(tmp / "c.toml", tmp / "data"), env={})).start()
    files = [sample(name) for name, _ in SAMPLES]
    assert store_files(server.dicom_port, files) == [0] * len(files)
    yield server
    server.stop()


def frames_url(pacs, ds, numbers: str) -> str:
    return (f"{pacs.http_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/{numbers}")


def parts(resp: requests.Response) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of each part of a multipart/related answer."""
    boundary = re.search(r'boundary="?([^";]+)', resp.headers["Content-Type"]).group(1)
    delim = b"--" + boundary.encode()
    out = []
    for chunk in resp.content[len(delim):].split(b"\r\n" + delim):
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        ctype = next(line.split(": ", 1)[1] for line in head.decode().split("\r\n")
                     if line.lower().startswith("content-type:"))
        out.append((ctype, body))
    return out


def expected(ds, index: int) -> np.ndarray:
    """pydicom's own decoding of one frame, in the dtype the header says, little endian."""
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        arr = arr[index]
    kind = "i" if ds.PixelRepresentation == 1 and ds.SamplesPerPixel == 1 else "u"
    return arr.astype(f"<{kind}{ds.BitsAllocated // 8}")


@pytest.mark.parametrize("name", [n for n, _ in SAMPLES])
def test_decoded_frames_equal_pydicom(pacs, name):
    ds = dcmread(sample(name))
    n_frames = int(ds.get("NumberOfFrames") or 1)
    numbers = ",".join(str(n) for n in range(n_frames, 0, -1))   # in the order asked
    r = requests.get(frames_url(pacs, ds, numbers), headers={"Accept": NATIVE}, timeout=30)
    assert r.status_code == 200, r.text
    assert 'type="application/octet-stream"' in r.headers["Content-Type"]
    got = parts(r)
    assert len(got) == n_frames
    for (ctype, body), n in zip(got, range(n_frames, 0, -1)):
        assert ctype == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
        want = expected(ds, n - 1)
        assert len(body) == want.nbytes
        assert body == want.tobytes(), f"frame {n} of {name} differs"


def test_bitstream_unless_native_asked(pacs):
    ds = dcmread(sample("MR_small_jpeg_ls_lossless.dcm"))
    url = frames_url(pacs, ds, "1")
    stored = next(generate_frames(ds.PixelData, number_of_frames=1))
    # transfer-syntax=*: the stored JPEG-LS bitstream, labelled as such.
    (ctype, body), = parts(requests.get(url, headers={"Accept": ANY}, timeout=10))
    assert ctype == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.80"
    assert body == stored
    # No Accept: the frame's own media type, as stored.
    (ctype, body), = parts(requests.get(url, timeout=10))
    assert ctype.startswith("image/jls") and body == stored
    # octet-stream without a transfer syntax: the stored one is not octet-stream: 406.
    r = requests.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'},
                     timeout=10)
    assert r.status_code == 406
    # Implicit VR LE is not offered: 406 rather than a silent substitute.
    r = requests.get(url, timeout=10, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2'})
    assert r.status_code == 406
    # A frame that does not exist: 404, before any body.
    r = requests.get(frames_url(pacs, ds, "2"), headers={"Accept": NATIVE}, timeout=10)
    assert r.status_code == 404


def test_decode_frame_function():
    from pacsd.imaging.render import decode_frame
    arr = decode_frame(sample("SC_rgb_rle_2frame.dcm"), 2)
    assert arr.shape == (100, 100, 3) and arr.dtype == np.uint8
    arr = decode_frame(sample("MR_small_RLE.dcm"))
    assert arr.shape == (64, 64) and arr.dtype == np.dtype("<i2")
