"""Decompression and pixel bombs against a real `pacsd serve` (issue 16, class 2), and the
memory STOW-RS needs per part (class 7).

- A deflate bomb: a valid Deflated Explicit VR Little Endian data set (PS3.5 A.5) of ~10 MB
  that inflates to ~10 GB (an image with trailing padding, a "PDF" whose document is the bomb).
  Over C-STORE and STOW-RS it is refused (0xC422, Cannot understand) with one log line,
  without the server inflating it: its memory stays where it was.
- Pixel bombs: an RLE object of a few bytes declaring 10000 frames of 65535 x 65535, the same
  uncompressed, one declaring 100 frames and carrying one, a JPEG whose own bitstream says
  32768 x 32768 where the header says 64 x 64. Refused at ingest (C-STORE from pynetdicom and
  DCMTK, STOW-RS); stored before the limits existed (or a deflate bomb planted in the storage
  folder and indexed by `pacsd reindex`), they are never decoded (render, thumbnail, frames,
  transcoding on C-GET): 422 and one log line.
- Several bombs at once, C-STORE, STOW-RS and renders together: the server's peak RSS stays
  under a documented ceiling while a normal C-ECHO, C-STORE and /testdbalive answer promptly.
- STOW-RS of a 200 MB part costs about that much memory, not twice.
"""

from __future__ import annotations

import io
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import build_context
from pynetdicom.sop_class import Verification

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from conftest import (  # noqa: E402
    LOCAL,
    associate,
    c_get,
    dcmtk,
    pacsd_cmd,
    run_peer,
    serve,
    wait_for,
    write_config,
)
from data import ct_slice, uid  # noqa: E402
from pacsd.imaging.header import file_meta_bytes  # noqa: E402
from report import PeakMemory, record  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GB = 1 << 30
MB = 1 << 20
# The documented ceiling: the server's RSS while bombs arrive and are rendered stays within
# this much of its RSS before (measured here: +62 MB with eight bombs and eight renders at once,
# mostly the bombs' own bytes in flight; without the fix, one deflate bomb alone needs 10 GB).
BOMB_RSS_HEADROOM_MB = 150
PROMPT_S = 5.0   # a normal request answered within this while bombs go on
# Limits that let every bomb in, as a server had them before [dicom] max_* existed.
LOOSE = {"max_inflated_mb": 2**20, "max_frame_pixels": 65535 * 65535, "max_pixel_mb": 2**40}


# --- crafting ---------------------------------------------------------------------------------

