"""The envelope of an HL7 v2 message: its header (MSH: separators, type, control id, character
set), its decoding into text, the refusals (AR, AE) with their HL7 table 0357 codes, and the
acknowledgement (original mode, HL7 v2.5 2.9.2), built by python-hl7 (`create_ack`) from the
header alone, so that even a message that cannot be read is answered.
"""

from __future__ import annotations

import codecs
import re
import time
import uuid
from dataclasses import dataclass

import hl7

from pacsd.errors import PacsError

# HL7 table 0211 (MSH-18) -> Python codecs. Others are looked up by name ("UTF-8", "cp1252"),
# as long as they keep ASCII as it is (MSH must read the same).
CHARSETS = {"ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8",
            "ISO IR6": "ascii", "ISO IR100": "iso8859-1", "ISO IR192": "utf-8",
            "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_2", "GB 18030-2000": "gb18030",
            "KS X 1001": "euc_kr", "BIG-5": "big5",
            **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)}}
# HL7 table 0357 (message error condition codes), in the ERR segment of an AE or AR.
SEGMENT_ERROR, REQUIRED_MISSING, DATA_TYPE, TABLE_VALUE = "100", "101", "102", "103"
UNSUPPORTED_TYPE, UNSUPPORTED_EVENT, UNSUPPORTED_VERSION = "200", "201", "203"
UNKNOWN_KEY, DUPLICATE_KEY, INTERNAL = "204", "205", "207"
HEAD_FIELDS = 21          # MSH fields kept for the ACK (MSH-1 ... MSH-21)
HEAD_FIELD_MAX = 227      # characters of each MSH field echoed in an ACK (HD's length)
CONTROL_ID_MAX = 199


class MessageRefused(PacsError):
    """A message we cannot read or do not take: answered AR (HL7 table 0008)."""

    ack = "AR"
    http_status = 400

    def __init__(self, text: str, error: str = SEGMENT_ERROR) -> None:
        super().__init__(text)
        self.error = error


class MessageFailed(PacsError):
    """A message understood but not applied (a missing or bad value, an unknown order, the
    archive refusing a correction, the index unavailable): answered AE."""

    ack = "AE"
    http_status = 422

    def __init__(self, text: str, error: str = INTERNAL) -> None:
        super().__init__(text)
        self.error = error


