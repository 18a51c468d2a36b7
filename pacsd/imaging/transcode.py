"""Changing a stored file's transfer syntax for a peer that does not accept it (PS3.5 10, A.4).

Used only on the way out (C-MOVE, C-GET, sending to a node); what is stored never changes.
Decoding is pydicom's with whatever plugins are installed (GDCM, Pillow, pylibjpeg, plus
pacsd.imaging.jpeg12 for 12-bit JPEG); encoding to a compressed syntax only where pydicom has an
encoder available for it, and only to lossless ones (RLE Lossless with pydicom alone), so that
a transcoded image never loses more than the stored one already had.

`choose` picks the target among the syntaxes the peer accepted, `transcode` produces a data set
whose encoding matches that target exactly (pynetdicom then sends it in that syntax, without a
conversion of its own), and `Tally` counts what one association sent for its summary line.
"""

from __future__ import annotations

import array

import io
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence


from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pacsd.errors import TranscodeError
from pacsd.imaging import bounds
from pacsd.imaging import jpeg12
from pacsd.imaging.header import read_full

jpeg12.register()

# What we send when the node states no preference: what every receiver reads (PS3.5 10.1).
DEFAULT_PREFERENCE: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Uncompressed little endian targets: made from any data set by re-encoding. Explicit VR Big
# Endian (retired, PS3.5 A.3) is read but never made; pydicom re-encodes the values it decodes
# (US, FL, ...) but writes the words of OW / OF / OL / OD / OV values as they are: `_to_little`
# swaps them.
_PLAIN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                    DeflatedExplicitVRLittleEndian})
# Compressed targets we may encode to: lossless only, and only with an encoder installed.
_LOSSLESS = frozenset({RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1,
                       JPEGLossless, HTJ2KLossless, HTJ2KLosslessRPCL})
_SHORT = {ExplicitVRLittleEndian: "Explicit VR LE", ImplicitVRLittleEndian: "Implicit VR LE",
          ExplicitVRBigEndian: "Explicit VR BE",
          DeflatedExplicitVRLittleEndian: "Deflated Explicit VR LE",
          JPEGBaseline8Bit: "JPEG Baseline", JPEGExtended12Bit: "JPEG Extended",
          JPEGLossless: "JPEG Lossless", JPEGLosslessSV1: "JPEG Lossless SV1",
          JPEGLSLossless: "JPEG-LS Lossless", JPEGLSNearLossless: "JPEG-LS Near-Lossless",
          JPEG2000Lossless: "JPEG 2000 Lossless", JPEG2000: "JPEG 2000",
          RLELossless: "RLE Lossless", HTJ2KLossless: "HTJ2K Lossless"}
_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

__all__ = ["DEFAULT_PREFERENCE", "Tally", "TranscodeError", "can_decode", "can_encode",
           "choose", "short", "transcode"]


def short(ts: str) -> str:
    """A transfer syntax's name for log lines."""
    uid = UID(ts)
    return _SHORT.get(uid) or (uid.keyword if uid.is_valid and uid.keyword else str(uid))


def can_decode(ts: UID) -> bool:
    if not ts.is_compressed:
        return True
    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:   # video and other syntaxes pydicom has no decoder for
        return False


def can_encode(ts: UID) -> bool:
    if ts in _PLAIN:
        return True
    if ts not in _LOSSLESS:
        return False
    try:
        return bool(get_encoder(ts).is_available)
    except NotImplementedError:
        return False


def choose(stored: str, accepted: Iterable[str], preference: Sequence[str] = ()
           ) -> UID | None:
    """The syntax to send a file stored in `stored` in, among `accepted` (the peer's, in the
    order it accepted them): `stored` itself, else the first of `preference` (the node's, or
    DEFAULT_PREFERENCE) that was accepted and that we can make, else any accepted one we can
    make; None if there is none."""
    offered = [UID(ts) for ts in accepted]
    if stored in offered:
        return UID(stored)
    if not can_decode(UID(stored)):
        return None
    order = [UID(ts) for ts in (preference or DEFAULT_PREFERENCE) if ts in offered]
    order += [ts for ts in offered if ts not in order]
    return next((ts for ts in order if can_encode(ts)), None)


def _plugin(stored: UID, ds: Dataset) -> str:
    """12-bit JPEG: straight to pacsd.imaging.jpeg12, rather than through GDCM and Pillow, which both
    refuse it with an ERROR and a traceback in the log each time."""
    if (stored == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8
            and jpeg12.is_available(stored)):
        return jpeg12.LABEL
    return ""