def _encode(ds: Dataset) -> bytes:
    """A data set in Explicit VR Little Endian, no File Meta group."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _element(group: int, elem: int, vr: bytes, length: int) -> bytes:
    """The header of an explicit VR element with a 32-bit length (OB, UN...)."""
    return struct.pack("<HH2sHI", group, elem, vr, 0, length)


def _header(n: int, sop_class: str, **image) -> Dataset:
    """Identifying attributes (+ the Image Pixel Module if `image` is given) of bomb `n`."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(160, n, "sop")
    ds.StudyInstanceUID = uid(160, n, "study")
    ds.SeriesInstanceUID = uid(160, n, "series")
    ds.PatientID = f"BOMB{n}"
    ds.PatientName = "Bomb^Test"
    ds.Modality = "OT"
    if image:
        ds.Rows, ds.Columns = image["rows"], image["columns"]
        if image.get("frames"):
            ds.NumberOfFrames = image["frames"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        bits = image.get("bits", 8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = 0
    return ds


class Deflater:
    """A raw deflate stream (PS3.5 A.5) with runs of zeros made cheaply: a 16 MiB block of
    zeros is compressed once after a full flush, and repeated (a full flush resets the
    compressor, so the same bytes are valid wherever they stand)."""

    BLOCK = 16 * MB

    def __init__(self) -> None:
        self.c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.parts: list[bytes] = []
        self.block = b""

    def add(self, data: bytes) -> None:
        self.parts.append(self.c.compress(data))

    def zeros(self, n: int) -> None:
        if not self.block:
            self.parts.append(self.c.flush(zlib.Z_FULL_FLUSH))
            self.block = self.c.compress(bytes(self.BLOCK)) + self.c.flush(zlib.Z_FULL_FLUSH)
        full, rest = divmod(n, self.BLOCK)
        self.parts.append(self.block * full)
        self.parts.append(self.c.compress(bytes(rest)))

    def done(self) -> bytes:
        self.parts.append(self.c.flush())
        return b"".join(self.parts)


def part10(ds: Dataset, dataset: bytes, ts: str) -> bytes:
    return file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts) + dataset


def deflate_bomb_image(n: int, inflated: int = 10 * GB) -> bytes:
    """A 4 x 4 image, then Data Set Trailing Padding... of `inflated` zero bytes (in elements
    of under 4 GiB, the longest a defined length allows)."""
    ds = _header(n, SecondaryCaptureImageStorage, rows=4, columns=4)
    z = Deflater()
    z.add(_encode(ds) + _element(0x7FE0, 0x0010, b"OB", 16) + bytes(16))
    k = 0
    while inflated > 0:   # private elements in the last odd group, then the padding
        size = min(inflated, 0xFFFFFFF0)
        tag = (0xFFFC, 0xFFFC) if inflated == size else (0x7FE1, 0x1000 + k)
        if k == 0 and inflated != size:
            z.add(struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 10) + b"PACSD BOMB")
        z.add(_element(*tag, b"OB", size))
        z.zeros(size)
        inflated -= size
        k += 1
    return part10(ds, z.done(), DeflatedExplicitVRLittleEndian)


def deflate_bomb_document(n: int, inflated: int = 4 * GB - 32) -> bytes:
    """An Encapsulated PDF whose document (before any Pixel Data: a "header" only) is
    `inflated` zero bytes."""
    ds = _header(n, EncapsulatedPDFStorage)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    z = Deflater()
    z.add(_encode(ds) + _element(0x0042, 0x0011, b"OB", inflated))
    z.zeros(inflated)
    return part10(ds, z.done(), DeflatedExplicitVRLittleEndian)


def _encapsulated(frame: bytes) -> bytes:
    """Pixel Data of undefined length: an empty Basic Offset Table, one fragment (PS3.5 A.4)."""
    frame += b"\x00" * (len(frame) % 2)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    return (_element(0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) + item
            + struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def rle_bomb(n: int) -> bytes:
    """RLE Lossless, 10000 frames of 65535 x 65535 x 16 bits declared (80 TB), 80 bytes sent."""
    ds = _header(n, SecondaryCaptureImageStorage, rows=65535, columns=65535, frames=10000,
                 bits=16)
    # RLE header (PS3.5 G.5): one segment at offset 64; a replicate run of 128 zeros.
    frame = struct.pack("<16I", 1, 64, *[0] * 14) + b"\x81\x00"
    return part10(ds, _encode(ds) + _encapsulated(frame), RLELossless)


def native_bomb(n: int) -> bytes:
    """Explicit VR LE declaring 1000 frames of 65535 x 65535, carrying 16 bytes."""
    ds = _header(n, SecondaryCaptureImageStorage, rows=65535, columns=65535, frames=1000)
    return part10(ds, _encode(ds) + _element(0x7FE0, 0x0010, b"OB", 16) + bytes(16),
                  ExplicitVRLittleEndian)


def native_short(n: int) -> bytes:
    """Explicit VR LE declaring 100 frames of 512 x 512, carrying one (within the budget)."""
    ds = _header(n, SecondaryCaptureImageStorage, rows=512, columns=512, frames=100)
    size = 512 * 512
    return part10(ds, _encode(ds) + _element(0x7FE0, 0x0010, b"OB", size) + bytes(size),
                  ExplicitVRLittleEndian)


def jpeg_bomb(n: int) -> bytes:
    """JPEG Baseline whose header says 64 x 64 (within any budget) and whose own bitstream
    (SOF0) says 32768 x 32768: the decoder would allocate the bitstream's size."""
    ds = _header(n, SecondaryCaptureImageStorage, rows=64, columns=64)
    out = io.BytesIO()
    Image.new("L", (64, 64), 0).save(out, "JPEG", quality=50)
    jpeg = bytearray(out.getvalue())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 32768, 32768)
    return part10(ds, _encode(ds) + _encapsulated(bytes(jpeg)), JPEGBaseline8Bit)


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


