"""Modality Worklist Information Model FIND as SCP (PS3.4 K, Basic Worklist Management).

The identifier's matching keys become a query.worklist.WorklistQuery: the Requested Procedure
and patient keys at the top level, the Scheduled Procedure Step keys inside the one item of its
Scheduled Procedure Step Sequence, and code sequences by their item's Code Value and Coding
Scheme Designator (sequence matching, C.2.2.2.6). Each matching step is one Pending response
carrying every requested key, unknown ones empty (C.2.2.1.2); the Specific Character Set as
the Query/Retrieve C-FIND answers it (pacsd.dimse.find, C.4.1.1.3.2).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.events import Event
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from pacsd.dicom_status import CANCEL, PENDING, UNABLE_TO_PROCESS
from pacsd.dimse.find import Cancelled, asked_charset, drain, key_value, response_charset
from pacsd.index import Index
from pacsd.query import QueryError, fill_dataset
from pacsd.query.worklist import BY_KEYWORD, CODE, FIELDS, SPS, TOP, WorklistQuery, \
    code_item, find_steps

log = logging.getLogger(__name__)

MWL_FIND = str(ModalityWorklistInformationFind)   # 1.2.840.10008.5.1.4.31
SPS_SEQUENCE = "ScheduledProcedureStepSequence"
_CODE_KEYS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
# An empty Scheduled Procedure Step Sequence asks for the whole item (sequence matching,
# C.2.2.2.6: universal): the step's attributes pacsd keeps (K.6.1.2.2's return keys).
SPS_RETURN = tuple(f.keyword for f in FIELDS if f.place == SPS)


class BadIdentifier(QueryError):
    """A worklist identifier we cannot match (0xA900, Identifier does not match SOP Class:
    QueryError's status)."""


def _element(keyword: str) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return DataElement(tag, dictionary_VR(tag), None)


def _one_item(elem: DataElement) -> Dataset | None:
    """The one item of a sequence key (None: zero items). More than one item is not a
    matching key (C.2.2.2.6 allows one)."""
    items = elem.value or []
    if len(items) > 1:
        raise BadIdentifier(f"{elem.keyword or elem.tag}: one item at most, not {len(items)}")
    return items[0] if items else None


def _code_key(elem: DataElement) -> tuple[dict[str, str], list[DataElement] | None]:
    """A code sequence key's matching values and requested item keys (None: all of them)."""
    item = _one_item(elem)
    if item is None:
        return {}, None
    keys = [e for e in item if not e.tag.is_private]
    return {e.keyword: key_value(e) for e in keys if e.keyword in _CODE_KEYS[:2]}, keys


class Request:
    """A parsed worklist identifier: the query, and what each response carries."""

    def __init__(self, identifier: Dataset) -> None:
        self.query = WorklistQuery({}, {}, {})
        self.top: list[DataElement] = []            # requested top-level keys, in order
        self.sps: list[DataElement] | None = None    # None: no SPS Sequence asked for
        self.code_keys: dict[str, list[DataElement] | None] = {}
        for elem in identifier:
            if elem.tag.is_private or elem.tag.group == 0x0002 or (
                    elem.keyword == "SpecificCharacterSet"):
                continue
            self.top.append(elem)
            if elem.keyword == SPS_SEQUENCE:
                self._sps(elem)
            else:
                self._key(elem, TOP)

    def _key(self, elem: DataElement, place: str) -> None:
        field = BY_KEYWORD.get(elem.keyword)
        if field is None or field.place != place:
            return   # a return key we do not hold: answered empty (C.2.2.1.2)
        if field.vr == CODE:
            if elem.VR != "SQ":
                raise BadIdentifier(f"{elem.keyword} is a sequence")
            match, keys = _code_key(elem)
            self.query.codes[elem.keyword] = match
            self.code_keys[elem.keyword] = keys
            return
        value = key_value(elem)
        if place == TOP:
            self.query.top[elem.keyword] = value
        else:
            self.query.sps[elem.keyword] = value

    def _sps(self, elem: DataElement) -> None:
        if elem.VR != "SQ":
            raise BadIdentifier(f"{SPS_SEQUENCE} is a sequence")
        item = _one_item(elem)
        if item is None or len(item) == 0:
            self.sps = [_element(k) for k in SPS_RETURN]
            return
        self.sps = []
        for sub in item:
            if sub.tag.is_private or sub.keyword == "SpecificCharacterSet":
                continue
            self.sps.append(sub)
            self._key(sub, SPS)

    def response(self, row: dict[str, Any], asked: list[str]) -> Dataset:
        """The response identifier for one step (its ScheduledStep row)."""
        values = {f.keyword: row.get(f.column) or "" for f in FIELDS if f.vr != CODE}
        codes = {f.keyword: code_item(row.get(f.column) or "") for f in FIELDS if f.vr == CODE}
        ds = Dataset()
        self._fill(ds, self.top, TOP, values, codes)
        # What is returned decides the character set; pydicom encodes every text with it when
        # the response is written, in the sequence items too (PS3.5 6.1.2.5.3).
        texts = {str(i): str(e.value) for i, e in enumerate(ds.iterall())
                 if e.VR in ("PN", "LO", "LT", "SH", "ST", "UC", "UT") and e.value}
        charset = response_charset(texts, asked)
        if charset:
            ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
        return ds

    def _fill(self, ds: Dataset, requested: list[DataElement], place: str,
              values: dict[str, str], codes: dict[str, dict[str, str] | None]) -> None:
        plain = []
        for elem in requested:
            field = BY_KEYWORD.get(elem.keyword)
            if elem.keyword == SPS_SEQUENCE and place == TOP:
                item = Dataset()
                self._fill(item, self.sps or [], SPS, values, codes)
                ds[elem.tag] = DataElement(elem.tag, "SQ", Sequence([item]))
            elif field is not None and field.place == place and field.vr == CODE:
                ds[elem.tag] = DataElement(elem.tag, "SQ", self._code(elem.keyword,
                                                                      codes[elem.keyword]))
            else:
                plain.append(elem)   # not ours, or not at this level: empty (C.2.2.1.2)
        own = {e.keyword: values[e.keyword] for e in plain
               if e.keyword in values and BY_KEYWORD[e.keyword].place == place}
        fill_dataset(ds, plain, own)

    def _code(self, keyword: str, code: dict[str, str] | None) -> Sequence:
        if code is None:
            return Sequence([])   # no code kept: zero items
        item = Dataset()
        keys = self.code_keys.get(keyword)
        for elem in keys if keys is not None else [_element(k) for k in _CODE_KEYS]:
            item[elem.tag] = DataElement(elem.tag, elem.VR, code.get(elem.keyword) or None)
        return Sequence([item])


def handle_worklist(event: Event, index: Index, max_results: int
                    ) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND on the Modality Worklist Information Model."""
    peer = event.assoc.requestor.ae_title
    try:
        req = Request(event.identifier)
        asked = asked_charset(event.identifier)
        with index.reading():
            rows = find_steps(req.query, max_results + 1)
    except QueryError as e:
        log.warning("worklist C-FIND from %s refused: %s", peer, e)
        yield e.dicom_status, None
        return
    except Exception as e:
        log.warning("worklist C-FIND from %s: unreadable identifier: %s", peer, e)
        yield UNABLE_TO_PROCESS, None
        return
    if len(rows) > max_results:
        log.warning("worklist C-FIND from %s matches more than %d steps: answered the first %d "
                    "by date ([worklist] max_results; narrow the query by date or station)",
                    peer, max_results, max_results)
        rows = rows[:max_results]
    cancelled = Cancelled(event)
    n = 0
    for row in rows:
        if cancelled():
            log.info("worklist C-FIND from %s cancelled after %d item(s)", peer, n)
            yield CANCEL, None
            return
        n += 1
        if n % 16 == 0:
            drain(event.assoc)
        yield PENDING, req.response(row, asked)
    log.info("worklist C-FIND from %s: %d item(s)", peer, n)