def redacted(text: str) -> str:
    """A refusal's text without the values it quotes (a birth date, a name): for the log."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", text)


# --- the message header ---------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """MSH as far as it could be read: its separators and fields (MSH-n is fields[n - 1]),
    each cut to HEAD_FIELD_MAX, for the answer; `codec`: how the message was decoded."""

    sep: str = "|"
    encoding: str = "^~\\&"
    fields: tuple[str, ...] = ()
    codec: str = ""

    def get(self, n: int, component: int = 1) -> str:
        value = self.fields[n - 1] if 2 < n <= len(self.fields) else ""
        parts = value.split(self.encoding[0]) if self.encoding else [value]
        return parts[component - 1].strip() if component <= len(parts) else ""

    @property
    def kind(self) -> str:
        """MSH-9 as CODE^TRIGGER (e.g. ADT^A08)."""
        return f"{self.get(9).upper()}^{self.get(9, 2).upper()}".strip("^")

    @property
    def control_id(self) -> str:
        return self.get(10)[:CONTROL_ID_MAX]

    @property
    def sender(self) -> str:
        """MSH-3 (its namespace ID), for the log and the audit trail."""
        return re.sub(r"[^\w .@:/-]", "?", self.get(3))[:64]


def _valid_separators(sep: str, encoding: str) -> bool:
    chars = sep + encoding
    return (len(encoding) in (4, 5) and len(set(chars)) == len(chars)
            and all(c.isprintable() and not c.isalnum() and not c.isspace() for c in chars))


def read_header(raw: bytes | str, codec: str = "") -> Header | None:
    """The MSH segment at the start of `raw` (a frame's bytes, maybe only its beginning, read
    as Latin-1: MSH's own characters are ASCII; or the decoded text, with its `codec`); None
    when it is not there or its separators are not usable."""
    head = raw[:65536]
    line = head.decode("latin-1") if isinstance(head, bytes) else head
    line = re.split(r"[\r\n]", line, maxsplit=1)[0]
    if not line.startswith("MSH") or len(line) < 8:
        return None
    sep = line[3]
    encoding = line[4:line.find(sep, 4)] if line.find(sep, 4) != -1 else ""
    if not _valid_separators(sep, encoding):
        return None
    parts = line.split(sep)
    # parts[0] is "MSH", parts[1] MSH-2: MSH-1 is the separator itself.
    fields = (sep, encoding, *(p[:HEAD_FIELD_MAX] for p in parts[2:HEAD_FIELDS]))
    return Header(sep, encoding, tuple(fields), codec)


def _codec(charset: str) -> str | None:
    name = CHARSETS.get(charset.upper().strip(), charset.strip())
    try:
        codec = codecs.lookup(name).name
        sample = "MSH|^~\\&"
        if sample.encode(codec) != sample.encode("ascii"):
            return None
    except (LookupError, UnicodeError, ValueError):
        return None
    return codec


def decode(raw: bytes, header: Header, default: str = "") -> tuple[str, str]:
    """(text, codec): the character set of MSH-18, else `default` ([hl7] encoding), else UTF-8,
    else Latin-1 (every byte is a character there)."""
    declared = header.get(18).split(header.encoding[1])[0].strip() if header.encoding else ""
    if declared:
        codec = _codec(declared)
        if codec is None:
            raise MessageRefused(f"character set {declared[:40]!r} (MSH-18) is not supported",
                                 DATA_TYPE)
        tried = [codec]
    elif default:
        tried = [default]
    else:
        tried = ["utf-8", "latin-1"]
    for codec in tried:
        try:
            return raw.decode(codec), codec
        except (UnicodeDecodeError, LookupError):
            continue
    raise MessageRefused(f"the message is not valid {tried[0]} (its character set: MSH-18 or "
                         "[hl7] encoding)", DATA_TYPE)


# --- acknowledgements (HL7 v2.5 2.9.2, original mode) ---------------------------------------

def ack(header: Header | None, code: str, text: str = "", error: str = "",
        application: str = "PACSD") -> bytes:
    """The ACK of a message (MSA-1 `code`: AA, AE or AR; MSA-2 its control id; MSA-3 `text`;
    an ERR segment with the table 0357 `error` for AE and AR), encoded as the message was. For
    a message whose header could not be read, an ACK with the standard separators."""
    if header is None:
        header = Header(fields=("|", "^~\\&"))
    sep, enc = header.sep, header.encoding
    comp = enc[0]
    trigger = header.get(9, 2)
    fields = list(header.fields) + [""] * (HEAD_FIELDS - len(header.fields))
    # python-hl7 builds the ACK from MSH alone; MSH-9 is rebuilt so that it always has its
    # components (create_ack reads MSH-9.2).
    fields[8] = f"{header.get(9)}{comp}{trigger}"
    fields[10] = fields[10] or "P"        # MSH-11 and MSH-12 are required in the ACK too
    fields[11] = fields[11] or "2.5"
    source = hl7.parse("MSH" + sep + sep.join(fields[1:]))
    out = source.create_ack(code, message_id=uuid.uuid4().hex[:20].upper(),
                            application=application)
    msh = out.segment("MSH")
    msh.assign_field(time.strftime("%Y%m%d%H%M%S%z"), 7)   # local time with its offset
    if header.codec and header.get(18):
        msh.assign_field(header.fields[17], 18)
    msa = out.segment("MSA")
    if text:
        msa.assign_field(out.escape(text[:400]), 3)
    if error and code != "AA":
        err = out.create_segment([out.create_field(["ERR"])])
        err.assign_field(error, 3, 1, 1)
        err.assign_field(out.escape(_ERRORS.get(error, "Application error")), 3, 1, 2)
        err.assign_field("HL70357", 3, 1, 3)
        err.assign_field("E", 4)
        if text:
            err.assign_field(out.escape(text[:400]), 8)
        out.append(err)
    codec = header.codec or "ascii"
    return str(out).encode(codec, errors="replace")


_ERRORS = {SEGMENT_ERROR: "Segment sequence error", REQUIRED_MISSING: "Required field missing",
           DATA_TYPE: "Data type error", TABLE_VALUE: "Table value not found",
           UNSUPPORTED_TYPE: "Unsupported message type",
           UNSUPPORTED_EVENT: "Unsupported event code",
           UNSUPPORTED_VERSION: "Unsupported version id", UNKNOWN_KEY: "Unknown key identifier",
           DUPLICATE_KEY: "Duplicate key identifier",
           INTERNAL: "Application internal error"}