# --- clients ----------------------------------------------------------------------------------

def c_store_raw(port: int, path: Path, sop_class: str, ts: str) -> int:
    """C-STORE a Part 10 file's data set bytes as they are (pynetdicom, chunked: it never
    decodes them), proposing its own (class, syntax); the response status."""
    from pynetdicom import _config
    _config.STORE_SEND_CHUNKED_DATASET = True
    with associate(port, [build_context(sop_class, [ts])], aet="BOMBER") as assoc:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if rsp else -1


def storescu(port: int, path: Path, sop_class: str, ts: str, tmp: Path) -> str:
    """DCMTK storescu, with a profile proposing the file's own (class, syntax) (PEERS.md)."""
    profile = tmp / "profile.cfg"
    profile.write_text("\n".join([
        "[[TransferSyntaxes]]", "[TS1]", f"TransferSyntax1 = {ts}",
        "[[PresentationContexts]]", "[Contexts]", f"PresentationContext1 = {sop_class}\\TS1",
        "[[Profiles]]", "[AsSent]", "PresentationContexts = Contexts"]) + "\n")
    proc = run_peer([dcmtk("storescu"), "-v", "-nh", "-aet", "STORESCU", "-aec", "PACSD",
                     "-xf", str(profile), "AsSent", LOCAL, str(port), str(path)],
                    check=False, timeout=120)
    return proc.stdout + proc.stderr


