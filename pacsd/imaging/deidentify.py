"""De-identification per PS3.15 Annex E: the Basic Application Level Confidentiality Profile,
with the Retain Longitudinal Temporal Information with Full Dates Option (E.3.6) and the Clean
Descriptors Option (E.3.5) as choices.

    d = Deidentifier(Options(retain_longitudinal=True))   # one per export
    ds = d.apply(ds)        # the data set de-identified (in place), UIDs mapped through d.uids
    d.burned_in             # series that may carry identifying text in their pixels

Pure: data sets in and out, no I/O. One Deidentifier is one export (a ZIP, a send, a CLI run):
within it a UID always maps to the same new UID (2.25.<UUID>, PS3.5 B.2), references included
(ReferencedSOPInstanceUID, FrameOfReferenceUID... are U rows of the table), and each original
patient gets one pseudonym; a new export maps everything anew.

Why our own table rather than a library. The candidates on PyPI were read:
- dicom-anonymizer (KitwareMedical, 2.1.0) carries the Basic Profile's action codes faithfully
  (editions up to 2026c) but none of the options' columns, so neither option could be had from
  it; its UID map is one module-level dict for the whole process (no per-export mapping, not
  safe with two exports at once), and it marks the data set neither PatientIdentityRemoved nor
  with a DeidentificationMethodCodeSequence.
- dicognito (0.19) makes plausible random replacements and shifts dates by its own rules; it
  does not follow Table E.1-1 action by action, and has no Clean Descriptors.
- deid (pydicom/deid, 0.4.13) applies recipes ("best effort"); its default recipe is not the
  table, and its options are its recipes' own.
So pacsd keeps the table as data (pacsd.imaging.deid_table: PS3.15 2024e, with both options'
columns, plus the rows of later editions) and applies it here, with no dependency.

How each action code is carried out (PS3.15 E.1.1):
- X removed; K kept (a sequence's items de-identified); U every UID value remapped; Z emptied
  (a sequence emptied); D a dummy of the VR (a sequence kept, its items de-identified: the
  sequence of an SR's Content Sequence or Graphic Annotation Sequence keeps its structure and
  loses what the table names inside it).
- The combined codes choose by the attribute's Type in the IOD, which a de-identifier of any
  SOP class cannot know per attribute: pacsd takes the choice that keeps every IOD conformant,
  Z/D -> D, X/Z -> Z, X/D -> D, X/Z/D -> D, X/Z/U* -> U (the sequence kept, the UIDs in it
  remapped). What is left is never more identifying than the table allows.
- C (Clean Descriptors): the text is kept without what identifies: every value the profile
  would remove or replace elsewhere in the data set (names and their components, IDs,
  accession, institution, dates...) as whole words, date-like patterns and runs of six or more
  digits; a coded sequence is kept with
  its items de-identified. A C on a binary value gets the Basic action.
- Retain Longitudinal ... Full Dates: the rows with K in that column (dates, times) are kept.
- Private attributes, Curve Data (50xx,xxxx), Overlay Data and Comments (60xx,3000 / 4000)
  removed; group lengths dropped (they would be wrong).
- Then PatientIdentityRemoved YES, DeidentificationMethod, DeidentificationMethodCodeSequence
  (CID 7050: 113100 and the options' 113106, 113105), LongitudinalTemporalInformationModified,
  the pseudonym's PatientName and PatientID, and the File Meta's Media Storage SOP Instance UID.

Pixel data is never touched: text burned into the pixels stays. `burned_in` lists the series
whose modality often burns it in (US, SC, DX) or that say BurnedInAnnotation YES.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from pacsd.imaging.deid_table import EDITION, ROWS, SUPPLEMENT

BURNED_IN_MODALITIES = ("US", "SC", "DX")
MAX_DEPTH = 32   # sequences nested deeper than this are removed whole, unread

# tag -> (Basic Profile action, Retain Longitudinal Full Dates column, Clean Descriptors column)
TABLE: dict[int, tuple[str, str, str]] = {
    **{tag: (basic, "", "") for tag, basic, _, _ in SUPPLEMENT},
    **{tag: (basic, long_, clean) for tag, basic, long_, clean in ROWS},
}
# The combined codes, resolved to the choice that keeps any IOD conformant (see above).
RESOLVED = {"Z/D": "D", "X/Z": "Z", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}

# CID 7050 De-identification Method (PS3.16).
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
LONGITUDINAL_CODE = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
CLEAN_DESCRIPTORS_CODE = ("113105", "Clean Descriptors Option")

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NUMBER_VRS = {"FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"}
_DUMMY = {"AS": "000Y", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0",
          "IS": "0", "CS": "ANONYMOUS", "AE": "ANONYMOUS", "PN": "ANONYMOUS",
          "UR": "ANONYMOUS"}
# Values of these VRs anywhere in the data set, when the profile would remove or replace them,
# are what the Clean Descriptors Option takes out of descriptive text.
_IDENTIFYING_VRS = {"PN", "LO", "SH", "DA", "DT", "AE", "LT", "ST", "UC"}
_DATE_LIKE = re.compile(r"\b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}\b")
_LONG_NUMBER = re.compile(r"\d{6,}")
# File Meta attributes that name the sender or carry private data (PS3.10 7.1).
_META_DROPPED = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028,
                 0x00020100, 0x00020102)


@dataclass(frozen=True)
class Options:
    retain_longitudinal: bool = False   # E.3.6, with full dates
    clean_descriptors: bool = False     # E.3.5
    patient_name: str | None = None     # the pseudonym to use (else one made per patient)
    patient_id: str | None = None


@dataclass
class BurnedIn:
    """A series that may carry identifying text in its pixels (kept as they are)."""
    series_uid: str        # the new, de-identified Series Instance UID
    modality: str
    series_number: str
    reason: str
    instances: int = 0

    def line(self) -> str:
        number = f"series {self.series_number}" if self.series_number else "a series"
        return (f"{number} ({self.modality or 'no modality'}, {self.instances} instance(s), "
                f"Series Instance UID {self.series_uid}): {self.reason}")


def new_uid() -> str:
    """A UID of the 2.25 root made from a random UUID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def burned_in_reason(modality: str, burned_in_annotation: str = "") -> str:
    """Why a series may have text in its pixels, or ""."""
    if str(burned_in_annotation).strip().upper() == "YES":
        return "Burned In Annotation is YES"
    if modality.strip().upper() in BURNED_IN_MODALITIES:
        return f"{modality.strip().upper()} images often have text burned into the pixels"
    return ""


