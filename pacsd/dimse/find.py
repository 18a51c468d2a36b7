"""Query/Retrieve FIND as SCP (PS3.4 C.4.1), Patient Root and Study Root.

Turns the identifier into a query.Request, and each match into a response identifier that
carries every requested key (unknown ones empty, C.2.2.1.2), the Query/Retrieve Level and
Retrieve AE Title, and a Specific Character Set only when a value needs one (C.4.1.1.3.2).
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any, Callable, Iterator

from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)

from pacsd import query
from pacsd.compat import pynetdicom as compat
from pacsd.dicom_status import CANCEL, PENDING, UNABLE_TO_PROCESS
from pacsd.dimse import filters
from pacsd.plugins.hooks import Hooks
from pacsd.index import Index
from pacsd.config import Config
from pacsd.nodes import ondemand

log = logging.getLogger(__name__)

STUDY_ROOT_MODELS = {str(StudyRootQueryRetrieveInformationModelFind),
                     "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"}
PATIENT_ROOT_MODELS = {str(PatientRootQueryRetrieveInformationModelFind),
                       "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3"}
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
             "TimezoneOffsetFromUTC", "QueryRetrieveView"}


def key_value(elem: DataElement) -> str:
    """A key's value as matching reads it: multiple values joined by "\\", a sequence ""."""
    value = elem.value
    if value is None or isinstance(value, Sequence) or elem.VR == "SQ":
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return ""
    return str(value)


class Cancelled:
    """Latches C-CANCEL: pynetdicom's `event.is_cancelled` is True only when first read."""

    def __init__(self, event: Event) -> None:
        self.event = event
        self.seen = False

    def __call__(self) -> bool:
        self.seen = self.seen or bool(self.event.is_cancelled)
        return self.seen


def drain(assoc: Any, timeout: float = 30.0) -> None:
    """Wait until the responses already queued for `assoc` are sent.

    pynetdicom queues every response and its reactor reads nothing, not even a C-CANCEL, while
    that queue is not empty; a fast query over a slow link would also pile up memory. Waiting
    now and then bounds both."""
    queue = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    deadline = time.monotonic() + timeout
    while (queue is not None and queue.qsize() and assoc.is_established
           and time.monotonic() < deadline):
        time.sleep(0.0005)