def stow(http_url: str, files: list[bytes]) -> requests.Response:
    boundary = "pacsd-bomb-0123"
    body = b"".join(b"\r\n--" + boundary.encode()
                    + b"\r\nContent-Type: application/dicom\r\n\r\n" + f for f in files)
    body += b"\r\n--" + boundary.encode() + b"--\r\n"
    return requests.post(http_url + "/dicom-web/studies", data=body, timeout=300, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def failures(r: requests.Response) -> list[tuple[str, int]]:
    ds = Dataset.from_json(r.json())
    return [(str(i.get("ReferencedSOPInstanceUID", "")), int(i.FailureReason))
            for i in ds.get("FailedSOPSequence", [])]


def stored_count(http_url: str) -> int:
    r = requests.get(http_url + "/dicom-web/instances", timeout=30)
    return 0 if r.status_code == 204 else len(r.json())


def echo(port: int) -> int:
    with associate(port, [build_context(Verification)], aet="BYSTANDER") as assoc:
        return int(assoc.send_c_echo().Status)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def real_image(tmp: Path, number: int) -> Path:
    ds = ct_slice(seed=161, patient=1, study=1, series=1, number=number, size=256)
    path = tmp / f"real{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def log_lines(proc, text: str) -> list[str]:
    return [line for line in proc.log.read_text().splitlines() if text in line]


# --- the attacks ------------------------------------------------------------------------------

def test_deflate_bombs_are_refused_without_being_inflated(tmp_path):
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data)
    bombs = tmp_path / "bombs"
    image = write(bombs, "image.dcm", deflate_bomb_image(1))
    document = write(bombs, "document.dcm", deflate_bomb_document(2))
    assert image.stat().st_size < 16 * MB and document.stat().st_size < 8 * MB
    with serve(cfg, data) as proc:
        before = rss_mb(proc.proc.pid)
        with PeakMemory(proc.proc.pid) as peak:
            assert c_store_raw(proc.port, image, SecondaryCaptureImageStorage,
                               DeflatedExplicitVRLittleEndian) == 0xC422
            assert c_store_raw(proc.port, document, EncapsulatedPDFStorage,
                               DeflatedExplicitVRLittleEndian) == 0xC422
            r = stow(proc.http_url, [image.read_bytes(), document.read_bytes()])
            assert r.status_code == 409, r.text
            assert failures(r) == [(uid(160, 1, "sop"), 0xC422), (uid(160, 2, "sop"), 0xC422)]
        assert peak.mb - before < BOMB_RSS_HEADROOM_MB, (before, peak.mb)
        assert stored_count(proc.http_url) == 0
        # One plain line per refusal.
        assert len(log_lines(proc, "refused with 0xC422: the deflated data set inflates to "
                                   "more than")) == 2, proc.output()
        assert len(log_lines(proc, "STOW-RS: instance ")) == 2, proc.output()
        # A real deflated data set still goes in both ways, and renders.
        ct = ct_slice(seed=161, patient=2, study=1, series=1, number=1, size=64)
        ct.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ct.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
        assert c_store_raw(proc.port, tmp_path / "deflated.dcm", CTImageStorage,
                           DeflatedExplicitVRLittleEndian) == 0
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = uid(161, 2, "other")
        ct.save_as(tmp_path / "deflated2.dcm", enforce_file_format=True)
        assert stow(proc.http_url, [(tmp_path / "deflated2.dcm").read_bytes()]).status_code == 200
        r = requests.get(f"{proc.http_url}/dicom-web/studies/{ct.StudyInstanceUID}/series/"
                         f"{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/rendered",
                         timeout=30)
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def test_pixel_bombs_are_refused_at_ingest(tmp_path):
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data)
    bombs = tmp_path / "bombs"
    rle, native, short = (write(bombs, f"{name}.dcm", make(n)) for n, (name, make) in
                          enumerate((("rle", rle_bomb), ("native", native_bomb),
                                     ("short", native_short)), 10))
    with serve(cfg, data) as proc:
        assert c_store_raw(proc.port, rle, SecondaryCaptureImageStorage, RLELossless) == 0xC422
        assert c_store_raw(proc.port, native, SecondaryCaptureImageStorage,
                           ExplicitVRLittleEndian) == 0xC422
        # Within the budget, but declaring 100 frames and carrying one: cannot understand.
        assert c_store_raw(proc.port, short, SecondaryCaptureImageStorage,
                           ExplicitVRLittleEndian) == 0xC000
        out = storescu(proc.port, rle, SecondaryCaptureImageStorage, RLELossless, tmp_path)
        assert "Received Store Response (Error: CannotUnderstand)" in out, out[-3000:]
        r = stow(proc.http_url, [rle.read_bytes(), native.read_bytes(), short.read_bytes()])
        assert r.status_code == 409, r.text
        assert [code for _, code in failures(r)] == [0xC422, 0xC422, 0xC000]
        assert stored_count(proc.http_url) == 0
        lines = log_lines(proc, "refused")
        assert sum("65535 x 65535" in line and "max_frame_pixels" in line for line in lines) == 5
        assert sum("declares 100 frame(s)" in line and "carries" in line
                   for line in lines) == 2, proc.output()


@pytest.fixture
def bombed(tmp_path):
    """A data folder holding bombs stored before the limits existed (loose settings), and the
    config of the same server with the default limits."""
    data = tmp_path / "pacsd"
    loose = write_config(tmp_path / "loose.toml", data, dicom=LOOSE)
    bombs = tmp_path / "bombs"
    files = {"rle": write(bombs, "rle.dcm", rle_bomb(20)),
             "jpeg": write(bombs, "jpeg.dcm", jpeg_bomb(21))}
    with serve(loose, data, log_name="loose.log") as proc:
        assert c_store_raw(proc.port, files["rle"], SecondaryCaptureImageStorage,
                           RLELossless) == 0
        assert stow(proc.http_url, [files["jpeg"].read_bytes()]).status_code == 200
    # A deflate bomb no setting lets in (an image inflates to no more than its header and
    # pixels need): planted in the storage folder, found by `pacsd reindex`.
    files["deflated"] = write(data / "storage" / "planted", "bomb.dcm", deflate_bomb_image(22))
    cfg = write_config(tmp_path / "pacsd.toml", data)
    run_peer(pacsd_cmd("reindex", "--config", str(cfg)), timeout=120)
    return data, cfg, files


