"""HL7 v2 messages in: bytes -> typed operations on the worklist and the patients (the envelope,
refusals and ACKs are pacsd.hl7.header's).

Parsing is python-hl7's (`hl7.parse`: separators from MSH-1/MSH-2, escapes undone); what is read, checked and turned into DICOM values is ours. Every value goes through
pacsd.query.worklist.clean_step, the one check of a scheduled step's values.

Supported: ORM^O01 and OMI^O23 (an order: ORC-1 NW new, XO or SC change, CA, DC or OC cancel),
ADT^A08 and ADT^A31 (new demographics), ADT^A40 (merge: PID the surviving patient, MRG-1 the one
merged away). The manual's "HL7 in" section lists every field read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import hl7

from pacsd.hl7.header import (DATA_TYPE, REQUIRED_MISSING, SEGMENT_ERROR, TABLE_VALUE,
                              UNSUPPORTED_EVENT, UNSUPPORTED_TYPE, UNSUPPORTED_VERSION, Header,
                              MessageFailed, MessageRefused, decode, read_header)
from pacsd.query.worklist import StepRefused, clean_step

SUPPORTED = ("ORM^O01", "OMI^O23", "ADT^A08", "ADT^A31", "ADT^A40")
# Escape sequences (HL7 v2.5 2.7): the ones python-hl7 undoes without logging the field. A
# repeat count is bounded: \.sp99999999\ would otherwise make a string of that many line feeds.
_ESCAPE_BODY = re.compile(r"[FRSTEHN]|\.(?:br|fi|nf|ce)"
                          r"|\.(?:sp|in|ti|sk)[+-]?\d{0,2}")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


# --- fields ---------------------------------------------------------------------------------

class Segment:
    """One segment's fields as plain strings, escapes undone: get(n, component, sub, rep)."""

    def __init__(self, message: Any, segment: Any, codec: str = "utf-8") -> None:
        self.message, self.segment, self.codec = message, segment, codec
        self.name = str(segment[0][0]) if len(segment) and len(segment[0]) else ""

    def reps(self, n: int) -> list[list[list[str]]]:
        """Field n as repetitions -> components -> subcomponents."""
        if n <= 0 or n >= len(self.segment):
            return []
        out = []
        for rep in self.segment[n]:
            if isinstance(rep, str):
                out.append([[rep]])
                continue
            out.append([[comp] if isinstance(comp, str) else [str(s) for s in comp]
                        for comp in rep])
        return out

    def get(self, n: int, component: int = 1, sub: int = 1, rep: int = 1) -> str:
        reps = self.reps(n)
        if len(reps) < rep or len(reps[rep - 1]) < component:
            return ""
        subs = reps[rep - 1][component - 1]
        return self.unescape(subs[sub - 1]) if len(subs) >= sub else ""

    def components(self, n: int, rep: int = 1) -> list[str]:
        """Each component's first subcomponent, escapes undone; [] for an empty field."""
        reps = self.reps(n)
        if len(reps) < rep:
            return []
        return [self.unescape(subs[0] if subs else "") for subs in reps[rep - 1]]

    def unescape(self, text: str) -> str:
        """Escape sequences undone (HL7 v2.5 2.7): \\X..\\ as bytes in the message's character
        set (python-hl7 would take each byte for a Latin-1 character), the others by
        python-hl7, one sequence at a time; line breaks become spaces (one DICOM value)."""
        esc = self.message.esc
        if esc not in text:
            return text
        parts = text.split(esc)
        out = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                out.append(part)
            elif i == len(parts) - 1:
                continue   # an escape never closed: dropped, as python-hl7 does
            elif re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", part):
                out.append(bytes.fromhex(part[1:]).decode(self.codec, errors="replace"))
            elif _ESCAPE_BODY.fullmatch(part):
                out.append(str(self.message.unescape(esc + part + esc)))
            else:
                raise MessageRefused(f"{self.name}: the escape sequence {esc}{part[:12]}{esc} "
                                     "is not supported", DATA_TYPE)
        return "".join(out).replace("\r", " ").replace("\n", " ")


def _null(value: str) -> bool:
    return value == '""'   # HL7's explicit null: the value is to be deleted


def _put(out: dict[str, str], column: str, value: str) -> None:
    """A field's value where one was sent: "" for HL7's null (delete), nothing when empty."""
    if _null(value):
        out[column] = ""
    elif value.strip():
        out[column] = value.strip()


def person(components: list[str], *, xcn: bool = False) -> str:
    """An XPN (family^given^middle^suffix^prefix) or XCN (id^family^...) as a DICOM PN
    (family^given^middle^prefix^suffix); '""' stays HL7's null."""
    parts = components[1:] if xcn else components
    if parts and _null(parts[0]):
        return '""'
    family, given, middle, suffix, prefix = (parts + [""] * 5)[:5]
    return "^".join(p.strip() for p in (family, given, middle, prefix, suffix)).rstrip("^")


