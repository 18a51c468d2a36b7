"""Corrections: change patient or study attributes, merge patients, move a study to another
patient or a series to another study; and undo the last change of an object.

Each correction is, for every instance it touches:

    new version of the file, written durably (tmp, fsync, rename: NewFile)    \\
    one index transaction: rows re-filed from the new versions, the previous   -> then the
      versions' rows kept in the recycle bin under one history row             /  previous files
                                                                                  moved to the bin

SOP, Series and Study Instance UIDs stay (a series moved takes its new study's Study Instance
UID, as its instances must): the instances are the same images, filed differently. A crash
before the commit leaves new files no row points at, which the next start removes (a second
copy of an indexed instance); after it, previous files in place whose rows are in the bin, which
the next start moves there (pacsd.storage.trash.settle). Either way the archive holds one
version of each instance, old or new, never both, never neither.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, generate_uid

from pacsd.errors import InvalidDataset, PacsError
from pacsd.imaging.header import check_and_extract, read_dataset_header, read_header
from pacsd.index.integrity import Checkable
from pacsd.storage.archive import Archive, file_content_hash
from pacsd.storage.trash import Restored, binned_path

log = logging.getLogger(__name__)

# What each correction may set: the attribute's keyword, and how its value is checked.
PATIENT_ATTRIBUTES = {"PatientID": "LO", "IssuerOfPatientID": "LO", "PatientName": "PN",
                      "PatientBirthDate": "DA", "PatientSex": "CS"}
STUDY_ATTRIBUTES = {"AccessionNumber": "SH", "StudyDescription": "LO", "StudyDate": "DA",
                    "StudyTime": "TM", "ReferringPhysicianName": "PN", "StudyID": "SH"}
# What a series moved to another study takes from it.
STUDY_LEVEL = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
               "StudyDescription", "ReferringPhysicianName")
_MAX = {"LO": 64, "SH": 16, "CS": 16, "PN": 64 * 5, "DA": 8, "TM": 16}


class CorrectionRefused(PacsError):
    """A correction that cannot be made as asked (unknown object, bad value)."""

    http_status = 400
    exit_code = 1


class NothingToCorrect(CorrectionRefused):
    http_status = 404


@dataclass(frozen=True)
class Corrected:
    change: int
    instances: int


def check_value(keyword: str, vr: str, value: str) -> str:
    """A value as the standard allows it for its VR (PS3.5 6.2), else CorrectionRefused."""
    if "\\" in value or any(c in value for c in "\r\n\f\x00"):
        raise CorrectionRefused(f"{keyword}: a single value without control characters")
    if vr == "DA" and value and not re.fullmatch(r"\d{8}", value):
        raise CorrectionRefused(f"{keyword}: a date as YYYYMMDD")
    if vr == "TM" and value and not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", value):
        raise CorrectionRefused(f"{keyword}: a time as HHMMSS")
    if vr == "CS" and value and not re.fullmatch(r"[A-Z0-9 _]*", value):
        raise CorrectionRefused(f"{keyword}: upper-case letters, digits, space or _")
    if len(value) > _MAX[vr]:
        raise CorrectionRefused(f"{keyword}: at most {_MAX[vr]} characters ({vr})")
    return value


class Corrections:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.store, self.index = archive.store, archive.index

    # --- the corrections --------------------------------------------------------------------

    def update_patient(self, patient_id: str, changes: dict[str, str], who: str,
                       issuer: str | None = None) -> Corrected:
        wanted = self._checked(changes, PATIENT_ATTRIBUTES)
        if wanted.get("PatientID", patient_id) == "":
            raise CorrectionRefused("PatientID: a patient needs an ID")
        items = self._items("PATIENT", patient_id, issuer, "patient")
        return self._rewrite(items, lambda ds: wanted, who, "patient update", "PATIENT",
                             patient_id, "")

    def merge_patients(self, from_id: str, into_id: str, who: str,
                       from_issuer: str | None = None, into_issuer: str | None = None
                       ) -> Corrected:
        """File every study of patient `from_id` under patient `into_id`; an issuer (Issuer
        of Patient ID) narrows either to the patient of that issuer (None: any)."""
        if from_id == into_id and from_issuer == into_issuer:
            raise CorrectionRefused("a patient cannot be merged into itself")
        items = self._items("PATIENT", from_id, from_issuer, "patient")
        target = self._patient_of(self._items("PATIENT", into_id, into_issuer, "patient")[0])
        return self._rewrite(items, lambda ds: target, who, "patient merge", "PATIENT",
                             from_id, "", {"into": into_id})

    def update_study(self, study_uid: str, changes: dict[str, str], who: str) -> Corrected:
        wanted = self._checked(changes, STUDY_ATTRIBUTES)
        items = self._items("STUDY", study_uid, None, "study")
        return self._rewrite(items, lambda ds: wanted, who, "study update", "STUDY",
                             study_uid, study_uid)

    def move_study(self, study_uid: str, to_patient: str, who: str) -> Corrected:
        items = self._items("STUDY", study_uid, None, "study")
        target = self._patient_of(self._items("PATIENT", to_patient, None, "patient")[0])
        return self._rewrite(items, lambda ds: target, who, "study move", "STUDY", study_uid,
                             study_uid, {"to_patient": to_patient})

    def move_series(self, series_uid: str, to_study: str | None, who: str) -> Corrected:
        """File a series under another stored study, or (`to_study` None: a split) under a new
        study of its own patient, with a new Study Instance UID and its old study's
        attributes."""
        items = self._items("SERIES", series_uid, None, "series")
        if to_study is None:
            own = self._header(items[0])
            if len(self.index.checkable_in("STUDY", str(own.StudyInstanceUID))) == len(items):
                raise CorrectionRefused("the series is its study's only one: nothing to split")
            to_study = str(generate_uid(prefix=None))   # 2.25.<UUID as an integer>
            target = {kw: str(own.get(kw, "") or "") for kw in STUDY_LEVEL}
            target["StudyInstanceUID"] = to_study
            action = "series split"
        else:
            one = self._header(self._items("STUDY", to_study, None, "study")[0])
            target = {**self._patient_of_header(one),
                      **{kw: str(one.get(kw, "") or "") for kw in STUDY_LEVEL}}
            action = "series move"
        return self._rewrite(items, lambda ds: target, who, action, "SERIES", series_uid,
                             to_study, {"to_study": to_study})

    def undo(self, uid: str, who: str) -> Corrected | Restored:
        """Undo the last deletion (a restore) or correction (the previous versions back) of
        the object with this UID (or Patient ID)."""
        change = self.index.last_change(uid)
        if change is None:
            raise NothingToCorrect(f"nothing to undo for {uid}: no deletion or correction of "
                                   "it since its last undo (`pacsd history` lists them)")
        if change.action == "delete":
            return self.archive.bin.restore(str(change.id), who)
        binned = self.index.binned(str(change.id))
        versions = [b for b in binned if b.deletion == change.id]
        if not versions:
            raise NothingToCorrect(f"the previous versions of change #{change.id} are no longer "
                                   "in the recycle bin (emptied)")
        live = {i.sop_instance_uid: i for i in self.index.checkable(
            [v.sop_instance_uid for v in versions])}
        versions = [v for v in versions if v.sop_instance_uid in live]
        missing = self.store.move([(binned_path(v.path), v.path) for v in versions])
        if missing:
            self.store.move([(v.path, binned_path(v.path)) for v in versions
                             if v.path not in missing and binned_path(v.path) not in missing])
            raise CorrectionRefused(f"{len(missing)} previous version(s) of change #{change.id}"
                                    " are missing from the recycle bin; nothing was undone")
        written = []
        try:
            for v in versions:
                with open(self.store.path(v.path), "rb") as f:
                    record = check_and_extract(read_header(f))
                written.append((v.sop_instance_uid, v.path, v.size, v.transfer_syntax_uid,
                                record, v.content_hash or ""))
            number, previous = self.index.revise(
                written, who=who, action="undo", level=change.level, uid=change.uid,
                study_uid=change.study_uid, detail={"undoes": change.id},
                unbin=[v.id for v in versions])
        except BaseException:
            self.store.move([(v.path, binned_path(v.path)) for v in versions])
            raise
        self.store.move([(rel, binned_path(rel)) for rel in previous])
        log.warning("change #%d (%s of %s) undone by %s: %d instance(s) back as they were",
                    change.id, change.action, change.uid, who, len(written))
        return Corrected(number, len(written))

    # --- the work ---------------------------------------------------------------------------

    def _checked(self, changes: dict[str, str], allowed: dict[str, str]) -> dict[str, str]:
        if not changes:
            raise CorrectionRefused("nothing to change: give at least one new value")
        for kw in changes:
            if kw not in allowed:
                raise CorrectionRefused(f"{kw} cannot be changed here (only "
                                        f"{', '.join(allowed)})")
        return {kw: check_value(kw, allowed[kw], str(v).strip()) for kw, v in changes.items()}

    def _items(self, level: str, uid: str, issuer: str | None, what: str) -> list[Checkable]:
        items = self.index.checkable_in(level, uid, issuer)
        if not items:
            raise NothingToCorrect(f"no {what} {uid[:80]} is stored")
        return items

    def _header(self, item: Checkable) -> Dataset:
        with open(self.store.placed(item.path), "rb") as f:
            return read_header(f)

    def _patient_of(self, item: Checkable) -> dict[str, str]:
        return self._patient_of_header(self._header(item))

    @staticmethod
    def _patient_of_header(ds: Dataset) -> dict[str, str]:
        return {kw: str(ds.get(kw, "") or "") for kw in PATIENT_ATTRIBUTES}

    def _rewrite(self, items: list[Checkable], values: Callable[[Dataset], dict[str, str]],
                 who: str, action: str, level: str, uid: str, study_uid: str,
                 extra: dict[str, str] | None = None) -> Corrected:
        written: list[tuple] = []
        begun = []
        before: dict[str, str] = {}
        after: dict[str, str] = {}
        try:
            for item in items:
                if item.content_hash and file_content_hash(
                        self.store.placed(item.path)) != item.content_hash:
                    raise CorrectionRefused(f"the stored file of {item.sop_instance_uid} is not "
                                            "what was stored (see `pacsd verify`): nothing was "
                                            "changed")
                ds = dcmread(self.store.placed(item.path))
                new = values(ds)
                if not before:
                    before = {kw: str(ds.get(kw, "") or "") for kw in new}
                    after = dict(new)
                ts = str(ds.file_meta.TransferSyntaxUID)
                body = _encode(ds, new, ts)
                record = check_and_extract(read_dataset_header(body, ts))
                new_file = self.archive.begin_file(record.values["sop_class_uid"],
                                                   record.sop_instance_uid, ts, "")
                begun.append(new_file)
                new_file.add(body)
                finishing = new_file.finishing()
                new_file.keep()
                rel, size = finishing.result()
                written.append((record.sop_instance_uid, rel, size, ts, record,
                                hashlib.sha256(body).hexdigest()))
            change, previous = self.index.revise(
                written, who=who, action=action, level=level, uid=uid,
                study_uid=study_uid, detail={"before": before, "after": after, **(extra or {})})
        except BaseException:
            for _, rel, *_rest in written:   # not indexed: the new versions go
                self.store.delete(rel)
            for new_file in begun[len(written):]:
                new_file.drop()
            raise
        self.store.move([(rel, binned_path(rel)) for rel in previous])
        # The values (names, birth dates) only at DEBUG: the log is read by more people than
        # the archive; `pacsd history` shows them to those who may see them.
        log.warning("%s of %s by %s: %d instance(s) rewritten; the previous versions are in "
                    "the recycle bin (change #%d, `pacsd undo %s`)", action, uid, who,
                    len(written), change, uid)
        log.debug("change #%d: %s -> %s", change, before, after)
        return Corrected(change, len(written))


def _encode(ds: Dataset, values: dict[str, str], transfer_syntax: str) -> bytes:
    """The data set (no File Meta group) with `values` set, in its own transfer syntax."""
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        raise CorrectionRefused("a deflated data set cannot be corrected here")
    for kw, value in values.items():
        setattr(ds, kw, value)
    if any(not v.isascii() for v in values.values()):
        # The new values need more than the default repertoire: UTF-8 (ISO_IR 192) for the
        # whole data set, whose text pydicom holds decoded and writes again in it.
        ds.SpecificCharacterSet = "ISO_IR 192"
    fp = DicomBytesIO()
    fp.is_little_endian = ts.is_little_endian
    fp.is_implicit_VR = ts.is_implicit_VR
    try:
        write_dataset(fp, ds)
    except (ValueError, TypeError, AttributeError) as e:
        raise InvalidDataset(f"cannot write the corrected data set: {e}") from None
    return fp.getvalue()