def _urls(http_url: str, n: int) -> list[str]:
    study, series, sop = uid(160, n, "study"), uid(160, n, "series"), uid(160, n, "sop")
    inst = f"{http_url}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    return [(f"{http_url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
             f"&objectUID={sop}&contentType=image/jpeg"),
            inst + "/rendered", inst + "/thumbnail", inst + "/frames/1/rendered",
            f"{http_url}/dicom-web/studies/{study}/series/{series}/thumbnail",
            f"{http_url}/dicom-web/studies/{study}/thumbnail",
            inst + "/frames/1"]


def _get(url: str) -> requests.Response:
    accept = ("multipart/related; type=application/octet-stream; "
              f"transfer-syntax={ExplicitVRLittleEndian}") if url.endswith("/frames/1") else "*/*"
    return requests.get(url, timeout=120, headers={"Accept": accept})


def test_stored_bombs_are_never_decoded(bombed):
    data, cfg, files = bombed
    with serve(cfg, data) as proc:
        before = rss_mb(proc.proc.pid)
        with PeakMemory(proc.proc.pid) as peak:
            for n in (20, 21, 22):
                for url in _urls(proc.http_url, n):
                    r = _get(url)
                    assert r.status_code == 422, (url, r.status_code, r.text[:300])
            # C-GET proposing only Explicit VR LE: sending means transcoding, refused.
            status, got = c_get(proc.port, {"QueryRetrieveLevel": "STUDY",
                                            "StudyInstanceUID": uid(160, 20, "study")},
                                SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
            assert got == {} and status != 0
        assert peak.mb - before < BOMB_RSS_HEADROOM_MB, (before, peak.mb)
        lines = log_lines(proc, "HTTP GET")
        assert sum("max_frame_pixels" in line for line in lines) == 7, proc.output()
        assert sum("bitstream declares 32768 x 32768" in line for line in lines) == 7
        assert sum("in a deflated data set" in line for line in lines) == 7, proc.output()
        # Still served as stored: the bytes are the client's to decode.
        r = requests.get(_urls(proc.http_url, 20)[0].replace("image/jpeg", "application/dicom"),
                         timeout=30)
        assert r.status_code == 200 and r.content.endswith(files["rle"].read_bytes()[-64:])


def test_memory_stays_bounded_with_bombs_at_once_and_others_are_served(bombed, tmp_path):
    data, cfg, _files = bombed
    bombs = tmp_path / "more"
    cstore = [(write(bombs, "d1.dcm", deflate_bomb_image(30)), SecondaryCaptureImageStorage,
               DeflatedExplicitVRLittleEndian),
              (write(bombs, "d2.dcm", deflate_bomb_document(31)), EncapsulatedPDFStorage,
               DeflatedExplicitVRLittleEndian),
              (write(bombs, "r1.dcm", rle_bomb(32)), SecondaryCaptureImageStorage, RLELossless),
              (write(bombs, "n1.dcm", native_bomb(33)), SecondaryCaptureImageStorage,
               ExplicitVRLittleEndian)]
    stow_parts = [deflate_bomb_image(34), deflate_bomb_document(35), rle_bomb(36),
                  native_bomb(37)]
    with serve(cfg, data) as proc:
        port, url = proc.port, proc.http_url
        # Warm up what a normal day loads (decoders, a render), then the baseline.
        assert c_store_raw(port, real_image(tmp_path, 1), CTImageStorage,
                           ExplicitVRLittleEndian) == 0
        assert requests.get(_urls(url, 20)[1], timeout=60).status_code == 422
        before = rss_mb(proc.proc.pid)
        with PeakMemory(proc.proc.pid) as peak, ThreadPoolExecutor(16) as pool:
            attacks = [pool.submit(c_store_raw, port, *bomb) for bomb in cstore]
            attacks += [pool.submit(stow, url, [part]) for part in stow_parts]
            renders = [pool.submit(_get, u) for n in (20, 21) for u in _urls(url, n)[:4]]
            # Everyone else, throughout: each answered promptly.
            slowest, rounds, number = 0.0, 0, 2
            while not all(f.done() for f in attacks + renders) or rounds < 3:
                for what, call in (("C-ECHO", lambda: echo(port) == 0),
                                   ("C-STORE", lambda n=number: c_store_raw(
                                       port, real_image(tmp_path, n), CTImageStorage,
                                       ExplicitVRLittleEndian) == 0),
                                   ("/testdbalive", lambda: requests.get(
                                       url + "/testdbalive", timeout=PROMPT_S).ok)):
                    t0 = time.monotonic()
                    assert call(), what
                    took = time.monotonic() - t0
                    assert took < PROMPT_S, f"{what} took {took:.1f} s during the bombs"
                    slowest = max(slowest, took)
                number += 1
                rounds += 1
                assert rounds < 500
            statuses = [f.result() for f in attacks[:4]]
            stowed = [f.result() for f in attacks[4:]]
            rendered = [f.result().status_code for f in renders]
        growth = peak.mb - before
        record("test_bombs_at_once", bomb_peak_rss_mb=peak.mb)
        print(f"bombs at once: RSS {before:.0f} MB before, peak {peak.mb:.0f} MB "
              f"(+{growth:.0f}); slowest bystander {slowest:.2f} s over {rounds} rounds")
        assert statuses == [0xC422] * 4
        assert [r.status_code for r in stowed] == [409] * 4
        assert [failures(r)[0][1] for r in stowed] == [0xC422] * 4
        assert rendered == [422] * 8
        assert growth < BOMB_RSS_HEADROOM_MB, (before, peak.mb)
        wait_for(lambda: echo(port) == 0, 10, "a C-ECHO after the bombs")


def test_stow_holds_a_part_once(tmp_path):
    """STOW-RS of one ~200 MB part: the server's memory grows by about the part, not twice."""
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data)
    ds = _header(40, SecondaryCaptureImageStorage, rows=512, columns=512, frames=400, bits=16)
    pixels = bytes(range(256)) * (512 * 512 * 2 * 400 // 256)
    part = part10(ds, _encode(ds) + _element(0x7FE0, 0x0010, b"OW", len(pixels)) + pixels,
                  ExplicitVRLittleEndian)
    del pixels
    size_mb = len(part) / MB
    with serve(cfg, data) as proc:
        # Warm up STOW (imports, buffers) with a small part, then the baseline.
        small = ct_slice(seed=162, patient=1, study=1, series=1, number=1, size=64)
        small.save_as(tmp_path / "small.dcm", enforce_file_format=True)
        assert stow(proc.http_url, [(tmp_path / "small.dcm").read_bytes()]).status_code == 200
        before = rss_mb(proc.proc.pid)
        with PeakMemory(proc.proc.pid) as peak:
            r = stow(proc.http_url, [part])
        assert r.status_code == 200, r.text
        growth = peak.mb - before
        print(f"STOW-RS of a {size_mb:.0f} MB part: RSS {before:.0f} MB before, "
              f"peak {peak.mb:.0f} MB (+{growth:.0f} MB, {growth / size_mb:.2f} x the part)")
        # Before: the part in the reader's buffer plus a copy of its data set (about 2 x).
        assert growth < 1.4 * size_mb, (size_mb, before, peak.mb)