# Value representations whose values pydicom keeps as raw bytes: words of this many bytes.
_WORDS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
# array's unsigned type of each word size (the standard library's: numpy stays unloaded in the
# watchdog, which imports this module through pacsd.nodes.remote).
_TYPECODE = {array.array(c).itemsize: c for c in "QLIH"}


def _to_little(ds: Dataset) -> None:
    """Swap the words of every OW / OF / OL / OD / OV value, nested sequences included, of a
    data set read from Explicit VR Big Endian, so that written little endian it holds the same
    values (pixel data of 16 bits and more, but also 8-bit pixel data encoded as OW, whose byte
    pairs big endian reverses: PS3.5 A.3). OB and UN values are byte streams: unchanged."""
    for elem in ds.iterall():
        size = _WORDS.get(str(elem.VR))
        if size and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % size == 0:
            words = array.array(_TYPECODE[size], elem.value)
            words.byteswap()
            elem.value = words.tobytes()
    # From here on the data set's raw values are little endian: read them so.
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)


def transcode(path: str, target: UID,
              transform: Callable[[Dataset], Dataset] | None = None) -> Dataset:
    """The stored file at `path` as a data set encoded in `target`, same SOP Instance UID;
    with `transform` (a de-identification), changed by it first (`target` may then be the
    stored syntax itself: the data set is only encoded again).

    Raises TranscodeError when the file cannot be read or its pixel data decoded or encoded."""
    source = "stored file"
    try:
        ds = read_full(path)   # within the pixel budget (and, deflated, the inflation cap)
        if transform is not None:
            ds = transform(ds)
        stored = UID(ds.file_meta.TransferSyntaxUID)
        source = short(stored)
        has_pixels = any(k in ds for k in _PIXELS)
        if stored.is_compressed and "PixelData" in ds:
            # Each frame's own bitstream within what the header declares, before decoding all.
            d = bounds.declared(ds)
            for frame in generate_frames(ds.PixelData, number_of_frames=d.frames if d else 1):
                bounds.check_frame(frame, d)
        if stored.is_compressed and has_pixels and target != stored:
            # A lossy source stays lossy (LossyImageCompression is kept); YBR becomes RGB.
            ds.decompress(generate_instance_uid=False, decoding_plugin=_plugin(stored, ds))
        if stored == ExplicitVRBigEndian and target != stored:
            _to_little(ds)
        if target.is_compressed and has_pixels and target != stored:
            # RLE with pydicom's own encoder: GDCM's aborts the whole process (a C++
            # exception, uncaught) on an image of an odd number of bytes, such as 3x3 RGB.
            ds.compress(target, generate_instance_uid=False,
                        encoding_plugin="pydicom" if target == RLELossless else "")
        ds.file_meta.TransferSyntaxUID = target
        # Written and read back in the target syntax, the data set's own encoding matches it,
        # so pynetdicom uses the exactly matching presentation context and converts nothing
        # (it would otherwise take the first convertible one, and only between uncompressed
        # syntaxes).
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        buf.seek(0)
        return dcmread(buf)
    except Exception as e:   # pydicom and its plugins raise many kinds (RuntimeError mostly)
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise TranscodeError(f"{source} -> {short(target)}: {why}") from e


class Tally:
    """What one association sent: as stored, transcoded (by pair of syntaxes), failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.as_stored = 0
        self.failed = 0
        self.transcoded: Counter[tuple[str, str]] = Counter()

    def sent(self, pair: tuple[str, str] | None) -> None:
        with self._lock:
            if pair is None:
                self.as_stored += 1
            else:
                self.transcoded[pair] += 1

    def fail(self) -> None:
        with self._lock:
            self.failed += 1

    @property
    def total(self) -> int:
        return self.as_stored + self.failed + sum(self.transcoded.values())

    def summary(self) -> str:
        """"sent 3 as stored, 2 transcoded (JPEG 2000 -> Explicit VR LE), 1 failed"."""
        with self._lock:
            pairs = sorted(self.transcoded.items())
            n = sum(c for _, c in pairs)
            if len(pairs) == 1:
                how = f"{short(pairs[0][0][0])} -> {short(pairs[0][0][1])}"
            else:
                how = ", ".join(f"{short(a)} -> {short(b)}: {c}" for (a, b), c in pairs)
            text = f"sent {self.as_stored} as stored, {n} transcoded"
            return text + (f" ({how})" if pairs else "") + f", {self.failed} failed"
