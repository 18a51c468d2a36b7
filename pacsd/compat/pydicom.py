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
- `remember_uid_checks()`: the UI validator in pydicom's `valuerep.VALIDATORS` and
  `UID.is_valid` answer from a bounded memo. pynetdicom makes and checks a UID (a regular
  expression each time) for every UID of an A-ASSOCIATE-RQ, several times over: a getscu that
  proposes every storage class paid a fifth of its association's CPU for it.
"""

from __future__ import annotations

import functools
import io
import re
import threading
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


# --- UID checks, remembered ------------------------------------------------------------------------

UID_MEMO_SIZE = 4096   # distinct UIDs remembered (a peer's random UIDs only push old ones out)


def _probe_uid_checks() -> None:
    from pydicom import valuerep
    from pydicom.uid import UID
    validators = getattr(valuerep, "VALIDATORS", None)
    if not isinstance(validators, dict) or not callable(validators.get("UI")):
        raise Misfit("valuerep.VALIDATORS (no UI validator in a dict)")
    validator = getattr(validators["UI"], "pacsd_original", validators["UI"])
    need_params(validator, ("vr", "value"), "the UI validator")
    if not isinstance(UID.__dict__.get("is_valid"), property):
        raise Misfit("UID.is_valid (no longer a property)")
    fget = UID.__dict__["is_valid"].fget
    need_source(getattr(fget, "pacsd_original", fget), ("re.match(RE_VALID_UID, self)",),
                "UID.is_valid")


UID_CHECKS = Patch("pydicom.remember_uid_checks", "speed", "pydicom",
                   "UID checks are remembered (the last 4096 UIDs)",
                   "each UID is checked with its regular expression every time", _probe_uid_checks)


def _memo_validator(validator: Any) -> Any:
    @functools.lru_cache(maxsize=UID_MEMO_SIZE)
    def remembered(value: str | bytes) -> tuple[bool, str]:
        return validator("UI", value)

    def validate(vr: str, value: Any) -> tuple[bool, str]:
        if vr == "UI" and type(value) in (str, bytes):   # a UID (str subclass) is hashed as str
            return remembered(value)
        if vr == "UI" and isinstance(value, str):
            return remembered(str.__str__(value))
        return validator(vr, value)

    validate.pacsd_original = validator  # type: ignore[attr-defined]
    return validate


@functools.lru_cache(maxsize=UID_MEMO_SIZE)
def _uid_is_valid(value: str) -> bool:
    from pydicom.uid import RE_VALID_UID
    return len(value) <= 64 and re.match(RE_VALID_UID, value) is not None   # as UID.is_valid


_remember_lock = threading.Lock()


def remember_uid_checks() -> bool:
    """Install the memo (once per process; idempotent). Whether it is in place."""
    if not UID_CHECKS.fits:
        return False
    from pydicom import valuerep
    from pydicom.uid import UID
    with _remember_lock:
        if not hasattr(valuerep.VALIDATORS["UI"], "pacsd_original"):
            valuerep.VALIDATORS["UI"] = _memo_validator(valuerep.VALIDATORS["UI"])
        original = UID.__dict__["is_valid"].fget
        if not hasattr(original, "pacsd_original"):
            def is_valid(self: UID) -> bool:
                return _uid_is_valid(str.__str__(self))
            is_valid.pacsd_original = original  # type: ignore[attr-defined]
            is_valid.__doc__ = original.__doc__
            UID.is_valid = property(is_valid)  # type: ignore[method-assign,assignment]
    return True


PATCHES: list[Patch] = [DICOMDIR_RECORDS, FILE_META, PLUGINS, UID_CHECKS]
