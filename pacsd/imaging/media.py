"""DICOM media: stored files as a ZIP holding a PS3.10 File-set with a DICOMDIR, streamed.

    zip_stream(paths) -> the ZIP's bytes, chunk by chunk (a WSGI body as it is)

The archive holds each stored Part 10 file unchanged (ZIP_STORED: pixel data barely compresses
and the CPU is better spent elsewhere), under a PS3.10 8.5 / PS3.3 F.3.2.2 File ID:
DICOM/PT000000/ST000000/SE000000/IM000000 (components of at most 8 characters from A-Z 0-9 _,
numbered in order of appearance, so no patient data in the names), and a DICOMDIR at its root
that lists them Patient -> Study -> Series -> Image (or SR DOCUMENT, PRESENTATION, KEY OBJECT
DOC...; PS3.3 F.4). The DICOMDIR comes last: it needs every file's header, and writing it first
would mean reading every header before the first byte goes out.

Written to an unseekable stream (sizes and CRC in data descriptors, zip64 when a member or the
archive needs it), one file at a time in CHUNK reads: memory is one chunk plus one small
directory record per instance, whatever the size of the pixel data.

The directory records are pydicom's (pydicom.fileset: record types by SOP Class, the attributes
of each record, offsets in the encoding); pacsd only keeps the record tree in dictionaries, since
FileSet.add() looks every instance up in a list (2000 instances take 25 s) and stages a copy of
each file on disk. That uses private members of FileSet, through
pacsd.compat.pydicom.DirectoryRecords; when the installed pydicom no longer fits
(DICOMDIR_RECORDS), the ZIP goes out with flat names and no DICOMDIR, after one WARNING.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from zipfile import ZIP_STORED, ZipFile, ZipInfo

from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.fileset import RecordNode, generate_filename

from pacsd.compat import pydicom as compat
from pacsd.imaging.header import read_full, read_header

log = logging.getLogger(__name__)

CHUNK = 1 << 20
FOLDER = "DICOM"        # File IDs start with it; the DICOMDIR sits next to it
DICOMDIR = "DICOMDIR"
UNLISTED = "UNLISTED"   # DICOM/UNLISTED/: files no directory record could be made for
DEFER = 256 * 1024      # header values larger than this are never read into memory

# Type 1 attributes of directory records (PS3.3 F.5) that stored files sometimes lack or leave
# empty. A record cannot be written without them, so, like DCMTK's `dcmmkdir --invent`, they
# are made up for the DICOMDIR only; the files themselves stay as stored. InstanceNumber is
# invented as the instance's position in the archive.
INVENTED = {
    "PatientID": "UNKNOWN",
    "StudyDate": "19000101",
    "StudyTime": "000000",
    "StudyID": "1",
    "Modality": "OT",
    "SeriesNumber": "0",
    "ContentDate": "19000101",
    "ContentTime": "000000",
    "PresentationCreationDate": "19000101",
    "PresentationCreationTime": "000000",
    "ContentLabel": "UNNAMED",
    "CompletionFlag": "PARTIAL",
    "VerificationFlag": "UNVERIFIED",
}


class _Sink:
    """The unseekable file zipfile writes into; the generator hands its bytes on."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        if data:
            self.parts.append(data)
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> list[bytes]:
        parts, self.parts = self.parts, []
        return parts