def warning_text(notes: list[BurnedIn]) -> str:
    """The burned-in warning in words (README.txt of a ZIP, a job's result), "" if none."""
    if not notes:
        return ""
    return ("WARNING: the pixel data was not de-identified. These series may show patient "
            "names, dates or other identifying text burned into the images; check them "
            "before sharing:\n" + "".join(f"  - {n.line()}\n" for n in notes))


def readme_text(deid: "Deidentifier") -> str:
    """What goes with a de-identified export (README.txt): how it was made, and the warning."""
    opts = deid.options
    lines = ["These DICOM files were de-identified by pacsd per DICOM PS3.15 Annex E:",
             "Basic Application Level Confidentiality Profile"
             + ("; Retain Longitudinal Temporal Information with Full Dates Option"
                if opts.retain_longitudinal else "")
             + ("; Clean Descriptors Option" if opts.clean_descriptors else "")
             + f" (Table E.1-1 of DICOM {EDITION}).",
             f"{deid.count} instance(s); UIDs replaced by new ones (2.25), consistently within "
             "this export; private attributes removed.", ""]
    warning = warning_text(deid.notes())
    return "\n".join(lines) + "\n" + (warning or "No series of modality US, SC or DX, and "
                                                "none with Burned In Annotation YES.\n")


@dataclass
class Deidentifier:
    """One export's de-identification (see the module's docstring)."""

    options: Options = field(default_factory=Options)
    uids: dict[str, str] = field(default_factory=dict)
    patients: dict[str, tuple[str, str]] = field(default_factory=dict)
    burned_in: dict[str, BurnedIn] = field(default_factory=dict)
    count: int = 0

    # --- the export's state ---------------------------------------------------------------

    def uid(self, old: str) -> str:
        old = str(old).strip().rstrip("\0")
        if not old:
            return old
        found = self.uids.get(old)
        if found is None:
            found = self.uids[old] = new_uid()
        return found

    def pseudonym(self, ds: Dataset) -> tuple[str, str]:
        """(PatientName, PatientID) for this data set's patient: the caller's, or one made
        for each original patient of this export (by Patient ID, as the archive files
        patients; by name when there is no ID)."""
        key = str(ds.get("PatientID", "") or "").strip()
        key = f"ID:{key}" if key else f"NAME:{ds.get('PatientName', '') or ''}"
        found = self.patients.get(key)
        if found is None:
            token = secrets.token_hex(4).upper()
            found = self.patients[key] = (
                self.options.patient_name or f"ANONYMOUS^{token}",
                self.options.patient_id or f"ANON-{token}")
        return found

    def notes(self) -> list[BurnedIn]:
        return list(self.burned_in.values())

    # --- one data set -------------------------------------------------------------------------

    def action(self, tag: int) -> str | None:
        row = TABLE.get(tag)
        if row is None:
            return None
        basic, longitudinal, clean = row
        if self.options.retain_longitudinal and longitudinal == "K":
            return "K"
        if self.options.clean_descriptors and clean == "C":
            return "C"
        return RESOLVED.get(basic, basic)

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify `ds` in place (file_meta too, when it has one) and return it."""
        series = str(ds.get("SeriesInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "")
        reason = burned_in_reason(modality, str(ds.get("BurnedInAnnotation", "") or ""))
        name, pid = self.pseudonym(ds)
        identifying = self._identifying(ds) if self.options.clean_descriptors else []
        self._dataset(ds, identifying, 0)
        ds.PatientName = name
        ds.PatientID = pid
        ds.PatientIdentityRemoved = "YES"
        self._method(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for tag in _META_DROPPED:
                if tag in meta:
                    del meta[tag]
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if reason:
            new_series = self.uid(series) if series else ""
            note = self.burned_in.get(new_series)
            if note is None:
                note = self.burned_in[new_series] = BurnedIn(
                    new_series, modality, str(ds.get("SeriesNumber", "") or ""), reason)
            note.instances += 1
        self.count += 1
        return ds

    def _method(self, ds: Dataset) -> None:
        codes = [BASIC_CODE]
        words = [f"PS3.15 E Basic Profile ({EDITION})"]
        if self.options.retain_longitudinal:
            codes.append(LONGITUDINAL_CODE)
            words.append("Retain Longitudinal Full Dates")
        if self.options.clean_descriptors:
            codes.append(CLEAN_DESCRIPTORS_CODE)
            words.append("Clean Descriptors")
        ds.DeidentificationMethod = words + ["pacsd"]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if self.options.retain_longitudinal else "REMOVED")

    def _dataset(self, ds: Dataset, identifying: list[str], depth: int) -> None:
        for elem in list(ds):
            tag = int(elem.tag)
            group, element = tag >> 16, tag & 0xFFFF
            if (group % 2 == 1 or element == 0 or (group & 0xFF00) == 0x5000
                    or ((group & 0xFF00) == 0x6000 and element in (0x3000, 0x4000))):
                del ds[elem.tag]   # private, group length, curve, overlay data / comments
                continue
            action = self.action(tag)
            if action is None or action == "K":
                if elem.VR == "SQ":
                    self._items(ds, elem, identifying, depth)
                continue
            self._act(ds, elem, action, identifying, depth)

    def _items(self, ds: Dataset, elem: DataElement, identifying: list[str], depth: int) -> None:
        if depth >= MAX_DEPTH:
            del ds[elem.tag]
            return
        for item in elem.value or []:
            self._dataset(item, identifying, depth + 1)

    def _act(self, ds: Dataset, elem: DataElement, action: str, identifying: list[str],
             depth: int) -> None:
        tag = elem.tag
        vr = _vr(elem)
        if action == "X":
            del ds[tag]
        elif vr == "SQ":
            if action == "Z":
                ds[tag] = DataElement(tag, "SQ", Sequence())
                return
            if action == "D" and not elem.value:
                elem.value = Sequence([Dataset()])
            self._items(ds, elem, identifying, depth)   # D, U, C: kept, its items cleaned
        elif action == "U" or vr == "UI":
            values = _values(elem)
            _set(ds, tag, "UI", [self.uid(v) for v in values] if values else new_uid())
        elif action == "Z":
            _set(ds, tag, vr, None)
        elif action == "C" and vr in _TEXT_VRS:
            cleaned = [clean_text(v, identifying) for v in _values(elem)]
            cleaned = [v for v in cleaned if v]
            _set(ds, tag, vr, cleaned or None)
        elif action == "C":   # a binary or numeric value cannot be cleaned: the Basic action
            basic = RESOLVED.get(TABLE[int(tag)][0], TABLE[int(tag)][0])
            if basic == "C":
                basic = "X"
            self._act(ds, elem, basic, identifying, depth)
        else:   # D
            _set(ds, tag, vr, dummy(vr))

    def _identifying(self, ds: Dataset) -> list[str]:
        """The values the profile would take away (not kept, not a descriptor the option
        keeps), longest first, for clean_text."""
        found: set[str] = set()
        for elem in ds.iterall():
            row = TABLE.get(int(elem.tag))
            if row is None or _vr(elem) not in _IDENTIFYING_VRS or row[2] == "C":
                continue
            if self.action(int(elem.tag)) == "K":
                continue
            for value in _values(elem):
                for part in re.split(r"[\^=\\]", value):
                    part = part.strip()
                    if len(part) >= 2:
                        found.add(part)
        return sorted(found, key=len, reverse=True)


def clean_text(text: str, identifying: list[str]) -> str:
    """`text` without the identifying values, date-like patterns and long numbers in it."""
    for value in identifying:   # as whole words: "Li" leaves "clinical" alone
        text = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", " ", text, flags=re.IGNORECASE)
    text = _DATE_LIKE.sub(" ", text)
    text = _LONG_NUMBER.sub(" ", text)
    return " ".join(text.split())


def dummy(vr: str) -> Any:
    """A non-empty value of the VR that says nothing (the D action)."""
    if vr in _NUMBER_VRS:
        return 0
    if vr in _BINARY_VRS:
        return b"\0\0"
    if vr == "AT":
        return 0
    return _DUMMY.get(vr, "ANONYMOUS")


def _vr(elem: DataElement) -> str:
    vr = str(elem.VR)
    if vr == "UN" or " or " in vr:
        try:
            vr = str(dictionary_VR(elem.tag))
        except KeyError:
            return "UN" if vr == "UN" else vr.split(" or ")[0]
    return vr.split(" or ")[0]


def _values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace").strip("\0 ")
        value = value.split("\\") if value else []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    return [str(value)] if str(value) != "" else []


def _set(ds: Dataset, tag: BaseTag, vr: str, value: Any) -> None:
    """A new element in place of the old one (a UN one gets its dictionary VR)."""
    ds[tag] = DataElement(tag, vr, value)
