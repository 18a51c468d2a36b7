"""A stored file's data set as DICOM JSON (PS3.18 F.2), for WADO-RS metadata, with its bulk data
given as BulkDataURI (F.2.6); and where one bulk data element's bytes lie in the file, for the
bulk data resource that serves them (PS3.18 8.6, 8.7.3.3; the origin server names them).

Bulk data is Pixel Data, Waveform Data and any binary value (OB, OD, OF, OL, OV, OW, UN) longer
than THRESHOLD bytes. Its URI is the instance's URL + "/bulkdata/" + the attribute's path: its
tag, or for an attribute inside sequences "SEQTAG/ITEM/.../TAG" (items counted from 0). The
instance's URL depends on how the client reached us, so the JSON holds INSTANCE in its place
(a character no URL has), for the web side to put in: what is built here can be cached.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacsd.errors import PacsError
from pacsd.imaging.header import read_file_header, read_header

THRESHOLD = 1024
INSTANCE = "\x01"   # stands for the instance's URL in the BulkDataURIs built here
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
PIXEL_DATA, WAVEFORM_DATA = 0x7FE00010, 0x54001010
MAX_DEPTH = 8   # sequences inside sequences a bulk data path may go through
_PATH = re.compile(r"[0-9A-Fa-f]{8}(/\d{1,6}/[0-9A-Fa-f]{8}){0,%d}" % MAX_DEPTH)

Steps = tuple[int, ...]   # tag, or seq tag, item, ..., tag


class NoSuchBulkData(PacsError):
    """A bulk data path that names no bulk data element of the instance."""

    http_status = 404


def _vr(raw: Any) -> str:
    vr = raw.VR
    if vr is None:   # implicit VR, not yet converted
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            vr = "UN"
    return str(vr).split(" ")[0]


def _length(raw: Any) -> int:
    length = getattr(raw, "length", None)
    if length is None:
        value = raw.value
        length = len(value) if isinstance(value, (bytes, bytearray)) else 0
    return int(length)


def _is_bulk(tag: int, vr: str, length: int) -> bool:
    return vr in BULK_VRS and (length > THRESHOLD or (tag == WAVEFORM_DATA and length > 0))


def _take_bulk(ds: Dataset, prefix: Steps, found: list[tuple[Steps, str]]) -> None:
    """Remove the bulk data elements of `ds` (never read from disk), at any depth, noting the
    path and VR of each."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = _vr(raw)
        if _is_bulk(int(tag), vr, _length(raw)):
            del ds[tag]
            found.append((prefix + (int(tag),), vr))
        elif vr == "SQ":
            for i, item in enumerate(ds[tag].value or []):
                _take_bulk(item, prefix + (int(tag), i), found)