class Directory:
    """The DICOMDIR's record tree, grown one instance at a time; encoded by pydicom."""

    def __init__(self) -> None:
        self._fs = compat.DirectoryRecords()
        # (key of each record from the top down) -> its node: PatientID, Study Instance UID,
        # Series Instance UID, SOP Instance UID for the usual four levels.
        self._nodes: dict[tuple[str, ...], tuple[RecordNode, str]] = {}   # + File ID component
        self.count = 0
        self.invented = 0   # instances whose records needed made-up values

    def _records(self, ds: Dataset) -> list[Dataset]:
        records = self._recordify(ds)
        leaf = records[-1]
        if "ContentSequence" in leaf:
            # pydicom copies an SR's or KO's whole content tree; the record keeps only what
            # modifies the document title (PS3.3 F.5.21, F.5.22: HAS CONCEPT MOD items).
            mods = [item for item in leaf.ContentSequence
                    if item.get("RelationshipType") == "HAS CONCEPT MOD"]
            if mods:
                leaf.ContentSequence = mods
            else:
                del leaf.ContentSequence
        return records

    def _recordify(self, ds: Dataset) -> list[Dataset]:
        try:
            return self._fs.records(ds)
        except (ValueError, KeyError, AttributeError) as first:
            invented = {"InstanceNumber": str(self.count + 1), **INVENTED}
            missing = [kw for kw in invented if kw not in ds or ds[kw].VM == 0]
            for kw in missing:
                setattr(ds, kw, invented[kw])
            try:
                records = self._fs.records(ds)
            except (ValueError, KeyError, AttributeError):
                raise first from None
            self.invented += 1
            log.debug("DICOMDIR: values made up for instance %s among %s",
                      ds.get("SOPInstanceUID", "?"), ", ".join(missing))
            return records

    def add(self, ds: Dataset) -> str | None:
        """Add the records of one instance (its header is enough); return its File ID as a
        path ("DICOM/PT000000/ST000000/SE000000/IM000000"), or None if the File-set holds
        that SOP Instance already. Raises (pydicom's error) if no record can be made for it."""
        records = self._records(ds)
        parent: RecordNode = self._fs.root
        keys: tuple[str, ...] = ()
        components = [FOLDER]
        for record in records:
            node = RecordNode(record)
            keys += (node.key,)
            known = self._nodes.get(keys)
            if known is None:
                node.parent = parent   # appended: the numbering of earlier siblings holds
                known = self._nodes[keys] = (node, node.component)
            elif record is records[-1]:
                return None
            parent = known[0]
            components.append(known[1])
        self._fs.set_file_id(parent, components)
        self.count += 1
        return "/".join(components)

    def encode(self) -> bytes:
        """The DICOMDIR file (Part 10, Explicit VR Little Endian; PS3.10 8.6)."""
        return self._fs.encode()


def _member(name: str, size: int, mtime: float) -> ZipInfo:
    info = ZipInfo(name, date_time=time.localtime(max(mtime, 315532800))[:6])  # >= 1980
    info.compress_type = ZIP_STORED
    info.file_size = size   # zipfile decides on zip64 from this before writing the header
    info.external_attr = 0o644 << 16
    return info


Transform = Callable[[Dataset], Dataset]
Trailer = Callable[[], list[tuple[str, bytes]]]


def transformed(path: Path, transform: Transform) -> tuple[Dataset, bytes]:
    """The stored file read whole (within the pixel budget), passed through `transform` (a
    de-identification), and encoded again as a Part 10 file in its own transfer syntax."""
    ds = transform(read_full(path))
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return ds, buf.getvalue()


def zip_stream(paths: Iterable[Path], *, dicomdir: bool = True,
               transform: Transform | None = None,
               trailer: Trailer | None = None) -> Iterator[bytes]:
    """Yield a ZIP archive of the Part 10 files at `paths` (unchanged), named as a PS3.10
    File-set with, if `dicomdir`, a DICOMDIR listing them (else the names are flat:
    DICOM/IM000000, ...). With a DICOMDIR, a file named twice (same SOP Instance UID) goes in
    once, and one whose header yields no directory record goes in unlisted (DICOM/UNLISTED/).

    With `transform`, each file is read whole, one at a time, changed by it (a
    de-identification) and written again: memory is then one instance, twice, rather than a
    chunk. `trailer`, called once every file is in, names extra members for the end of the
    archive (a README.txt), before the DICOMDIR.

    Headers have gone out by the time a file turns out unreadable: the error is raised and
    the archive ends without its central directory, so the client sees it is incomplete."""
    if transform is not None:
        yield from _transformed_stream(paths, dicomdir, transform, trailer)
        return
    sink = _Sink()
    directory = Directory() if dicomdir and compat.DICOMDIR_RECORDS.fits else None
    flat_names = generate_filename(prefix="IM")
    unlisted_names = generate_filename(prefix="IM")
    with ZipFile(sink, "w", ZIP_STORED, allowZip64=True) as zf:   # type: ignore[call-overload]
        for path in paths:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if directory is None:
                    name: str | None = f"{FOLDER}/{next(flat_names)}"
                else:
                    try:
                        name = directory.add(read_header(f, defer_size=DEFER))
                    except Exception as e:  # noqa: BLE001 (whatever the header's fault is)
                        # The file is what was asked for: it goes in, outside the DICOMDIR.
                        log.warning("ZIP: no DICOMDIR record for stored file %s: %s", path, e)
                        name = f"{FOLDER}/{UNLISTED}/{next(unlisted_names)}"
                    f.seek(0)
                if name is None:
                    log.warning("ZIP: %s repeats an instance already in the archive", path)
                    continue
                with zf.open(_member(name, st.st_size, st.st_mtime), "w") as out:
                    yield from sink.take()
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        yield from sink.take()
            yield from sink.take()   # the data descriptor
        yield from _finish(zf, sink, directory, trailer)
    yield from sink.take()   # the central directory


