"""DICOM JSON (PS3.18 F.2) written as the Native DICOM Model (PS3.19 A.1), the XML that DICOMweb
answers with under application/dicom+xml (PS3.18 8.7.3.4 / 10.4.3, 10.6.3).

The JSON and the XML models carry the same things: a tag, VR and keyword per attribute, values
numbered from 1, person names by component group and component, sequence items, BulkData by
URI and InlineBinary in base64 (F.3 gives the mapping the other way).
"""

from __future__ import annotations

import re
from typing import Any, Iterator
from xml.sax.saxutils import escape, quoteattr

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_PN_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
# Characters XML 1.0 cannot carry at all (a value holding one loses it here, not the document).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: Any) -> str:
    return escape(_NOT_XML.sub("", str(value)))


def _person_name(number: int, value: Any) -> Iterator[str]:
    yield f'<PersonName number="{number}">'
    if isinstance(value, dict):
        for group in ("Alphabetic", "Ideographic", "Phonetic"):
            text = value.get(group)
            if not text:
                continue
            yield f"<{group}>"
            for part, component in zip(_PN_PARTS, str(text).split("^")):
                if component:
                    yield f"<{part}>{_text(component)}</{part}>"
            yield f"</{group}>"
    yield "</PersonName>"


def _attributes(obj: dict[str, Any]) -> Iterator[str]:
    for tag, attr in obj.items():
        vr = attr.get("vr", "UN")
        number = int(tag, 16)
        keyword = keyword_for_tag(number)
        kw = f' keyword="{keyword}"' if keyword else ""
        shown = tag.upper()
        if number >> 16 & 1 and number & 0xFFFF >= 0x1000:
            # A private data element: its Private Creator named, its block left out of the
            # tag (PS3.19 A.1.5: gggg00ee with privateCreator; as dcm2xml -nat writes it).
            creator = obj.get(f"{number >> 16:04X}00{(number >> 8) & 0xFF:02X}", {})
            values = creator.get("Value") or []
            if values and values[0]:
                kw += f" privateCreator={quoteattr(_NOT_XML.sub('', str(values[0])))}"
            shown = f"{number >> 16:04X}00{number & 0xFF:02X}"
        yield f'<DicomAttribute tag="{shown}" vr="{vr}"{kw}>'
        if "BulkDataURI" in attr:
            yield f"<BulkData uri={quoteattr(_NOT_XML.sub('', attr['BulkDataURI']))}/>"
        elif "InlineBinary" in attr:
            yield f"<InlineBinary>{_text(attr['InlineBinary'])}</InlineBinary>"
        for n, value in enumerate(attr.get("Value") or [], start=1):
            if vr == "SQ":
                yield f'<Item number="{n}">'
                yield from _attributes(value or {})
                yield "</Item>"
            elif vr == "PN":
                yield from _person_name(n, value)
            elif value is None:
                yield f'<Value number="{n}"/>'
            else:
                yield f'<Value number="{n}">{_text(value)}</Value>'
        yield "</DicomAttribute>"


def native_xml(obj: dict[str, Any]) -> str:
    """One data set (DICOM JSON) as a PS3.19 NativeDicomModel document."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<NativeDicomModel xmlns="{NAMESPACE}">' + "".join(_attributes(obj))
            + "</NativeDicomModel>\n")
