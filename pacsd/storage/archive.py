"""The archive: store (files) + index (rows), and the one protocol that makes an image durable.

    parse the header -> validate -> write the file durably  \
                                 -> commit its index row     / -> both durable: return

Every way in (C-STORE, import, STOW-RS) goes through `Archive.put`, so "Success only once
the file and its row are durable" is written once. Also here: recovery of what a crash left
half done (files without rows, rows without files), rebuilding the index from the files, and
deleting (into the recycle bin, pacsd.storage.trash).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.dsutils import split_dataset

from pacsd.dicom_status import SUCCESS, WARNING_COERCION
from pacsd.errors import (ContentConflict, IndexUnavailable, InvalidDataset, PacsError,
                          StillWriting, StudyMismatch)
from pacsd.config import LabelRule
from pacsd.imaging.header import (PIXEL_DATA, Record, check_and_extract, file_meta_bytes, is_valid_uid,
                          read_dataset_header, read_header)
from pacsd.imaging.rules import dataset_values, matches
from pacsd.index import Added, Index
from pacsd.storage.store import NewFile, Store
from pacsd.storage.trash import Bin, binned_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    sop_instance_uid: str
    path: str
    duplicate: bool = False
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    # A DICOM warning status (0xB000) when stored with a reservation, and why (no patient data)
    warning: int = 0
    comment: str = ""


KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
# The document titles of IHE IOCM rejection notes (CID 7011, DCM codes).
REJECTION_TITLES = {("DCM", "113001"): "Rejected for Quality Reasons",
                    ("DCM", "113037"): "Rejected for Patient Safety Reasons",
                    ("DCM", "113038"): "Incorrect Modality Worklist Entry",
                    ("DCM", "113039"): "Data Retention Policy Expired"}

# Given the header of an instance being stored and its calling AE title: the routing jobs
# ((route, destination) pairs) to queue with its row (pacsd.nodes.routing.Router.for_instance).
RoutesFor = Callable[[Dataset, str], list[tuple[str, str]]]
# Told of each instance once it is durable (hooks' on_instance_stored); must not block.
OnStored = Callable[["Stored", Dataset, str], None]


def file_content_hash(path: Path) -> str:
    """SHA-256 of a stored Part 10 file's data set (the bytes after its File Meta group)."""
    try:
        _meta, offset = split_dataset(path)
    except (InvalidDicomError, AttributeError, ValueError, EOFError, KeyError) as e:
        raise InvalidDataset(f"not a DICOM Part 10 file ({e})") from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# Decoded pixel bytes at most, per copy, when comparing two copies in different transfer syntaxes
# (larger: they count as different, the safe side).
COMPARE_LIMIT = 256 * 2**20
_PADDING = 0xFFFCFFFC   # Data Set Trailing Padding (PS3.5 7.6): not content


def same_decoded(stored: Path, dataset: bytes, transfer_syntax: str, record: Record) -> bool:
    """Whether a stored file and a received data set in another transfer syntax hold the same
    attributes and the same decoded pixels (a lossless re-encoding). Any doubt: False."""
    import numpy   # only here: the watchdog imports pacsd modules without numpy
    v = record.values
    frames = v.get("number_of_frames") or 1
    if (v.get("rows") or 0) * (v.get("columns") or 0) * frames * 3 * 2 > COMPARE_LIMIT:
        return False
    try:
        a = dcmread(stored)
        b = dcmread(io.BytesIO(file_meta_bytes(v["sop_class_uid"], record.sop_instance_uid,
                                               transfer_syntax) + dataset))
        tags = ({e.tag for e in a} | {e.tag for e in b}) - {PIXEL_DATA, _PADDING}
        if any(t not in a or t not in b or a[t].value != b[t].value for t in tags):
            return False
        if (PIXEL_DATA in a) != (PIXEL_DATA in b):
            return False
        return PIXEL_DATA not in a or bool(numpy.array_equal(a.pixel_array, b.pixel_array))
    except Exception as e:  # noqa: BLE001 - undecodable either side: not shown to be the same
        log.debug("comparing %s with its copy in %s failed: %s", record.sop_instance_uid,
                  transfer_syntax, e)
        return False


