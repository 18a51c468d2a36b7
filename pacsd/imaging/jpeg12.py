"""A pydicom decoding plugin for JPEG Extended with 12-bit samples (1.2.840.10008.1.2.4.51).

GDCM and Pillow, pydicom's other BSD/MIT-licensed decoders, cannot decode 12-bit lossy JPEG;
the libjpeg-turbo inside imagecodecs (BSD) can. `register()` adds it after pydicom's own
plugins, so it is tried only when they fail. The module follows pydicom's plugin interface
(`is_available`, `DECODER_DEPENDENCIES`, a frame decoder).
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import JPEGExtended12Bit

DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("numpy", "imagecodecs")}
LABEL = "imagecodecs"

try:
    import imagecodecs
    HAVE_IMAGECODECS = hasattr(imagecodecs, "jpeg8_decode")
except ImportError:   # optional at run time: without it such images cannot be rendered
    HAVE_IMAGECODECS = False


def is_available(uid: str) -> bool:
    return HAVE_IMAGECODECS and uid in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner: Any) -> bytes:
    """One encoded frame -> its samples as native little-endian bytes."""
    arr = imagecodecs.jpeg8_decode(src)
    if runner.samples_per_pixel != 1:
        # libjpeg-turbo has already converted YCbCr to RGB.
        runner.set_option("photometric_interpretation", "RGB")
    dtype = "<u2" if runner.bits_allocated > 8 else "u1"
    return bytes(arr.astype(dtype, copy=False).tobytes())


def register() -> None:
    """Add the plugin to pydicom's JPEG decoders once (not thread-safe: call at import)."""
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder

    from pacsd.compat.pydicom import add_decoder_plugin
    add_decoder_plugin(JPEGExtended12BitDecoder, LABEL, (__name__, "decode_frame"))
