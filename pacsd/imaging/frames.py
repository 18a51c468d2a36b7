"""Frames cut from a stored file (WADO-RS frames, PS3.18 10.4.1.1.5): the bytes of each frame
asked for, and nothing else of the Pixel Data read.

Native pixel data is sliced (and turned little endian); encapsulated frames are taken as stored
(their fragments), or decoded to native pixels when asked (pacsd.imaging.render.decode_frame).
Every path passes the pixel budget (pacsd.imaging.bounds) first.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Iterator

from pydicom.encaps import get_frame
from pydicom.uid import UID

from pacsd.errors import PacsError
from pacsd.imaging import bounds
from pacsd.imaging.header import read_file_header, read_full, read_header


class NoSuchFrame(PacsError):
    """A frame number beyond the instance's frames or its stored Pixel Data, or no Pixel Data."""

    http_status = 404


class FramesUnavailable(PacsError):
    """Frames that cannot be cut as asked (bit-packed frames that end inside a byte)."""

    http_status = 406


def read_frames(path: Path, ts: str, numbers: list[int], decode: bool = False
                ) -> Iterator[bytes]:
    """The bytes of each frame: for native pixel data a slice (little endian), for
    encapsulated pixel data the frame's fragments as stored, or with `decode` the frame
    decoded to native little endian pixels (pacsd.imaging.render.decode_frame). Only those bytes are
    read."""
    uid = UID(ts)
    if decode and uid.is_compressed:
        from pacsd.imaging.render import decode_frame   # lazily: decoders load only when asked
        ds = read_file_header(path)
        bounds.check_pixels(ds)   # (decode_frame checks again, with each frame's bitstream)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        bad = [n for n in numbers if n > n_frames]
        if bad:
            raise NoSuchFrame(f"frame {bad[0]} does not exist: the instance has {n_frames}")
        for n in numbers:
            yield decode_frame(path, n).tobytes()
        return
    with open(path, "rb") as f:
        ds = read_header(f, defer_size=None)   # leaves f at the Pixel Data element
        # Frames are read into memory (native) or decoded: the same budget as a decode.
        bounds.check_pixels(ds)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        bad = [n for n in numbers if n > n_frames]
        if bad:
            raise NoSuchFrame(f"frame {bad[0]} does not exist: the instance has {n_frames}")
        if uid.is_deflated:   # no seeking inside a deflated stream: read it whole (rare)
            full = read_full(path)
            pixels, offset, length = io.BytesIO(full.PixelData), 0, len(full.PixelData)
            f = pixels  # type: ignore[assignment]
            little = True
        else:
            header = f.read(8 if uid.is_implicit_VR else 12)
            little = uid.is_little_endian
            fmt = "<" if little else ">"
            if len(header) < 8 or struct.unpack(fmt + "HH", header[:4]) != (0x7FE0, 0x0010):
                raise NoSuchFrame("the instance has no Pixel Data")
            length = struct.unpack(fmt + "I", header[-4:])[0]
            offset = f.tell()
        if uid.is_compressed:
            ext = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            for n in numbers:
                f.seek(offset)
                yield get_frame(f, n - 1, number_of_frames=n_frames, extended_offsets=ext)
            return
        bits = int(ds.get("BitsAllocated") or 8)
        samples = int(ds.get("SamplesPerPixel") or 1)
        pixels_per_frame = int(ds.Rows) * int(ds.Columns) * samples
        if (pixels_per_frame * bits) % 8:
            raise FramesUnavailable("frames of bit-packed pixel data that do not end on a byte "
                        "boundary cannot be retrieved")
        size = pixels_per_frame * bits // 8
        for n in numbers:
            f.seek(offset + (n - 1) * size)
            data = f.read(size)
            if len(data) < size or (n * size > length):
                raise NoSuchFrame(f"frame {n} lies beyond the stored Pixel Data")
            if not little and bits in (16, 32):
                import numpy as np
                data = np.frombuffer(data, f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
            yield data


# --- many instances at once: the viewer's batches (pacsd.web.wado_batch) ----------------------
#
# pydicom's header parse costs about 1.5 ms per file here, more than reading a 512 KB CT slice
# (0.1 ms): for a batch of little endian native files the elements before Pixel Data are walked
# directly in the bytes read (PS3.5 7.1.2 explicit VR, 7.1.3 implicit VR), picking out the
# Image Pixel Module's sizes. Anything unusual (undefined lengths, a header beyond the bytes
# read, encapsulated or big endian pixels) returns None and takes read_frames' way.

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_PIXEL_US = {0x00280002: "SamplesPerPixel", 0x00280010: "Rows", 0x00280011: "Columns",
             0x00280100: "BitsAllocated"}
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
FAST_FILE_LIMIT = 64 << 20   # bigger files are cut by read_frames, a frame at a time


def _element(data: bytes, p: int, implicit: bool) -> tuple[int, int, int, bytes] | None:
    """(tag, value offset, length, VR) of the element at p; None past the end."""
    if p + 8 > len(data):
        return None
    group, elem = struct.unpack_from("<HH", data, p)
    vr = b""
    if group == 0xFFFE or (implicit and group != 0x0002):   # items and delimiters: no VR
        (length,), head = struct.unpack_from("<I", data, p + 4), 8
    elif (vr := data[p + 4:p + 6]) in _LONG_VRS:
        if p + 12 > len(data):
            return None
        (length,), head = struct.unpack_from("<I", data, p + 8), 12
    else:
        (length,), head = struct.unpack_from("<H", data, p + 6), 8
    return group << 16 | elem, p + head, length, vr


def _after_sequence(data: bytes, p: int, implicit: bool, depth: int) -> int | None:
    """Where a sequence of undefined length whose items start at p ends (after its
    delimitation item, PS3.5 7.5.2); None if it cannot be followed here."""
    if depth > 8:
        return None
    while (el := _element(data, p, implicit)) is not None:
        tag, value, length, _ = el
        if tag == 0xFFFEE0DD:        # Sequence Delimitation Item
            return value
        if tag != 0xFFFEE000:        # an Item, or nothing we know
            return None
        if length != 0xFFFFFFFF:
            p = value + length
            continue
        p = value                    # an item of undefined length: its elements
        while (inner := _element(data, p, implicit)) is not None:
            itag, ivalue, ilength, ivr = inner
            if itag == 0xFFFEE00D:   # Item Delimitation Item
                p = ivalue
                break
            if ilength == 0xFFFFFFFF:
                if ivr not in (b"SQ", b"") or (implicit and not _sequence_follows(data, ivalue)):
                    return None
                after = _after_sequence(data, ivalue, implicit, depth + 1)
                if after is None:
                    return None
                p = after
            else:
                p = ivalue + ilength
        else:
            return None
    return None


def _sequence_follows(data: bytes, p: int) -> bool:
    """In implicit VR, an undefined length is a sequence if an item or its end follows."""
    return data[p:p + 4] in (b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0")


def _walk_native(data: bytes, implicit: bool) -> tuple[dict[str, object], int, int] | None:
    """({keyword: value} of the Image Pixel Module, offset, length) of the Pixel Data value of
    a Part 10 file held in `data`, or None where the quick walk does not apply."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    module: dict[str, object] = {}
    p = 132
    while (el := _element(data, p, implicit)) is not None:
        tag, value, length, vr = el
        if tag >> 16 == 0xFFFE:
            return None
        if tag == 0x7FE00010:
            return (module, value, length) if length != 0xFFFFFFFF else None
        if length == 0xFFFFFFFF:     # a sequence of undefined length: over its items
            if vr not in (b"SQ", b"") or (not vr and not _sequence_follows(data, value)):
                return None
            after = _after_sequence(data, value, implicit, 0)
            if after is None:
                return None
            p = after
            continue
        if tag in _PIXEL_US and length == 2 and value + 2 <= len(data):
            module[_PIXEL_US[tag]] = struct.unpack_from("<H", data, value)[0]
        elif tag in (0x00280008, 0x00280004):   # IS, CS
            text = data[value:value + length].decode("ascii", "replace").strip(" \0")
            module["NumberOfFrames" if tag == 0x00280008 else "PhotometricInterpretation"] = text
        p = value + length
    return None


def native_frames_fast(path: Path, ts: str) -> list[bytes] | None:
    """Every frame of a little endian native file, cut from one read of it; None when the
    quick walk does not apply (then read_frames). Holds the pixel budget as read_frames does."""
    if ts not in _NATIVE_LE:
        return None
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > FAST_FILE_LIMIT:
            return None
        data = f.read(size)
    found = _walk_native(data, implicit=ts == "1.2.840.10008.1.2")
    if found is None:
        return None
    module, offset, length = found
    d = bounds.check_pixels(module, native=True, length=length, carried=len(data) - offset)
    if d is None:
        raise NoSuchFrame("the instance has no Image Pixel Module")
    if (d.frame_pixels * d.samples * d.bits) % 8:
        return None
    size = d.frame_pixels * d.samples * d.bits // 8
    return [data[offset + n * size: offset + (n + 1) * size] for n in range(d.frames)]