def parse_identifier(identifier: Dataset, sop_class: str
                     ) -> tuple[query.Request, list[DataElement]]:
    """The Request and the requested elements (in order) from a C-FIND/MOVE/GET identifier."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "")
    req = query.Request(level)
    if str(sop_class) in STUDY_ROOT_MODELS and req.level == "PATIENT":
        raise query.QueryError("PATIENT level is not part of the Study Root model")
    requested = []
    for elem in identifier:
        if elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        requested.append(elem)
        if elem.keyword and elem.keyword not in _NOT_KEYS and elem.keyword in query.KEYS:
            req.keys[elem.keyword] = key_value(elem)
    return req, requested


# The default repertoire (PS3.5 6.1.2.1): ASCII only, whatever Python's "iso8859" pydicom maps
# it to would also accept.
_DEFAULT_TERMS = {"", "ISO_IR 6", "ISO 2022 IR 6"}
UTF8 = "ISO_IR 192"


def asked_charset(identifier: Dataset) -> list[str]:
    """The Specific Character Set terms of a C-FIND request ([] when it gives none)."""
    value = identifier.get("SpecificCharacterSet", None)
    if value is None or value == "":
        return []
    terms = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [str(t or "").strip() for t in terms]


def _can_carry(texts: list[str], terms: list[str]) -> bool:
    """Whether the character set `terms` can write every character of `texts` (with ISO 2022
    code extensions, each character in one of its sets: pydicom switches between them)."""
    codecs = []
    for term in terms:
        codec = "ascii" if term in _DEFAULT_TERMS else python_encoding.get(term)
        if codec is None:
            return False   # a term we do not know: we cannot promise to write it
        codecs.append(codec)
    for ch in {c for text in texts for c in text if not c.isascii()}:
        for codec in codecs:
            try:
                ch.encode(codec)
                break
            except (UnicodeEncodeError, LookupError):
                continue
        else:
            return False
    return True


def response_charset(values: dict[str, Any], asked: list[str]) -> list[str]:
    """The Specific Character Set of one C-FIND response, per PS3.4 C.4.1.1.3.2: none ([])
    when every returned value is ASCII ("shall not be included otherwise"); the one the query
    asked for when it can carry the values; else UTF-8 (ISO_IR 192), which carries all.

    The values may come from instances stored in different character sets (the patient's
    name from an earlier study, say): the stored one does not decide, the values do."""
    texts = [v for v in values.values() if isinstance(v, str) and not v.isascii()]
    if not texts:
        return []
    if asked and _can_carry(texts, asked):
        return asked
    return [UTF8]


def response(requested: list[DataElement], match: dict[str, Any], level: str,
             aet: str, asked: list[str] | None = None) -> Dataset:
    ds = Dataset()
    match.pop("SpecificCharacterSet", None)   # the stored one, if the peer asked for it
    charset = response_charset(match, asked or [])
    if charset:
        # Set first: pydicom encodes text with it (PS3.5 6.1.2.5.3).
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    ds.QueryRetrieveLevel = level
    ds.RetrieveAETitle = aet
    return query.fill_dataset(ds, requested, match)


# PS3.5 7.1.2: in explicit VR these have two reserved bytes and a 4-byte length.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV",
                       "UV"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})
_INTS = {"US": struct.Struct("<H"), "SS": struct.Struct("<h"), "UL": struct.Struct("<L"),
         "SL": struct.Struct("<l"), "UV": struct.Struct("<Q"), "SV": struct.Struct("<q")}
_CHARSET, _LEVEL, _RETRIEVE_AET = 0x00080005, 0x00080052, 0x00080054


class Match:
    """One C-FIND match as pynetdicom's C-FIND SCP sends it: its identifier written here from
    the index's values (pacsd.compat.pynetdicom.encoded_identifiers), the same bytes pydicom
    would write for `response()` without building a Dataset (a fifth of a C-FIND's time). Where
    it cannot (a big endian or deflated syntax, a character set other than ASCII or UTF-8, a
    value of a binary VR), `dataset()` is what pydicom encodes instead."""

    __slots__ = ("requested", "match", "level", "aet", "asked")

    def __init__(self, requested: list[DataElement], match: dict[str, Any], level: str,
                 aet: str, asked: list[str]) -> None:
        self.requested, self.match, self.level, self.aet, self.asked = \
            requested, match, level, aet, asked

    def dataset(self) -> Dataset:
        return response(self.requested, dict(self.match), self.level, self.aet, self.asked)

    def pacsd_encoded(self, implicit: bool, little: bool, deflated: bool) -> bytes | None:
        if not little or deflated:
            return None
        values = {k: v for k, v in self.match.items() if k != "SpecificCharacterSet"}
        charset = response_charset(values, self.asked)
        if charset not in ([], [UTF8]):
            return None
        codec = "utf-8" if charset else "ascii"
        items: list[tuple[int, str, Any]] = [(_LEVEL, "CS", self.level),
                                             (_RETRIEVE_AET, "AE", self.aet)]
        if charset:
            items.append((_CHARSET, "CS", UTF8))
        for elem in self.requested:
            if elem.keyword not in query.FILLED_ELSEWHERE:
                items.append((int(elem.tag), elem.VR, values.get(elem.keyword)))
        items.sort(key=lambda item: item[0])
        out = bytearray()
        for tag, vr, value in items:
            raw = _value_bytes(vr, value, codec) if len(vr) == 2 else None   # not "US or SS"
            if raw is None:
                return None
            if implicit:
                out += struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(raw))
            elif vr in _LONG_VRS:
                out += struct.pack("<HH2sxxL", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw))
            elif len(raw) <= 0xFFFF:
                out += struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw))
            else:
                return None
            out += raw
        return bytes(out)


def _value_bytes(vr: str, value: Any, codec: str) -> bytes | None:
    """An element's value as query.fill_dataset gives it and pydicom writes it (padded to an
    even length: UI with a NUL, text with a space); None where we leave it to pydicom."""
    if value is None or value == "" or vr == "SQ":
        return b""   # unknown (C.2.2.1.2): empty; a sequence: empty, of length 0
    if vr in _INTS:
        try:
            return _INTS[vr].pack(int(value))
        except (ValueError, TypeError, struct.error):
            return None
    if vr not in _TEXT_VRS:
        return None
    try:
        raw = str(value).encode(codec)
    except UnicodeEncodeError:
        return None
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def handle_find(event: Event, index: Index, aet: str, hooks: Hooks | None = None,
                scope_of: Callable[[str], Any] = lambda aet: None, cfg: Config | None = None
                ) -> Iterator[tuple[int, Dataset | Match | None]]:
    """C-FIND SCP: the index's matches; with `cfg` (upstream nodes configured), then the
    upstreams' (pacsd.nodes.ondemand), each with our Retrieve AE Title: retrieved through us."""
    peer = event.assoc.requestor.ae_title
    try:
        req, requested = parse_identifier(event.identifier,
                                          str(event.request.AffectedSOPClassUID))
        req.scope = scope_of(peer)   # a node in [[groups]] finds its groups' studies only
        asked = asked_charset(event.identifier)
        if hooks is not None and hooks.has("on_query"):
            refused, req.keys = filters.query_keys(event, hooks, req.level, req.keys)
            if refused is not None:
                yield refused, None
                return
    except query.QueryError as e:
        log.warning("C-FIND from %s refused: %s", peer, e)
        yield e.dicom_status, None   # Identifier does not match SOP Class (QueryError)
        return
    except Exception as e:
        log.warning("C-FIND from %s: unreadable identifier: %s", peer, e)
        yield UNABLE_TO_PROCESS, None
        return
    keys = [e.keyword for e in requested if e.keyword]
    encoded = compat.encoded_identifiers()
    n = 0
    cancelled = Cancelled(event)
    upstream = (ondemand.start(cfg, req.level, req.keys, req.scope, peer) if cfg is not None
                else None)
    unique = query.UNIQUE_KEYS[req.level]
    local: set[str] = set()
    if upstream is not None and unique not in keys:
        keys.append(unique)   # to tell local matches from upstream ones; not sent back
    try:
        with index.reading():
            for match in query.find(req, keys, cancelled):
                n += 1
                if upstream is not None:
                    local.add(str(match.get(unique) or ""))
                if n % 16 == 0:
                    drain(event.assoc)
                yield PENDING, (Match(requested, match, req.level, aet, asked) if encoded
                                else response(requested, match, req.level, aet, asked))
    except query.QueryError as e:
        log.warning("C-FIND from %s refused: %s", peer, e)
        yield e.dicom_status, None
        return
    if upstream is not None and not cancelled():
        found = upstream.results(local)
        for f in found:
            if cancelled():
                break
            yield PENDING, (Match(requested, f.values, req.level, aet, asked) if encoded
                            else response(requested, dict(f.values), req.level, aet, asked))
        if found:
            log.info("C-FIND %s level from %s: %d match(es) from upstream nodes", req.level,
                     peer, len(found))
    if cancelled():
        log.info("C-FIND from %s cancelled after %d match(es)", peer, n)
        yield CANCEL, None
        return
    log.info("C-FIND %s level from %s: %d match(es)", req.level, peer, n)
