"""Render one frame of a stored DICOM file as an 8-bit JPEG or PNG (WADO-URI, DICOMweb).

    header -> decode one frame -> modality LUT -> VOI window -> 8 bits -> fit the box -> encode

Grayscale follows PS3.3 C.11: Rescale Slope/Intercept (or a Modality LUT), then the window
(the request's, else the first stored Window Center/Width, else the frame's min..max) with the
VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID; C.11.2.1.2-3); MONOCHROME1 is inverted so
that it displays as intended. Colour: YBR is converted to RGB, PALETTE COLOR through its LUTs.
Decoding is pydicom's (numpy, Pillow, GDCM, plus pacsd.imaging.jpeg12 for 12-bit JPEG); only the
requested frame is read and decoded, and only once the pixel budget (pacsd.imaging.bounds) has passed
what the header declares and what a compressed frame's own bitstream declares.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacsd.imaging import bounds
from pacsd.imaging import jpeg12
from pacsd.errors import DataSetTooLarge, InvalidDataset, PacsError
from pacsd.imaging.header import read_file_header, read_full, read_header

log = logging.getLogger(__name__)

jpeg12.register()

FORMATS = {"jpeg": "JPEG", "png": "PNG"}
MAX_SIDE = 4096   # largest rows/columns box we render into (a bigger one is refused)


class NotAnImage(InvalidDataset):
    """The object has no pixel data (an SR, an RT Plan, a waveform…)."""


class UnsupportedPixelData(PacsError):
    """No decoder here for the stored transfer syntax or pixel format: ask for
    application/dicom instead (406, as for a content type we cannot produce)."""

    http_status = 406


class CorruptPixelData(PacsError):
    """A decoder exists but failed on these bytes, or the stored Pixel Data is shorter than
    the frames its header declares (a truncated object). The request is understood and this
    object cannot be rendered: 422 with the reason, as for a pixel bomb (the object can still
    be retrieved as stored); not 500, which says the server is at fault."""

    http_status = 422


def render(path: Path, *, frame: int = 1, rows: int | None = None, columns: int | None = None,
           window: tuple[float, float] | None = None, fmt: str = "jpeg",
           quality: int = 90) -> bytes:
    """Frame `frame` (1-based) of the DICOM file at `path` as JPEG or PNG bytes, scaled to fit
    within `rows` x `columns` (either may be None) keeping its aspect ratio; `window` is
    (center, width) in modality units (after Rescale Slope/Intercept)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    for name, value in (("rows", rows), ("columns", columns)):
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise InvalidDataset(f"{name} must be between 1 and {MAX_SIDE}, not {value}")
    if window is not None and not window[1] > 0:
        raise InvalidDataset(f"window width must be positive, not {window[1]}")
    ds = _header(path)
    frames = _int(ds.get("NumberOfFrames"), 1)
    if not 1 <= frame <= frames:
        raise InvalidDataset(f"frame {frame} does not exist: the object has {frames} frame(s)")
    arr = _decode(path, ds, frame - 1)
    image = _to_image(arr, ds, window)
    image = _fit(image, rows, columns)
    out = io.BytesIO()
    if fmt == "jpeg":
        image.save(out, "JPEG", quality=max(1, min(100, quality)))
    else:
        image.save(out, "PNG", compress_level=4)
    return out.getvalue()