def date_time(value: str) -> tuple[str, str]:
    """An HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S...]]]]]][+/-ZZZZ]) as DICOM (DA, TM); a value with
    less than a whole date gives ("", "") unless it is HL7's null."""
    if _null(value):
        return '""', '""'
    digits = re.match(r"\d*", value.strip().split("+")[0].split("-")[0])
    text = digits.group(0) if digits else ""
    if len(text) < 8:
        return "", ""
    clock = text[8:14]
    return text[:8], clock if len(clock) in (2, 4, 6) else ""


SEXES = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": "", '""': '""'}
PRIORITIES = {"S": "STAT", "A": "HIGH", "P": "HIGH", "C": "HIGH", "R": "ROUTINE", "T": "MEDIUM"}


@dataclass(frozen=True)
class Patient:
    """The patient of PID: its ID, issuer, and the demographics sent (step columns; "" where
    the message deletes a value)."""

    patient_id: str
    issuer: str
    values: dict[str, str] = field(default_factory=dict)


def patient_of(pid: Segment) -> Patient:
    """PID-3 (first repetition: id^^^issuer; PID-2 when PID-3 is empty), PID-5 (the legal name
    when marked L, else the first), PID-7, PID-8."""
    patient_id, issuer = pid.get(3, 1), pid.get(3, 4) or pid.get(3, 4, 2)
    if not patient_id:
        patient_id, issuer = pid.get(2, 1), pid.get(2, 4) or pid.get(2, 4, 2)
    values: dict[str, str] = {}
    names = [pid.components(5, r) for r in range(1, len(pid.reps(5)) + 1)]
    legal = next((n for n in names if len(n) > 6 and n[6] == "L"), names[0] if names else [])
    _put(values, "patient_name", person(legal))
    born, _ = date_time(pid.get(7))
    _put(values, "patient_birth_date", born)
    sex = pid.get(8).upper()
    if sex:
        _put(values, "patient_sex", SEXES.get(sex, "O"))
    return Patient(patient_id.strip(), issuer.strip(), values)


# --- operations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Order:
    """One order (ORC group): `action` new, change or cancel; its keys; the steps it
    describes (values checked by clean_step; partial unless new)."""

    control: str
    action: str
    placer: str
    filler: str
    accession: str
    steps: tuple[dict[str, str], ...]
    ignored: int = 0    # further steps of the same requested procedure (one kept per UID)

    @property
    def key(self) -> str:
        return self.placer or self.filler or self.accession


@dataclass(frozen=True)
class PatientUpdate:
    patient: Patient


@dataclass(frozen=True)
class PatientMerge:
    into: Patient
    from_id: str
    from_issuer: str


Operation = Order | PatientUpdate | PatientMerge


@dataclass(frozen=True)
class Message:
    header: Header
    kind: str
    operations: tuple[Operation, ...]


ORDER_CONTROL = {"NW": "new", "XO": "change", "SC": "change", "CA": "cancel", "DC": "cancel",
                 "OC": "cancel"}


