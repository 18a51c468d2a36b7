"""Limits on what one object may make us inflate or decode: deflate bombs and pixel bombs.

Two kinds of small objects grow enormous once read:
- a Deflated Explicit VR Little Endian data set (PS3.5 A.5), whose few megabytes inflate to
  gigabytes;
- an object whose header declares Rows x Columns x Frames (x Samples x Bits) far beyond what it
  carries: an RLE or JPEG fragment of a few bytes decodes to a frame of that size.

Both are bounded here, before the work: `Inflating` inflates a deflated data set step by step
(never more than it is asked to read, never past a cap), and `check_pixels` holds what a header
declares against the pixel budget, at ingest (pacsd.imaging.header) and before any decode (render,
frames, transcode). The limits are process-wide, set once at start-up from the configuration
(`configure`); the defaults are the settings' defaults.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pacsd.errors import DataSetTooLarge, InvalidDataset

if TYPE_CHECKING:
    from pacsd.config import DicomSettings

log = logging.getLogger(__name__)

MB = 1 << 20
CHUNK = 1 << 20        # compressed bytes fed, and inflated bytes produced, per step
KEEP = 1 << 20         # inflated bytes kept behind the read position (pydicom rewinds a little)
# The largest single read from a deflated header: the biggest value an index, a renderer or a
# metadata answer reads from a header is a 64k-entry LUT (128 KiB); bigger values are skipped
# (deferred) where the caller allows it, refused where it does not.
MAX_HEADER_READ = 64 * MB
# What a full read of a deflated image may inflate beyond its declared pixel data (the rest of
# its header, overlays, trailing padding).
FULL_READ_SLACK = 64 * MB


@dataclass(frozen=True)
class Limits:
    """[dicom] max_inflated_mb, max_frame_pixels and max_pixel_mb, in bytes and pixels."""

    max_inflated: int = 1024 * MB
    max_frame_pixels: int = 1 << 26
    max_pixel_bytes: int = 4096 * MB

    @classmethod
    def from_settings(cls, dicom: DicomSettings) -> Limits:
        return cls(max_inflated=dicom.max_inflated_mb * MB,
                   max_frame_pixels=dicom.max_frame_pixels,
                   max_pixel_bytes=dicom.max_pixel_mb * MB)


_limits = Limits()


def configure(limits: Limits) -> None:
    """Set the process's limits (at start-up, from the configuration)."""
    global _limits
    _limits = limits


def limits() -> Limits:
    return _limits


# --- reading in memory and inflating ----------------------------------------------------------

class ViewReader:
    """A read-only file over bytes in memory that copies only what is read (io.BytesIO would
    copy a memoryview or bytearray whole first)."""

    def __init__(self, data: Any, name: str = "<data set>") -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self.name = name

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        data = bytes(self._view[self._pos:end])
        self._pos = max(self._pos, end)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)

    def close(self) -> None:
        """Release the view, so that a bytearray it was made from can be resized again."""
        self._view.release()


class Inflating:
    """A read-only file over a raw deflate stream (PS3.5 A.5: no zlib header), inflated as it
    is read: a step of at most CHUNK at a time, KEEP bytes kept behind the position (pydicom
    rewinds a few bytes now and then), never more than `limit` bytes in all (DataSetTooLarge)
    and no single read longer than `max_read`. Seeking forward inflates and drops."""

    def __init__(self, source: Any, limit: int, max_read: int = MAX_HEADER_READ,
                 name: str = "<deflated data set>", why: str = "[dicom] max_inflated_mb"
                 ) -> None:
        self._src = source
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._base = 0      # stream offset of _buf[0]
        self._pos = 0
        self._total = 0
        self.limit = limit
        self.max_read = max_read
        self.name = name
        self.why = why

    @property
    def produced(self) -> int:
        """Bytes inflated so far (kept or dropped)."""
        return self._total

    def _step(self) -> bytes:
        z = self._z
        while not z.eof:
            data = z.unconsumed_tail or self._src.read(CHUNK)
            out = z.decompress(data, CHUNK)   # zlib.error: corrupt stream
            if out:
                self._total += len(out)
                if self._total > self.limit:
                    raise DataSetTooLarge(
                        f"the deflated data set inflates to more than {self.limit // MB} MB "
                        f"({self.why})")
                return out
            if not data:
                break   # the input ends before the stream does: a truncated stream ends here
        return b""

    def _fill(self, end: int) -> None:
        while self._base + len(self._buf) < end:
            out = self._step()
            if not out:
                return
            self._buf += out
            cut = min(len(self._buf), self._pos - KEEP - self._base)
            if cut > CHUNK:   # drop what lies well behind the position
                del self._buf[:cut]
                self._base += cut

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.max_read + 1
            self._fill(self._pos + n)
            n = min(n, self._base + len(self._buf) - self._pos)
        if n > self.max_read:
            raise DataSetTooLarge(f"an element of {n} bytes in a deflated data set (more than "
                                  f"{self.max_read // MB} MB read at once)")
        self._fill(self._pos + n)
        start = self._pos - self._base
        data = bytes(self._buf[start:start + n])
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence not in (0, 1):
            raise InvalidDataset("a deflated data set is read forward only")
        target = offset + (self._pos if whence == 1 else 0)
        if target < self._base:
            raise InvalidDataset(f"cannot go back {self._pos - target} bytes in a deflated "
                                 "data set")
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        """The inflated size of the whole stream, inflated to its end (and dropped) within
        the limit; the position is lost."""
        self._buf = bytearray()
        while self._step():
            pass
        self._base = self._pos = self._total
        return self._total