def decode_frame(path: Path, frame: int = 1) -> np.ndarray:
    """Frame `frame` (1-based) of the DICOM file at `path`, decoded to native pixels: shape
    (rows, columns) for one sample per pixel, (rows, columns, 3) interleaved for colour (YBR
    converted to RGB). The dtype follows the header, as native data would be read: unsigned or
    signed (PixelRepresentation) integers of BitsAllocated bits (8, 16, 32), little endian; no
    Modality LUT or window applied (PALETTE COLOR stays as indices)."""
    ds = _header(path)
    frames = _int(ds.get("NumberOfFrames"), 1)
    if not 1 <= frame <= frames:
        raise InvalidDataset(f"frame {frame} does not exist: the object has {frames} frame(s)")
    arr = _decode(path, ds, frame - 1)
    bits = _int(ds.get("BitsAllocated"), 8 * arr.dtype.itemsize)
    if arr.dtype.kind in "iu" and bits in (8, 16, 32):
        kind = "i" if _int(ds.get("PixelRepresentation"), 0) == 1 else "u"
        if arr.ndim == 3:   # colour samples are unsigned whatever PixelRepresentation says
            kind = "u"
        arr = arr.astype(f"<{kind}{bits // 8}", copy=False)
    else:
        raise UnsupportedPixelData(f"{bits}-bit {arr.dtype} pixels are not decoded to frames")
    return np.ascontiguousarray(arr)


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _first_float(value: Any) -> float | None:
    """First value of a possibly multi-valued DS element, or None."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _header(path: Path) -> Dataset:
    """The header of a stored image, its declared pixels within the budget."""
    try:
        ds = read_file_header(path, defer_size=None)
    except DataSetTooLarge:
        raise
    except InvalidDataset as e:
        raise CorruptPixelData(f"stored file cannot be parsed: {e}") from None
    if "Rows" not in ds or "Columns" not in ds or "PhotometricInterpretation" not in ds:
        raise NotAnImage(f"{ds.get('SOPClassUID', 'the object')!s} "
                         f"({getattr(ds.get('SOPClassUID'), 'name', '')}) is not an image")
    bounds.check_pixels(ds)
    return ds


def _check_frame(path: Path, ds: Dataset, index: int) -> None:
    """A compressed frame's own bitstream must not declare more than the header (checked)."""
    frames = _int(ds.get("NumberOfFrames"), 1)
    try:
        with open(path, "rb") as f:
            read_header(f)   # leaves f at the Pixel Data element
            head = f.read(12)   # (7FE0,0010) OB, undefined length (PS3.5 A.4)
            if len(head) < 12 or head[:4] != b"\xe0\x7f\x10\x00":
                return   # no Pixel Data: the decoder says so
            ext = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            frame = get_frame(f, index, number_of_frames=frames, extended_offsets=ext)
    except (ValueError, EOFError, KeyError, OSError, InvalidDataset):
        return   # let the decoder report what is wrong with the fragments
    bounds.check_frame(frame, bounds.declared(ds))


def _check_native(path: Path, ds: Dataset, index: int, implicit: bool, little: bool) -> None:
    """Native Pixel Data must hold the frame asked for: a truncated object (its Pixel Data
    element, or the file, shorter than the header's frames) is refused with the reason."""
    samples = _int(ds.get("SamplesPerPixel"), 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        samples = 2   # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    size = (_int(ds.get("Rows"), 0) * _int(ds.get("Columns"), 0) * samples
            * _int(ds.get("BitsAllocated"), 8))
    needed = ((index + 1) * size + 7) // 8
    try:
        with open(path, "rb") as f:
            read_header(f)   # leaves f at the Pixel Data element
            head = f.read(8 if implicit else 12)
            offset = f.tell()
            stored = os.fstat(f.fileno()).st_size - offset
    except (OSError, ValueError, EOFError, InvalidDataset):
        return   # let the decoder report what is wrong
    fmt = "<" if little else ">"
    if len(head) < 8 or struct.unpack(fmt + "HH", head[:4]) != (0x7FE0, 0x0010):
        raise NotAnImage("the object has no Pixel Data")
    length = struct.unpack(fmt + "I", head[-4:])[0]
    if length == 0xFFFFFFFF:
        return   # undefined length in a native syntax: malformed, the decoder says so
    available = min(length, stored)
    if needed > available:
        raise CorruptPixelData(f"the stored Pixel Data is truncated: frame {index + 1} needs "
                               f"{needed} bytes of it, {available} are stored")


