"""Lossless compression at rest ([[compression]] rules, none by default): stored uncompressed
images (Explicit or Implicit VR Little Endian) are re-encoded as JPEG-LS Lossless (CharLS,
through imagecodecs) in the background, one node of several (a lease), a bounded share of the
time. Each new file is decoded again by pydicom (GDCM) and must give exactly the pixels of the
original before it replaces it; anything else (float or unusual pixel data, a mismatch) is
left as stored, with one log line. Replacing is a revision like a correction's (new file
durable, then one index transaction), without keeping the previous version: the pixels were
proven identical and nothing else changed. What leaves pacsd is the stored syntax when the peer
accepts it, else decoded, as for any compressed image (pacsd.imaging.transcode).

A kill at any point leaves each instance in one version: before the commit, the new file is a
second copy of an indexed instance, removed at the next start; after it, the old file is, too.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from io import BytesIO

import numpy
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEGLSLossless)

from pacsd.config import Compression
from pacsd.imaging.header import check_and_extract, file_meta_bytes, read_dataset_header
from pacsd.errors import InvalidDataset
from pacsd.storage.archive import Archive, file_content_hash
from pacsd.storage.background import LeasedJob

log = logging.getLogger(__name__)

FROM = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
TARGET = JPEGLSLossless
BATCH = 20


class NotCompressible(Exception):
    """An image this compression leaves as stored (and why)."""


@dataclass
class Pass:
    compressed: int = 0
    skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0


def jpeg_ls(path: str) -> bytes:
    """The stored file as a JPEG-LS Lossless data set (no File Meta group), verified: decoded
    again it gives the very pixels of the original. Raises NotCompressible."""
    import imagecodecs   # only here: the watchdog imports pacsd modules without it
    ds = dcmread(path)
    if str(ds.file_meta.TransferSyntaxUID) not in FROM or "PixelData" not in ds:
        raise NotCompressible("not uncompressed pixel data")
    bits, samples = int(ds.get("BitsAllocated", 0)), int(ds.get("SamplesPerPixel", 1))
    if bits not in (8, 16) or samples not in (1, 3):
        raise NotCompressible(f"{bits}-bit, {samples}-sample pixels")
    original = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stack = original if frames > 1 else original[numpy.newaxis]
    unsigned = numpy.uint8 if bits == 8 else numpy.uint16
    try:
        # Signed values are coded as their bit patterns (the stream's precision is the
        # container's); the decode below proves they come back.
        encoded = [bytes(imagecodecs.jpegls_encode(numpy.ascontiguousarray(f).view(unsigned),
                                                   level=0)) for f in stack]
    except Exception as e:  # noqa: BLE001 - whatever the codec says: left as stored
        raise NotCompressible(f"the encoder refused it ({e})") from None
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = TARGET
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    body = fp.getvalue()
    again = dcmread(BytesIO(file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                            str(TARGET)) + body))
    try:
        decoded = again.pixel_array
    except Exception as e:  # noqa: BLE001 - cannot be read back here: not kept
        raise NotCompressible(f"the compressed copy cannot be decoded here ({e})") from None
    if decoded.dtype != original.dtype or not numpy.array_equal(decoded, original):
        raise NotCompressible("the compressed copy does not decode to the same pixels")
    return body


class Compressor(LeasedJob):
    """The background re-encoding: every TICK seconds, for at most WORK seconds, the next
    images the rules take."""

    TICK = 10.0
    WORK = 2.0
    LEASE = "compress"

    def __init__(self, archive: Archive, rules: tuple[Compression, ...]) -> None:
        super().__init__(archive.index)
        self.archive, self.rules = archive, rules
        self.store = archive.store
        self.total = Pass()

    def run_once(self, seconds: float) -> Pass:
        """Compress for about `seconds` (at least one batch); what was done."""
        done = Pass()
        until = time.monotonic() + seconds
        for rule in self.rules:
            key = f"compress:{rule.name}"
            cursor = int(self.index.cursor(key) or 0)
            before = time.strftime("%Y-%m-%d %H:%M:%S",
                                   time.localtime(time.time() - rule.older_than_days * 86400))
            while not self._stop.is_set():
                items = self.index.compressible(before, rule.modalities, cursor, FROM, BATCH)
                if not items:
                    self.index.set_cursor(key, 0.0)   # the next pass starts over
                    break
                self._batch(items, rule, done)
                cursor = items[-1][0]
                self.index.set_cursor(key, float(cursor))
                if time.monotonic() >= until:
                    break
        self.total.compressed += done.compressed
        self.total.skipped += done.skipped
        self.total.bytes_before += done.bytes_before
        self.total.bytes_after += done.bytes_after
        if done.compressed:
            log.info("compressed %d stored image(s) losslessly (JPEG-LS): %.1f MB -> %.1f MB",
                     done.compressed, done.bytes_before / 1e6, done.bytes_after / 1e6)
        return done

    def _batch(self, items: list[tuple[int, str, str, str]], rule: Compression,
               done: Pass) -> None:
        written: list[tuple] = []
        began = time.perf_counter()
        try:
            for _, sop, rel, content_hash in items:
                path = self.store.placed(rel)
                try:
                    if content_hash and file_content_hash(path) != content_hash:
                        raise NotCompressible("its file is not what was stored (see `pacsd "
                                              "verify`)")
                    body = jpeg_ls(str(path))
                except (NotCompressible, InvalidDataset) as e:
                    done.skipped += 1
                    log.info("SOP Instance %s left uncompressed: %s", sop, e)
                    continue
                except OSError as e:
                    done.skipped += 1
                    log.warning("SOP Instance %s not compressed: its file cannot be read (%s)",
                                sop, e)
                    continue
                record = check_and_extract(read_dataset_header(body, str(TARGET)))
                new = self.archive.begin_file(record.values["sop_class_uid"], sop, str(TARGET),
                                              "")
                new.add(body)
                finishing = new.finishing()
                new.keep()
                new_rel, size = finishing.result()
                done.bytes_before += path.stat().st_size
                done.bytes_after += size
                written.append((sop, new_rel, size, str(TARGET), record,
                                hashlib.sha256(body).hexdigest()))
            if not written:
                return
            _, previous = self.index.revise(
                written, who="compression", action="compress", level="IMAGE",
                uid=written[0][0], study_uid="", keep_previous=False,
                detail={"rule": rule.name, "instances": len(written),
                        "syntax": str(UID(TARGET).name)})
        except BaseException:
            for _, new_rel, *_rest in written:
                self.store.delete(new_rel)
            raise
        for rel in previous:
            self.store.delete(rel)
        done.compressed += len(written)
        done.seconds += time.perf_counter() - began

