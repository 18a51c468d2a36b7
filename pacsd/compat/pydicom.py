"""What pacsd does with pydicom's internals, each behind one name, each checked.

- `DirectoryRecords`: a pydicom FileSet used only to make directory records and to encode a
  DICOMDIR from a record tree we grow ourselves (pacsd.imaging.media). FileSet.add() looks
  every instance up in a list (2000 instances take 25 s) and stages a copy of each file on
  disk; its private `_recordify`, `_tree`, `_write_dicomdir` and RecordNode's `_record` do the
  part we need. DICOMDIR_RECORDS checks them; when they no longer fit, ZIP downloads go out
  without a DICOMDIR (flat names), after one WARNING.
- `read_file_meta(fp)`: the File Meta group of a Part 10 stream (STOW-RS parts), with pydicom's
  private `_read_file_meta_info`, or its public `read_dataset` when that is gone.
- `add_decoder_plugin(decoder, label, import_path)`: a pixel data decoding plugin added once
  (pacsd.imaging.jpeg12), looking at the decoder's private `_available` / `_unavailable`.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileSet, RecordNode

from pacsd.compat.patch import Misfit, Patch, need_attr, need_params, need_source

# --- DICOMDIR records -----------------------------------------------------------------------------


def _probe_records() -> None:
    need_attr(FileSet, "_recordify")
    need_params(FileSet._recordify, ("self", "ds"), "FileSet._recordify")
    need_attr(FileSet, "_write_dicomdir")
    need_params(FileSet._write_dicomdir, ("self", "fp"), "FileSet._write_dicomdir")
    # Looked at in the source: a FileSet() would make a staging folder.
    need_source(FileSet.__init__, ("self._tree = RootNode(self)",), "FileSet.__init__")
    need_source(RecordNode, ("self._record = ",), "RecordNode")
    for name in ("key", "component", "parent"):
        need_attr(RecordNode, name)


DICOMDIR_RECORDS = Patch("pydicom.dicomdir_records", "speed", "pydicom",
                         "DICOMDIRs are made from a record tree grown in dictionaries",
                         "ZIP downloads go out without a DICOMDIR (files named DICOM/IM...)",
                         _probe_records)


class DirectoryRecords:
    """pydicom's directory records and DICOMDIR encoding, without FileSet.add()."""

    def __init__(self) -> None:
        self._fs = FileSet()

    def records(self, ds: Dataset) -> list[Dataset]:
        """The directory records of one instance, from the top (PATIENT) down (pydicom's
        record types by SOP Class, PS3.3 F.4 / F.5). Raises pydicom's error if it can make
        none."""
        return list(self._fs._recordify(ds))

    @property
    def root(self) -> RecordNode:
        """The root of the record tree the DICOMDIR is encoded from."""
        return self._fs._tree

    @staticmethod
    def set_file_id(node: RecordNode, components: list[str]) -> None:
        """Set the Referenced File ID of a (leaf) node's record."""
        node._record.ReferencedFileID = components

    def encode(self) -> bytes:
        """The DICOMDIR file (Part 10, Explicit VR Little Endian; PS3.10 8.6)."""
        buffer = io.BytesIO()   # pydicom seeks back to fill in the root offsets
        self._fs._write_dicomdir(DicomFileLike(buffer))
        return buffer.getvalue()


# --- the File Meta group of a stream --------------------------------------------------------------

def _probe_meta() -> None:
    from pydicom import filereader
    need_attr(filereader, "_read_file_meta_info", "pydicom.filereader")
    need_params(filereader._read_file_meta_info, ("fp",), "_read_file_meta_info")


FILE_META = Patch("pydicom.read_file_meta", "speed", "pydicom",
                  "the File Meta group of a STOW-RS part is read with pydicom's own reader",
                  "it is read with pydicom's read_dataset up to group 0002's end", _probe_meta)


def _not_meta(tag: Any, vr: Any, length: int) -> bool:
    return bool(tag >> 16 != 0x0002)


def read_file_meta(fp: BinaryIO) -> FileMetaDataset:
    """The File Meta group (0002,eeee) at `fp`'s position (just after the preamble); `fp` is
    left at the start of the data set."""
    if FILE_META.fits:
        from pydicom.filereader import _read_file_meta_info
        return _read_file_meta_info(fp)
    from pydicom.filereader import read_dataset
    return FileMetaDataset(read_dataset(fp, False, True, stop_when=_not_meta))


# --- pixel data decoding plugins --------------------------------------------------------------------

def _probe_plugins() -> None:
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder as dec
    for name in ("_available", "_unavailable"):
        if not isinstance(getattr(dec, name, None), dict):
            raise Misfit(f"Decoder.{name} (no longer a dict of plugins)")
    need_params(dec.add_plugin, ("label", "import_path"), "Decoder.add_plugin")


PLUGINS = Patch("pydicom.add_decoder_plugin", "speed", "pydicom",
                "our decoding plugins are added once, unless pydicom has them already",
                "plugins are added through add_plugin alone (a second add is refused there)",
                _probe_plugins)


def add_decoder_plugin(decoder: Any, label: str, import_path: tuple[str, str]) -> None:
    """Add a decoding plugin to a pydicom Decoder unless it has one of that label already
    (available or not). Not thread-safe, as pydicom's add_plugin: call at import."""
    if PLUGINS.fits:
        if label not in decoder._available and label not in decoder._unavailable:
            decoder.add_plugin(label, import_path)
        return
    try:
        decoder.add_plugin(label, import_path)
    except ValueError as e:
        if "already has a plugin" not in str(e):
            raise


PATCHES: list[Patch] = [DICOMDIR_RECORDS, FILE_META, PLUGINS]