def without_empty_values(obj: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON with no "Value" on an attribute that has none (PS3.18 F.2.5: an empty
    attribute carries only its "vr"); pydicom writes an empty sequence as "Value": []. In place,
    at any depth; returns `obj`."""
    for attr in obj.values():
        value = attr.get("Value")
        if value is None:
            continue
        if not value or value in ([None], [""]):
            del attr["Value"]
        elif attr.get("vr") == "SQ":
            for item in value:
                if isinstance(item, dict):
                    without_empty_values(item)
    return obj


def path_text(steps: Steps) -> str:
    return "/".join(f"{s:08X}" if i % 2 == 0 else str(s) for i, s in enumerate(steps))


def parse_path(text: str) -> Steps:
    """The steps of a bulk data path as this module writes them; ValueError if it is not one."""
    if not _PATH.fullmatch(text):
        raise ValueError(f"{text[:80]!r} is not a bulk data path (TAG or SEQTAG/ITEM/TAG...)")
    return tuple(int(s, 16) if i % 2 == 0 else int(s) for i, s in enumerate(text.split("/")))


def _pixel_data_vr(f: BinaryIO, ts: UID, ds: Dataset) -> str | None:
    """The VR of the file's Pixel Data (`f` just read up to it), or None when it has none."""
    if ts.is_deflated:   # no seeking in a deflated stream: an image has pixels (PS3.5 A.5)
        return "OW" if "Rows" in ds else None
    head = f.read(8)
    fmt = "<" if ts.is_little_endian else ">"
    if len(head) < 8 or struct.unpack(fmt + "HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if ts.is_implicit_VR:
        return "OW"
    return head[4:6].decode("ascii", "replace")


def metadata_json(path: Path, ts: str) -> dict[str, Any]:
    """The stored file's data set as DICOM JSON, its bulk data as BulkDataURI (INSTANCE standing
    for the instance's URL), and AvailableTransferSyntaxUID (0008,3002) the stored syntax."""
    uid = UID(ts)
    with open(path, "rb") as f:
        ds = read_header(f, defer_size=THRESHOLD)   # a deflated one: inflated that far only
        pixels = _pixel_data_vr(f, uid, ds)          # what follows the header
    bulk: list[tuple[Steps, str]] = []
    _take_bulk(ds, (), bulk)
    ds.add_new(0x00083002, "UI", ts)
    out = without_empty_values(ds.to_json_dict(suppress_invalid_tags=True))
    if pixels is not None:
        bulk.append(((PIXEL_DATA,), pixels))
    touched: list[dict[str, Any]] = []
    for steps, vr in bulk:
        node = out
        for i in range(0, len(steps) - 1, 2):
            node = node[f"{steps[i]:08X}"]["Value"][steps[i + 1]]
        node[f"{steps[-1]:08X}"] = {"vr": vr,
                                    "BulkDataURI": f"{INSTANCE}/bulkdata/{path_text(steps)}"}
        touched.append(node)
    for node in touched:   # in tag order again, as the rest
        items = sorted(node.items())
        node.clear()
        node.update(items)
    return out


def bulk_element(path: Path, ts: str, steps: Steps) -> tuple[str, int, int, bytes | None]:
    """Where the bulk data element at `steps` is: (VR, offset in the file, length, None) for a
    value left on disk, or (VR, 0, length, the bytes) for one read with the header (inside a
    sequence, or in a deflated file). Pixel Data is not served from here (see frames)."""
    ds = read_file_header(path, defer_size=THRESHOLD)
    node: Dataset = ds
    for i in range(0, len(steps) - 1, 2):
        elem = node.get(steps[i])
        items = elem.value if elem is not None and elem.VR == "SQ" else None
        if not items or steps[i + 1] >= len(items):
            raise NoSuchBulkData(f"no item {steps[i + 1]} in ({steps[i]:08X})")
        node = items[steps[i + 1]]
    raw = node.get_item(steps[-1]) if steps[-1] in node else None
    if raw is None:
        raise NoSuchBulkData(f"the instance has no ({steps[-1]:08X}) there")
    vr = _vr(raw)
    length = _length(raw)
    if not _is_bulk(steps[-1], vr, length):
        raise NoSuchBulkData(f"({steps[-1]:08X}) is not bulk data: its value is in the metadata")
    tell = getattr(raw, "value_tell", None)   # a RawDataElement's: where its value lies
    if raw.value is None and not UID(ts).is_deflated:
        if tell is None or tell + length > os.path.getsize(path):
            raise NoSuchBulkData(f"({steps[-1]:08X}) lies beyond the end of the stored file")
        return vr, int(tell), length, None
    value = node[steps[-1]].value
    if not isinstance(value, (bytes, bytearray)):
        raise NoSuchBulkData(f"({steps[-1]:08X}) has no bytes to serve")
    return vr, 0, len(value), bytes(value)


def little_endian(chunks: Iterator[bytes], vr: str, little: bool) -> Iterator[bytes]:
    """Bulk data goes out little endian (PS3.18 8.7.3.3.2): words of a big endian file swapped,
    by the VR's word size. Chunks must be whole words (the callers' are multiples of 8)."""
    size = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}.get(vr, 1)
    if little or size == 1:
        yield from chunks
        return
    import numpy as np
    for chunk in chunks:
        yield np.frombuffer(chunk, f">u{size}").astype(f"<u{size}").tobytes()