COMMANDS_DIR = ".commands"   # DATA/.commands/<pid>: a command changing the archive is running


def command_started(data: Path) -> Path:
    """Mark a command (a correction, a restore) as changing the archive, from now: if it is
    killed, the next server start checks what it may have left half done (recover)."""
    folder = data / COMMANDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / str(os.getpid())
    mark.write_text(f"{time.time()}\n")
    return mark


def interrupted_commands(data: Path) -> tuple[float | None, list[Path]]:
    """When the earliest command that was killed while changing the archive began (None: none
    was), and their marks (removed once recovered)."""
    since, marks = None, []
    try:
        entries = list(os.scandir(data / COMMANDS_DIR))
    except OSError:
        return None, []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            os.kill(int(entry.name), 0)
            continue   # still running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            began = float(Path(entry.path).read_text().strip() or 0)
        except (OSError, ValueError):
            began = 0.0
        since = began if since is None else min(since, began)
        marks.append(Path(entry.path))
    return since, marks


class Archive:
    def __init__(self, store: Store, index: Index, overwrite: bool = False,
                 patient_mismatch: str = "refuse", on_conflict: str = "refuse",
                 overlap: bool = True, trash_days: int = 30,
                 rejection_notes: str = "ignore") -> None:
        self.store = store
        self.index = index
        self.bin = Bin(store, index, trash_days)   # where deletions go
        self.rejection_notes = rejection_notes == "bin"   # IOCM: what they name, to the bin
        self.overwrite = overwrite
        # Commit a row while its file is still being synced and placed (put): for a server,
        # whose next start after a crash removes a row left without its file (recover).
        self.overlap = overlap
        # "refuse": an instance whose study (or series) is filed under another patient (or
        # study) is refused; "accept": filed there with a warning status and a WARNING line.
        self.refuse_mismatch = patient_mismatch != "accept"
        # A stored SOP Instance UID sent again with other content: "refuse" (0x0111) or
        # "success" (the answer of earlier versions, for senders that stop a whole batch at
        # any failure); either way the new copy is kept aside, logged, and not committed.
        self.refuse_conflict = on_conflict != "success"
        self.routes_for: RoutesFor | None = None   # set by the daemon when [[routes]] exist
        self.on_stored: OnStored | None = None
        # [[labels]]: what each stored instance's study is labelled with (set by the daemon).
        self.label_rules: tuple[LabelRule, ...] = ()

    def begin_file(self, sop_class: str, sop_instance: str, transfer_syntax: str,
                   calling_aet: str) -> NewFile:
        """A new file, its File Meta group written, for `put(written=)`: the caller adds the
        data set's bytes as they arrive (the fast lane, pacsd.dimse.fast). UIDs unchecked
        here: put() refuses the file if they are bad."""
        written = self.store.begin()
        written.add(file_meta_bytes(sop_class, sop_instance, transfer_syntax, calling_aet))
        return written

    def put(self, dataset: bytes, *, transfer_syntax: str, sop_class: str | None = None,
            sop_instance: str | None = None, calling_aet: str = "",
            study: str | None = None, written: NewFile | None = None) -> Stored:
        """Durably keep an encoded data set (the bytes after the File Meta group, exactly as
        received); `study`, when given, is the study it must belong to. `written`: the file
        (begin_file) already holding these bytes. Raises a PacsError subclass; on any error
        nothing is left behind.

        When the request names its UIDs, the file is written and made durable while the
        data set is checked (the checks decide only whether it is kept); its row is committed
        while the file is synced and placed, and this returns once both are durable."""
        finishing: Future[tuple[str, int]] | None = None
        try:
            for label, uid in (("SOP Class", sop_class), ("SOP Instance", sop_instance),
                               ("Transfer Syntax", transfer_syntax)):
                if uid is not None and not is_valid_uid(uid):
                    raise InvalidDataset(f"{label} UID {uid[:80]!r} is not a valid UID "
                                         "(PS3.5 9.1)")
            if written is None and sop_class is not None and sop_instance is not None:
                written = self.begin_file(sop_class, sop_instance, transfer_syntax,
                                          calling_aet)
                written.add(dataset)
            if written is not None:
                finishing = written.finishing()
            header = read_dataset_header(dataset, transfer_syntax)
            record = check_and_extract(header, sop_class=sop_class, sop_instance=sop_instance)
            if study is not None and record.values["study_instance_uid"] != study:
                raise StudyMismatch(f"the instance is of study "
                                    f"{record.values['study_instance_uid']}, not {study[:80]}")
            if finishing is None:
                # The File Meta group takes the UIDs checked above: the request's, which the
                # data set agrees with, or (import without them) the data set's own.
                written = self.begin_file(record.values["sop_class_uid"],
                                          record.sop_instance_uid, transfer_syntax, calling_aet)
                written.add(dataset)
                finishing = written.finishing()
            uids = (record.values["study_instance_uid"], record.values["series_instance_uid"])
            routes = self.routes_for(header, calling_aet) if self.routes_for else []
            labels = [r.label for r in self.label_rules
                      if matches(r, dataset_values(header, (k for k, _ in r.match)),
                                 [calling_aet])]
            # The content, as every receiver of these bytes would hash them (the File Meta
            # group, which each rewrites, left out); SHA-256 runs at over 1 GB/s and releases
            # the GIL.
            content_hash = hashlib.sha256(dataset).hexdigest()
        except BaseException:
            self._forget(finishing, written)
            raise
        assert written is not None and finishing is not None
        written.keep()
        index_args = dict(transfer_syntax=transfer_syntax, calling_aet=calling_aet,
                          overwrite=self.overwrite, routes=routes, content_hash=content_hash,
                          refuse_mismatch=self.refuse_mismatch, labels=labels)
        if self.overwrite or routes or not self.overlap:
            # The row only once the file is durable: an overwrite's row replaces an
            # acknowledged copy's, a route's job may send the file at once, and a command
            # (import) has no next start that would settle a crash in between.
            rel, size = finishing.result()   # durable (or StorageFull, OutOfResources)
            added = self._index(record, rel, size, index_args, finishing=None)
        else:
            # The row is committed while the file is synced and renamed into place (a fifth
            # of a stored image's time over one association): Success still waits for both.
            # A crash in between leaves a row without its file, of an image never
            # acknowledged: the next start removes it (recover). Readers and re-sends of the
            # same instance wait for a file still being placed (Store.placed).
            added = self._index(record, written.rel, written.size, index_args, finishing)
            try:
                rel, size = finishing.result()
            except BaseException:
                if not added.duplicate:
                    self._unindex(record.sop_instance_uid, written.rel)
                raise
        if added.duplicate:
            if self._same_content(added, record, content_hash, dataset, transfer_syntax):
                if not self._stored_copy_in_place(added, record, rel, size, transfer_syntax,
                                                  calling_aet):
                    return Stored(record.sop_instance_uid, rel, False, *uids)   # ours now
                self.store.delete(rel)
                log.info("duplicate SOP Instance %s from %s: the same content as the stored "
                         "copy, kept once", record.sop_instance_uid, calling_aet or "import")
                return Stored(record.sop_instance_uid, "", True, *uids)
            try:
                self._conflict(record, rel, content_hash, added, transfer_syntax, calling_aet)
            except ContentConflict as e:
                if self.refuse_conflict:
                    raise
                log.warning("SOP Instance %s from %s answered Success ([storage] on_conflict = "
                            "\"success\"), though %s", record.sop_instance_uid,
                            calling_aet or "import", e)
                return Stored(record.sop_instance_uid, "", True, *uids)
        if added.replaced_path:   # the replaced copy: a previous version, in the bin
            self.store.move([(added.replaced_path, binned_path(added.replaced_path))])
            log.info("SOP Instance %s from %s replaced the stored copy (kept in the recycle "
                     "bin)", record.sop_instance_uid, calling_aet or "import")
        warning, comment = SUCCESS, ""
        if added.misfiled:
            # Coercion of Data Elements (PS3.4 B.2.3): as the archive reports it (C-FIND,
            # QIDO-RS), the instance's patient or study is not the one its data set names.
            warning, comment = WARNING_COERCION, "filed under another patient or study"
            log.warning("SOP Instance %s from %s stored with warning 0xB000 ([storage] "
                        "patient_mismatch = \"accept\"), though %s", record.sop_instance_uid,
                        calling_aet or "import", added.misfiled)
        stored = Stored(record.sop_instance_uid, rel, False, *uids, warning, comment)
        if self.on_stored is not None:
            self.on_stored(stored, header, calling_aet)
        if self.rejection_notes and record.values["sop_class_uid"] == KEY_OBJECT_SELECTION:
            self._reject(header, record.sop_instance_uid, calling_aet)
        return stored

    def _reject(self, note: Dataset, uid: str, calling_aet: str) -> None:
        """An IHE IOCM rejection note ([storage] rejection_notes = "bin"): the instances it
        names go to the recycle bin. The note itself is stored as any object."""
        try:
            title = note.ConceptNameCodeSequence[0]
            code = (str(title.CodingSchemeDesignator), str(title.CodeValue))
            if code not in REJECTION_TITLES:
                return
            named = [str(sop.ReferencedSOPInstanceUID)
                     for study in note.CurrentRequestedProcedureEvidenceSequence
                     for series in study.ReferencedSeriesSequence
                     for sop in series.ReferencedSOPSequence]
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            log.warning("rejection note %s from %s not applied: %s", uid, calling_aet, e)
            return
        named = [u for u in named if u != uid]
        n = self.delete("IMAGE", named, who=f"rejection note {uid} ({REJECTION_TITLES[code]}) "
                                           f"from {calling_aet or 'import'}")
        log.warning("rejection note %s from %s (%s): %d of the %d instance(s) it names moved to "
                    "the recycle bin", uid, calling_aet or "import", REJECTION_TITLES[code], n,
                    len(named))

    def _index(self, record: Record, rel: str, size: int, args: dict,
               finishing: "Future[tuple[str, int]] | None") -> Added:
        """Index.add, its failures as PacsErrors; with `finishing` (the file still being
        placed) an error waits for the file, so that what is removed is really gone."""
        try:
            return self.index.add(record, path=rel, size=size, **args)
        except BaseException as e:
            placed = True
            if finishing is not None:
                try:
                    finishing.result()
                except BaseException:   # noqa: BLE001 - the index's error is the one reported
                    placed = False
            if isinstance(e, TimeoutError):
                # The row may still commit: keep the file (a later reindex or duplicate check
                # settles it) rather than risk a row that points at nothing.
                raise IndexUnavailable("the index did not commit within the time limit") \
                    from None
            if placed:
                self.store.delete(rel)
            if isinstance(e, PacsError) or not isinstance(e, Exception):
                raise
            raise IndexUnavailable(f"index write failed: {e}") from None

    def _unindex(self, uid: str, rel: str) -> None:
        """Take back the row of a file that could not be placed (its fsync or rename failed
        after the row was committed): the image was never acknowledged."""
        try:
            self.index.delete("IMAGE", [uid], paths={rel})   # not a copy that replaced it
        except Exception as e:  # noqa: BLE001 - the file's error is the one reported
            log.error("SOP Instance %s: its file %s could not be written and its index row "
                      "could not be removed either (%s); the next start after an unclean "
                      "stop removes it, `pacsd reindex` does now", uid, rel, e)

    def _stored_copy_in_place(self, added: Added, record: Record, rel: str, size: int,
                              transfer_syntax: str, calling_aet: str) -> bool:
        """Before a re-sent instance is acknowledged as a duplicate (its copy `rel` dropped):
        is the stored copy in place? A first copy still being written (its row committed
        with it, Archive.put) is waited for, since it may yet fail. A stored copy that is
        missing is replaced by this one (False: `rel` is the stored copy now)."""
        uid = record.sop_instance_uid
        if os.path.exists(self.store.placed(added.stored_path)):
            return True
        if not self.store.placing(added.stored_path) and self.index.repoint(
                uid, added.stored_path, rel, size, transfer_syntax):
            log.warning("SOP Instance %s: its stored copy %s was missing from storage; the "
                        "copy just received from %s (%s) replaces it", uid, added.stored_path,
                        calling_aet or "import", rel)
            return False
        raise StillWriting(f"SOP Instance {uid}: its stored copy is not in place yet (still "
                           "being written after the wait, or just removed); send it again "
                           "later")

    def _forget(self, finishing: "Future[tuple[str, int]] | None",
                written: NewFile | None) -> None:
        """A file begun for a data set that is refused: never placed, its bytes removed."""
        if written is not None:
            written.drop()
        if finishing is not None:
            try:
                finishing.result()
            except Exception:   # noqa: BLE001 - FileDropped; the refusal is what is reported
                pass

    def _same_content(self, added: Added, record: Record, content_hash: str, dataset: bytes,
                      transfer_syntax: str) -> bool:
        """Whether a re-sent instance is the stored one: same SOP Class, same data set bytes.
        A copy stored before hashes were kept (schema 4) is hashed now, once."""
        stored_hash = added.stored_hash
        if stored_hash is None:
            try:
                stored_hash = file_content_hash(self.store.path(added.stored_path))
            except (OSError, ValueError, InvalidDataset) as e:
                log.warning("SOP Instance %s: the stored copy %s cannot be read to compare it "
                            "with a new one (%s)", record.sop_instance_uid, added.stored_path, e)
                return False
            self.index.set_hash(record.sop_instance_uid, added.stored_path, stored_hash)
        if added.stored_class not in ("", record.values["sop_class_uid"]):
            return False
        if stored_hash == content_hash:
            return True
        # The same image in another transfer syntax (a router re-sending uncompressed what a
        # modality sent compressed) has other bytes: compare what they decode to. Rare (a
        # re-send, in another syntax), so its cost is no concern; bounded like any decode.
        return added.stored_syntax not in ("", transfer_syntax) and same_decoded(
            self.store.path(added.stored_path), dataset, transfer_syntax, record)

    def _conflict(self, record: Record, rel: str, content_hash: str, added: Added,
                  transfer_syntax: str, calling_aet: str) -> NoReturn:
        """A stored SOP Instance UID came with other content: keep the new copy aside (never
        lose what was handed over), record it, say so once, and refuse (0x0111)."""
        uid = record.sop_instance_uid
        try:
            aside = self.store.set_aside(rel)
        except PacsError:
            self.store.delete(rel)
            raise
        try:
            new = self.index.add_conflict(uid, content_hash, aside, transfer_syntax, calling_aet)
        except TimeoutError:
            raise IndexUnavailable("the index did not commit within the time limit") from None
        if not new:   # this very content was kept aside before
            self.store.delete(aside)
            aside = "an identical copy kept before"
        raise ContentConflict(
            f"SOP Instance {uid} is stored here with other content (stored copy {added.stored_path}"
            f", sha256 {(added.stored_hash or '?')[:12]}; this one sha256 {content_hash[:12]}, "
            f"kept aside as {aside}); storage commitment fails for it until the instance is "
            "deleted")

    def put_file(self, path: Path) -> Stored:
        """Import a DICOM Part 10 file from anywhere (the bytes after its meta group are kept)."""
        try:
            meta, offset = split_dataset(path)
            ts = str(meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, ValueError, EOFError, KeyError) as e:
            raise InvalidDataset(f"not a DICOM Part 10 file ({e})") from None
        with open(path, "rb") as f:
            f.seek(offset)
            body = f.read()
        return self.put(body, transfer_syntax=ts,
                        sop_class=str(meta.get("MediaStorageSOPClassUID", "")) or None,
                        sop_instance=str(meta.get("MediaStorageSOPInstanceUID", "")) or None)

    # --- reconciling files and rows ---------------------------------------------------------

    def _records(self, rels: Iterable[str]) -> Iterator[tuple]:
        for rel in rels:
            full = self.store.path(rel)
            try:
                with open(full, "rb") as f:
                    ds = read_header(f)
                record = check_and_extract(ds)
                ts = str(ds.file_meta.TransferSyntaxUID)
                yield record, rel, os.path.getsize(full), ts
            except (PacsError, OSError, AttributeError) as e:
                log.warning("stored file %s cannot be indexed: %s", rel, e)

    def recover(self, since: float, until: float | None = None) -> int:
        """Index files written after `since` that have no row: a crash came between the rename
        and the commit. Those files are complete (fsync'd before the rename); keeping them is
        harmless, and the sender, never acknowledged, may send them again (a duplicate).

        `until` (this process's start): on a storage volume shared with other nodes, files
        written since are theirs, maybe still waiting for their commit; they are left alone
        (neither indexed nor, as second copies, removed), and only the interrupted run's files
        are looked at.

        First, rows of that run without their file: put() commits a row while its file is
        synced and renamed into place, so a crash in between leaves a row (of an image never
        acknowledged) that points at nothing; it is removed. A file still being placed by
        another node (its temporary file is there) is left to that node."""
        self._remove_unplaced(since, until if until is not None else time.time())
        self.bin.settle(since)   # deletions of that run: their files go to the bin first
        candidates = list(self.store.walk(since=since))
        if until is not None:
            candidates = [rel for rel in candidates if self._written_before(rel, until)]
        by_day: dict[str, list[str]] = {}
        for rel in candidates:
            by_day.setdefault(rel[:11], []).append(rel)
        orphans = []
        for prefix, rels in by_day.items():
            known = self.index.indexed_paths(prefix)
            orphans += [r for r in rels if r not in known]
        if not orphans:
            return 0
        records = list(self._records(orphans))
        n = self.index.add_many(records)
        log.warning("recovered %d stored file(s) that an interrupted run had not indexed", n)
        # Still without a row: a second copy of an instance indexed under another path, which
        # put() was about to delete (a duplicate, the original that an overwrite replaced, a
        # correction's new version whose commit never came).
        stray = {rel for _, rel, _, _ in records}
        for prefix in {rel[:11] for rel in stray}:
            stray -= self.index.indexed_paths(prefix)
        # Indexed now, some may be a restore from the bin cut short after its files were moved
        # back: their bin rows go.
        self.bin.settle_restored({rel for _, rel, _, _ in records} - stray)
        # A previous version an undo had moved back when the crash came: back to the bin.
        kept = self.index.binned_among(sorted(stray))
        self.store.move([(rel, binned_path(rel)) for rel in sorted(kept)])
        stray -= kept
        for rel in sorted(stray):
            self.store.delete(rel)
        if stray:
            log.warning("removed %d second copy(ies) of already indexed instance(s) left by an "
                        "interrupted run", len(stray))
        return n

    def _remove_unplaced(self, since: float, until: float) -> int:
        rows = self.index.received_between(since, until)
        unplaced = {uid: rel for uid, rel in rows
                    if not os.path.exists(self.store.path(rel)) and not self.store.placing(rel)}
        if not unplaced:
            return 0
        removed = self.index.delete("IMAGE", list(unplaced), paths=set(unplaced.values()))
        log.warning("removed %d index row(s) whose file an interrupted run had not finished "
                    "writing (never acknowledged: the sender was not told Success)",
                    len(removed))
        return len(removed)

    def _written_before(self, rel: str, moment: float) -> bool:
        try:
            return os.stat(self.store.path(rel)).st_mtime < moment
        except OSError:
            return False   # gone: its writer dropped it (a duplicate)

    def reindex(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Rebuild the index from the files on disk."""
        rels = list(self.store.walk())
        self.index.clear()
        done = added = 0
        for start in range(0, len(rels), 500):
            chunk = rels[start:start + 500]
            added += self.index.add_many(list(self._records(chunk)), new=False)
            done += len(chunk)
            if progress:
                progress(done, len(rels))
        return added

    # --- deleting ---------------------------------------------------------------------------

    def delete(self, level: str, uids: Iterable[str], who: str = "") -> int:
        """Delete the studies, series or instances (level STUDY, SERIES or IMAGE) with these
        UIDs: into the recycle bin (pacsd.storage.trash), restorable until it is emptied.
        `who`: for the history (a user, a client). Returns the number of instances."""
        level = level.upper()
        if level not in ("STUDY", "SERIES", "IMAGE"):
            raise ValueError(f"cannot delete at level {level!r}")
        return self.bin.delete(level, list(uids), who or "unknown")