def _decode(path: Path, ds: Dataset, index: int) -> np.ndarray:
    from pydicom.pixels.decoders.base import get_decoder
    ts = ds.file_meta.get("TransferSyntaxUID", "")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedPixelData(f"no decoder for transfer syntax {ts}") from None
    if not decoder.is_available:
        raise UnsupportedPixelData(f"no decoder installed for {ts.name}: "
                                   f"{decoder.missing_dependencies}")
    if ts.is_compressed:
        _check_frame(path, ds, index)
    elif not ts.is_deflated:
        _check_native(path, ds, index, ts.is_implicit_VR, ts.is_little_endian)
    try:
        if ts == DeflatedExplicitVRLittleEndian:
            # The whole data set is compressed; pixel_array(path) cannot seek into it.
            arr = pixel_array(read_full(path), index=index)
        else:
            # Reads the header again and then only this frame's bytes.
            arr = pixel_array(str(path), index=index)
    except AttributeError as e:   # pydicom's word for "no Pixel Data element"
        raise NotAnImage(str(e)) from None
    except (RuntimeError, ValueError, NotImplementedError, TypeError, KeyError, OSError) as e:
        # The web's error handler logs the one line, with this reason.
        log.debug("cannot decode %s (%s): %s", path, ts.name, e)
        raise CorruptPixelData(f"pixel data cannot be decoded ({ts.name}): "
                               f"{str(e).splitlines()[0][:300]}") from None
    return arr


def _to_image(arr: np.ndarray, ds: Dataset, window: tuple[float, float] | None) -> Image.Image:
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, KeyError, AttributeError, IndexError) as e:
            raise UnsupportedPixelData(f"palette colour LUT cannot be applied: {e}") from None
        if arr.dtype != np.uint8:   # 16-bit LUT entries
            arr = (arr >> 8).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if arr.ndim == 3:   # RGB (pydicom has converted YBR_* to RGB)
        if arr.shape[-1] != 3:
            raise UnsupportedPixelData(f"{arr.shape[-1]} samples per pixel are not rendered")
        if arr.dtype != np.uint8:
            top = float(2 ** _int(ds.get("BitsStored"), 8 * arr.dtype.itemsize) - 1)
            arr = (arr.astype(np.float32) * (255.0 / top)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if arr.ndim != 2:
        raise UnsupportedPixelData(f"pixel array of shape {arr.shape} is not rendered")
    return Image.fromarray(_grayscale(arr, ds, window, photometric), "L")


def _grayscale(arr: np.ndarray, ds: Dataset, window: tuple[float, float] | None,
               photometric: str) -> np.ndarray:
    # Modality LUT (C.11.1): a LUT sequence if present, else Rescale Slope/Intercept.
    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    else:
        values = arr.astype(np.float32)
        slope = _first_float(ds.get("RescaleSlope"))
        intercept = _first_float(ds.get("RescaleIntercept"))
        if slope is not None and slope != 1:
            values *= slope
        if intercept:
            values += intercept
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if window is None:
        center = _first_float(ds.get("WindowCenter"))
        width = _first_float(ds.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            window = (center, width)
    if window is None:
        # No window: the frame's own range, end to end.
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        c, w = window
        if function == "SIGMOID":   # C.11.2.1.3.1
            scaled = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - c) / w, -80, 80)))
        elif function == "LINEAR_EXACT":   # C.11.2.1.3.2
            scaled = (values - c) / w + 0.5
        else:   # LINEAR, C.11.2.1.2.1: width 1 is a threshold at c - 0.5
            scaled = ((values - (c - 0.5)) / max(w - 1.0, 1e-6)) + 0.5
    out = (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if photometric == "MONOCHROME1":   # minimum value is white (C.7.6.3.1.2)
        out = 255 - out
    return out


def _fit(image: Image.Image, rows: int | None, columns: int | None) -> Image.Image:
    """Scale to fit within rows x columns, keeping the aspect ratio (up or down)."""
    if rows is None and columns is None:
        return image
    w, h = image.size
    scale = min(columns / w if columns else float("inf"), rows / h if rows else float("inf"))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample, reducing_gap=3.0 if scale < 0.5 else None)
