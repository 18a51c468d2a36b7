"""Query/Retrieve FIND as SCP (PS3.4 C.4.1), Patient Root and Study Root.

Turns the identifier into a query.Request, and each match into a response identifier that
carries every requested key (unknown ones empty, C.2.2.1.2), the Query/Retrieve Level and
Retrieve AE Title, and a Specific Character Set only when a value needs one (C.4.1.1.3.2).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind)

from pacsd import query
from pacsd.dicom_status import CANCEL, PENDING, UNABLE_TO_PROCESS
from pacsd.dimse import filters
from pacsd.plugins.hooks import Hooks
from pacsd.index import Index

log = logging.getLogger(__name__)

STUDY_ROOT_MODELS = {str(StudyRootQueryRetrieveInformationModelFind),
                     "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"}
PATIENT_ROOT_MODELS = {str(PatientRootQueryRetrieveInformationModelFind),
                       "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3"}
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
             "TimezoneOffsetFromUTC", "QueryRetrieveView"}


def _value(elem: DataElement) -> str:
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
            req.keys[elem.keyword] = _value(elem)
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


def handle_find(event: Event, index: Index, aet: str, hooks: Hooks | None = None
                ) -> Iterator[tuple[int, Dataset | None]]:
    peer = event.assoc.requestor.ae_title
    try:
        req, requested = parse_identifier(event.identifier,
                                          str(event.request.AffectedSOPClassUID))
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
    n = 0
    cancelled = Cancelled(event)
    try:
        with index.reading():
            for match in query.find(req, keys, cancelled):
                n += 1
                if n % 16 == 0:
                    drain(event.assoc)
                yield PENDING, response(requested, match, req.level, aet, asked)
    except query.QueryError as e:
        log.warning("C-FIND from %s refused: %s", peer, e)
        yield e.dicom_status, None
        return
    if cancelled():
        log.info("C-FIND from %s cancelled after %d match(es)", peer, n)
        yield CANCEL, None
        return
    log.info("C-FIND %s level from %s: %d match(es)", req.level, peer, n)