# --- the pixel budget -------------------------------------------------------------------------

def _int(ds: Any, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except Exception:  # noqa: BLE001 (garbage reads as the default, as the renderer reads it)
        return default


@dataclass(frozen=True)
class Declared:
    """What a header says its pixel data holds."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits: int

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns

    @property
    def decoded_bytes(self) -> int:
        """Decoded size: every frame, every sample (YBR 4:2:2 decodes to three)."""
        return (self.frame_pixels * self.frames * self.samples * self.bits + 7) // 8

    def describe(self) -> str:
        return (f"{self.frames} frame(s) of {self.rows} x {self.columns} pixels x "
                f"{self.samples} sample(s) x {self.bits} bits")


def declared(ds: Any) -> Declared | None:
    """What the Image Pixel Module (PS3.3 C.7.6.3) of `ds` declares; None without one."""
    if "Rows" not in ds or "Columns" not in ds:
        return None
    return Declared(max(0, _int(ds, "Rows", 0)), max(0, _int(ds, "Columns", 0)),
                    max(1, _int(ds, "NumberOfFrames", 1)), max(1, _int(ds, "SamplesPerPixel", 1)),
                    max(1, _int(ds, "BitsAllocated", 8)))


def check_pixels(ds: Any, *, native: bool = False, length: int | None = None,
                 carried: int | None = None) -> Declared | None:
    """Hold what `ds` declares against the pixel budget (DataSetTooLarge); for native pixel
    data (`native`), also against what it carries: the Pixel Data element's `length` and the
    bytes that follow its header (`carried`), if known (InvalidDataset when short)."""
    d = declared(ds)
    if d is None:
        return None
    lim = _limits
    if d.frame_pixels > lim.max_frame_pixels:
        raise DataSetTooLarge(f"it declares frames of {d.rows} x {d.columns} pixels, more than "
                              f"[dicom] max_frame_pixels ({lim.max_frame_pixels})")
    if d.decoded_bytes > lim.max_pixel_bytes:
        raise DataSetTooLarge(f"it declares {d.describe()}: {d.decoded_bytes // MB} MB of "
                              f"pixels, more than [dicom] max_pixel_mb "
                              f"({lim.max_pixel_bytes // MB})")
    if native and length is not None and length != 0xFFFFFFFF:
        samples = d.samples
        if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            samples = 2   # PS3.3 C.7.6.3.1.2: two samples' worth per pixel, as stored
        need = (d.frame_pixels * d.frames * samples * d.bits + 7) // 8
        have = length if carried is None else min(length, carried)
        if have < need:
            raise InvalidDataset(f"it declares {d.describe()} ({need} bytes of pixel data) "
                                 f"but carries {have} bytes")
    return d


# --- compressed frames: the size their own bitstream declares ---------------------------------

# JPEG SOFn markers (ITU T.81 B.1.1.3), JPEG-LS SOF55 (T.87): P, Y (rows), X (columns)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_J2K_SIZ = b"\xff\x4f\xff\x51"   # SOC then SIZ (ISO 15444-1 A.5.1)
_SCAN = 1 << 16


def bitstream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) that a JPEG, JPEG-LS or JPEG 2000 frame's own header declares; None
    when it is none of those (RLE: its decoder takes the DICOM header's size)."""
    head = bytes(frame[:_SCAN])
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(head):
            if head[i] != 0xFF:
                return None
            marker = head[i + 1]
            if marker == 0xFF:   # fill byte
                i += 1
                continue
            (seglen,) = struct.unpack(">H", head[i + 2:i + 4])
            if marker in _SOF and i + 9 <= len(head):
                rows, cols = struct.unpack(">HH", head[i + 5:i + 9])
                return rows, cols
            if marker == 0xDA:   # start of scan before any frame header
                return None
            i += 2 + seglen
        return None
    at = head.find(_J2K_SIZ)
    if at >= 0 and at + 24 <= len(head):
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", head[at + 8:at + 24])
        return max(0, ysiz - yo), max(0, xsiz - xo)
    return None


def check_frame(frame: bytes, d: Declared | None) -> None:
    """A compressed frame must not decode to more than the header declares (which the budget
    has passed): a JPEG stream of a few bytes may say 65535 x 65535 itself, and the decoder
    allocates what it says."""
    size = bitstream_size(frame)
    if size is None:
        return
    rows, cols = size
    if d is None or rows > d.rows or cols > d.columns:
        raise DataSetTooLarge(f"a frame's own bitstream declares {rows} x {cols} pixels, more "
                              f"than the header's {d.rows if d else 0} x "
                              f"{d.columns if d else 0}")