def _order_values(seg: dict[str, Segment], ipc: Segment | None, pv1: Segment | None
                  ) -> dict[str, str]:
    """The step columns an ORC group sends (ORC, OBR, TQ1, ZDS, and one IPC for OMI)."""
    orc, obr, tq1, zds = seg.get("ORC"), seg.get("OBR"), seg.get("TQ1"), seg.get("ZDS")
    v: dict[str, str] = {}
    if orc is not None:
        _put(v, "placer_order_number", orc.get(2))
        _put(v, "filler_order_number", orc.get(3))
        _put(v, "requesting_physician", person(orc.components(12), xcn=True))
    start = ""
    if tq1 is not None:
        start = tq1.get(7)
        priority = tq1.get(9)
        if priority:
            _put(v, "requested_procedure_priority", PRIORITIES.get(priority.upper(), ""))
    if orc is not None:
        start = start or orc.get(7, 4)
        if "requested_procedure_priority" not in v and orc.get(7, 6):
            _put(v, "requested_procedure_priority", PRIORITIES.get(orc.get(7, 6).upper(), ""))
    if obr is not None:
        if "placer_order_number" not in v:
            _put(v, "placer_order_number", obr.get(2))
        if "filler_order_number" not in v:
            _put(v, "filler_order_number", obr.get(3))
        service = obr.components(4)
        procedure = obr.components(44) or service[:3]
        code, text, scheme = (procedure + ["", "", ""])[:3]
        if code or text:
            _put(v, "requested_procedure_code", "^".join((code, scheme, text)).rstrip("^")
                 if code else "")
            _put(v, "requested_procedure_description", text or code)
        alt = (service[3:] + ["", "", ""])[:3]
        if alt[0]:
            _put(v, "protocol_code", "^".join((alt[0], alt[2], alt[1])).rstrip("^"))
        _put(v, "sps_description", alt[1] or text or code)
        start = start or obr.get(27, 4) or obr.get(7) or obr.get(36)
        _put(v, "medical_alerts", obr.get(13))
        _put(v, "requesting_physician", person(obr.components(16), xcn=True))
        _put(v, "accession_number", obr.get(18))
        _put(v, "requested_procedure_id", obr.get(19))
        _put(v, "sps_id", obr.get(20))
        station = obr.get(21)
        # OBR-21 (Filler Field 2) is free text: taken as the station's AE title only when it
        # is one (PS3.5 6.2 AE: 16 characters at most).
        if station and re.fullmatch(r"[A-Za-z0-9 _\-.]{1,16}", station.strip()):
            _put(v, "station_aet", station)
        _put(v, "modality", obr.get(24))
        _put(v, "reason", obr.get(31, 2) or obr.get(31, 1))
        if "referring_physician_name" not in v:
            _put(v, "referring_physician_name", person(obr.components(16), xcn=True))
    if pv1 is not None:
        referring = person(pv1.components(8), xcn=True)
        if referring:
            _put(v, "referring_physician_name", referring)
        _put(v, "admission_id", pv1.get(19))
    if zds is not None:
        _put(v, "study_instance_uid", zds.get(1))
    if ipc is not None:   # OMI^O23 (IHE RAD-4 for HL7 v2.5.1): IPC before OBR's fields
        _put(v, "accession_number", ipc.get(1))
        _put(v, "requested_procedure_id", ipc.get(2))
        _put(v, "study_instance_uid", ipc.get(3))
        _put(v, "sps_id", ipc.get(4))
        _put(v, "modality", ipc.get(5))
        protocol = ipc.components(6)
        if protocol and protocol[0]:
            p = (protocol + ["", "", ""])[:3]
            _put(v, "protocol_code", "^".join((p[0], p[2], p[1])).rstrip("^"))
            _put(v, "sps_description", p[1] or p[0])
        _put(v, "station_name", ipc.get(7))
        _put(v, "location", ipc.get(8))
        _put(v, "station_aet", ipc.get(9))
    if start:
        day, clock = date_time(start)
        _put(v, "start_date", day)
        _put(v, "start_time", clock)
    return v


def _checked(values: dict[str, str], *, partial: bool, what: str) -> dict[str, str]:
    try:
        return clean_step(values, partial=partial)
    except StepRefused as e:
        code = REQUIRED_MISSING if "needs" in str(e) else DATA_TYPE
        raise MessageFailed(f"{what}: {e}", code) from None


def _orders(segments: list[Segment], patient: Patient | None, pv1: Segment | None
            ) -> list[Order]:
    groups: list[dict[str, Any]] = []
    for s in segments:
        if s.name == "ORC":
            groups.append({"ORC": s, "IPC": []})
        elif groups and s.name in ("OBR", "TQ1", "ZDS") and s.name not in groups[-1]:
            groups[-1][s.name] = s
        elif groups and s.name == "IPC":
            groups[-1]["IPC"].append(s)
    if not groups:
        raise MessageRefused("an order without an ORC segment", SEGMENT_ERROR)
    orders = []
    for g in groups:
        orc: Segment = g["ORC"]
        control = orc.get(1).upper()
        if control == "SC" and orc.get(5).upper() in ("CA", "DC"):
            action = "cancel"
        else:
            action = ORDER_CONTROL.get(control, "")
        if not action:
            raise MessageRefused(f"order control {control[:4]!r} (ORC-1) is not supported: "
                                 "NW, XO, SC, CA, DC, OC", TABLE_VALUE)
        if "OBR" not in g and action != "cancel":
            raise MessageRefused("an order without its OBR segment", SEGMENT_ERROR)
        steps, seen, ignored = [], set(), 0
        for ipc in g["IPC"] or [None]:
            raw = _order_values(g, ipc, pv1)
            if patient is not None:
                raw.update(patient_id=patient.patient_id,
                           issuer_of_patient_id=patient.issuer, **patient.values)
            values = _checked(raw, partial=action != "new", what=f"order {control}")
            uid = values.get("study_instance_uid") if "study_instance_uid" in raw else ""
            # pacsd keeps one step per requested procedure (one Study Instance UID): a further
            # scheduled step of the same procedure is left out, and said so in the answer.
            if uid and uid in seen:
                ignored += 1
                continue
            if uid:
                seen.add(uid)
            steps.append(values)
        first = steps[0]
        orders.append(Order(control, action, first.get("placer_order_number", ""),
                            first.get("filler_order_number", ""),
                            first.get("accession_number", ""), tuple(steps), ignored))
        if not orders[-1].key:
            raise MessageFailed(f"order {control}: no placer (ORC-2), filler (ORC-3) or "
                                "accession number (OBR-18, IPC-1) to know it by",
                                REQUIRED_MISSING)
    return orders


