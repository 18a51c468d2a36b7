"""Frames cut from a stored file (WADO-RS frames, PS3.18 10.4.1.1.5): the bytes of each frame
asked for, and nothing else of the Pixel Data read.

Native pixel data is sliced (and turned little endian); encapsulated frames are taken as stored
(their fragments), or decoded to native pixels when asked (pacsd.imaging.render.decode_frame).
Every path passes the pixel budget (pacsd.imaging.bounds) first.
"""

from __future__ import annotations

import io
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