def _transformed_stream(paths: Iterable[Path], dicomdir: bool, transform: Transform,
                        trailer: Trailer | None) -> Iterator[bytes]:
    sink = _Sink()
    directory = Directory() if dicomdir and compat.DICOMDIR_RECORDS.fits else None
    flat_names = generate_filename(prefix="IM")
    unlisted_names = generate_filename(prefix="IM")
    with ZipFile(sink, "w", ZIP_STORED, allowZip64=True) as zf:   # type: ignore[call-overload]
        for path in paths:
            ds, data = transformed(path, transform)
            if directory is None:
                name: str | None = f"{FOLDER}/{next(flat_names)}"
            else:
                try:   # after encoding: a record's made-up values stay out of the file
                    name = directory.add(ds)
                except Exception as e:  # noqa: BLE001 (whatever the header's fault is)
                    log.warning("ZIP: no DICOMDIR record for stored file %s: %s", path, e)
                    name = f"{FOLDER}/{UNLISTED}/{next(unlisted_names)}"
            del ds
            if name is None:
                log.warning("ZIP: %s repeats an instance already in the archive", path)
                continue
            with zf.open(_member(name, len(data), time.time()), "w") as out:
                yield from sink.take()
                for start in range(0, len(data), CHUNK):
                    out.write(data[start:start + CHUNK])
                    yield from sink.take()
            yield from sink.take()
        yield from _finish(zf, sink, directory, trailer)
    yield from sink.take()


def _finish(zf: ZipFile, sink: _Sink, directory: Directory | None,
            trailer: Trailer | None) -> Iterator[bytes]:
    """The trailer's members and the DICOMDIR, at the end of the archive."""
    for name, data in (trailer() if trailer is not None else []):
        with zf.open(_member(name, len(data), time.time()), "w") as out:
            out.write(data)
        yield from sink.take()
    if directory is not None:
        t0 = time.perf_counter()
        data = directory.encode()
        log.debug("DICOMDIR of %d instances: %d bytes in %.3f s", directory.count,
                  len(data), time.perf_counter() - t0)
        if directory.invented:
            log.info("DICOMDIR: %d of %d instances lack Type 1 values their directory "
                     "records need; made up (PS3.3 F.5)", directory.invented,
                     directory.count)
        with zf.open(_member(DICOMDIR, len(data), time.time()), "w") as out:
            out.write(data)
        yield from sink.take()


def write_folder(paths: Iterable[Path], dest: Path, *, transform: Transform | None = None,
                 trailer: Trailer | None = None) -> int:
    """The same File-set as zip_stream's, written as files under `dest` (an empty or new
    folder): DICOM/PT.../IM..., the trailer's members, then the DICOMDIR. Returns how many
    instances were written."""
    directory = Directory() if compat.DICOMDIR_RECORDS.fits else None
    flat_names = generate_filename(prefix="IM")
    unlisted_names = generate_filename(prefix="IM")
    written = 0
    for path in paths:
        if transform is not None:
            ds, data = transformed(path, transform)
        else:
            data = Path(path).read_bytes()
            ds = read_header(io.BytesIO(data), defer_size=DEFER)
        if directory is None:
            name: str | None = f"{FOLDER}/{next(flat_names)}"
        else:
            try:
                name = directory.add(ds)
            except Exception as e:  # noqa: BLE001 (whatever the header's fault is)
                log.warning("no DICOMDIR record for stored file %s: %s", path, e)
                name = f"{FOLDER}/{UNLISTED}/{next(unlisted_names)}"
        if name is None:
            continue
        _write(dest / name, data)
        written += 1
    for name, data in (trailer() if trailer is not None else []):
        _write(dest / name, data)
    if directory is not None:
        _write(dest / DICOMDIR, directory.encode())
    return written


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