def _patient_checked(patient: Patient, what: str) -> Patient:
    if not patient.patient_id:
        raise MessageFailed(f"{what}: no patient ID (PID-3)", REQUIRED_MISSING)
    values = _checked({"patient_id": patient.patient_id,
                       "issuer_of_patient_id": patient.issuer, **patient.values},
                      partial=True, what=what)
    return Patient(values.pop("patient_id"), values.pop("issuer_of_patient_id"), values)


def parse(raw: bytes, default_encoding: str = "") -> Message:
    """One message (a frame's bytes, framing removed) as operations; MessageRefused (AR) when
    it cannot be read or is not supported, MessageFailed (AE) for a missing or bad value."""
    header = read_header(raw)
    if header is None:
        raise MessageRefused("not an HL7 message: no MSH segment with usable encoding "
                             "characters (MSH-1, MSH-2) at its start", SEGMENT_ERROR)
    text, codec = decode(raw, header, default_encoding)
    header = read_header(text, codec) or header   # its fields as the decoded text has them
    lines = [line for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
             if line.strip()]
    if sum(1 for line in lines if line.startswith("MSH")) > 1:
        raise MessageRefused("more than one message in a frame (batches are not supported)",
                             SEGMENT_ERROR)
    for n, line in enumerate(lines, 1):
        if not _SEGMENT_ID.fullmatch(line[:3]) or (len(line) > 3 and line[3] != header.sep):
            raise MessageRefused(f"segment {n} is not an HL7 segment", SEGMENT_ERROR)
    version = header.get(12)
    if version and not version.startswith("2."):
        raise MessageRefused(f"HL7 version {version[:12]!r} (MSH-12): only 2.x is read",
                             UNSUPPORTED_VERSION)
    kind = header.kind
    if kind not in SUPPORTED:
        code = UNSUPPORTED_EVENT if kind.split("^")[0] in ("ORM", "OMI", "ADT") \
            else UNSUPPORTED_TYPE
        raise MessageRefused(f"message type {kind[:16]} (MSH-9) is not supported: "
                             + ", ".join(SUPPORTED), code)
    try:
        parsed = hl7.parse("\r".join(lines))
    except Exception as e:  # noqa: BLE001 - whatever the parser trips on is a refusal
        raise MessageRefused(f"the message cannot be parsed ({type(e).__name__})",
                             SEGMENT_ERROR) from None
    segments = [Segment(parsed, s, codec) for s in parsed]
    by_name: dict[str, Segment] = {}
    for s in segments:
        by_name.setdefault(s.name, s)
    pid, pv1 = by_name.get("PID"), by_name.get("PV1")
    return Message(header, kind, tuple(_operations(kind, segments, pid, pv1)))


def _operations(kind: str, segments: list[Segment], pid: Segment | None,
                pv1: Segment | None) -> list[Operation]:
    if kind in ("ORM^O01", "OMI^O23"):
        patient = patient_of(pid) if pid is not None else None
        return list(_orders(segments, patient, pv1))
    if pid is None:
        raise MessageRefused(f"{kind} without a PID segment", SEGMENT_ERROR)
    if kind in ("ADT^A08", "ADT^A31"):
        return [PatientUpdate(_patient_checked(patient_of(pid), kind))]
    # ADT^A40: one or more PID (the surviving patient) + MRG (the one merged into it).
    out: list[Operation] = []
    current: Patient | None = None
    for s in segments:
        if s.name == "PID":
            current = _patient_checked(patient_of(s), kind)
        elif s.name == "MRG" and current is not None:
            from_id, from_issuer = s.get(1, 1), s.get(1, 4) or s.get(1, 4, 2)
            if not from_id.strip():
                raise MessageFailed(f"{kind}: no prior patient ID (MRG-1)", REQUIRED_MISSING)
            if from_id.strip() == current.patient_id:
                raise MessageFailed(f"{kind}: a patient cannot be merged into itself",
                                    DATA_TYPE)
            out.append(PatientMerge(current, from_id.strip(), from_issuer.strip()))
    if not out:
        raise MessageRefused(f"{kind} without an MRG segment after its PID", SEGMENT_ERROR)
    return out
