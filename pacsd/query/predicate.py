"""OsiriX's data model over our index, for the XML-RPC methods: its entity and attribute names,
a small parser for the predicates clients send to DBWindowFind, and the reads that answer them
(the elements returned are built from the rows in pacsd.web.osirix).

OsiriX evaluates an NSPredicate format string on its Core Data store (Study / Series / Image).
We accept the part of that language clients actually send and turn it into peewee conditions:

    comparison  keypath OP value       OP: == = != <> < <= > >= LIKE BEGINSWITH CONTAINS
                                           ENDSWITH IN, optionally followed by [c] [d] [cd]
    logic       AND && OR || NOT ! ( )
    values      'single' or "double" quoted strings (backslash escapes), numbers, {a, b, ...}

Key paths are OsiriX attribute names (`name`, `patientID`, `studyInstanceUID`, ...), optionally
through relationships (`study.patientID` on Series, `series.study.name` on Image); an attribute
not found on the table's own entity is looked up on the entities above it. Nothing of the
request ever reaches SQL as text: values are bound parameters, names come from ATTRIBUTES.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from peewee import Expression, Field, fn

from pacsd.errors import PacsError
from pacsd.index.models import Instance, Patient, Series, Study, reading
from pacsd.query import matching

MAX_REQUEST = 4096   # characters of predicate
MAX_DEPTH = 32       # nesting of parentheses / NOT

TABLES = ("Study", "Series", "Image")
LEVEL = {"Study": "STUDY", "Series": "SERIES", "Image": "IMAGE"}
MODEL: dict[str, Any] = {"Study": Study, "Series": Series, "Image": Instance}
UPPER = {"Image": "Series", "Series": "Study", "Study": ""}

# kinds: "text", "name" (person name: case-insensitive, '^' and spaces alike), "uid", "date",
# "int", "modalities" (Study.modality: any series of that modality)


@dataclass(frozen=True)
class Attr:
    field: Field
    kind: str = "text"
    keyword: str = ""   # the DICOM keyword in matching.KEYS, when DICOM matching applies


ATTRIBUTES: dict[str, dict[str, Attr]] = {
    "Study": {
        "name": Attr(Patient.patient_name_key, "name", "PatientName"),
        "patientID": Attr(Patient.patient_id, "text", "PatientID"),
        "dateOfBirth": Attr(Patient.patient_birth_date, "date", "PatientBirthDate"),
        "patientSex": Attr(Patient.patient_sex, "text", "PatientSex"),
        "studyInstanceUID": Attr(Study.study_instance_uid, "uid", "StudyInstanceUID"),
        "accessionNumber": Attr(Study.accession_number, "text", "AccessionNumber"),
        "studyName": Attr(Study.study_description, "text", "StudyDescription"),
        "id": Attr(Study.study_id, "text", "StudyID"),
        "date": Attr(Study.study_date, "date", "StudyDate"),
        "modality": Attr(Study.modalities_in_study, "modalities", "ModalitiesInStudy"),
        "institutionName": Attr(Study.institution_name, "text", "InstitutionName"),
        "referringPhysician": Attr(Study.referring_physician_name_key, "name"),
        "numberOfImages": Attr(Study.number_of_instances, "int"),
    },
    "Series": {
        "name": Attr(Series.series_description, "text", "SeriesDescription"),
        "seriesDescription": Attr(Series.series_description, "text", "SeriesDescription"),
        "seriesDICOMUID": Attr(Series.series_instance_uid, "uid", "SeriesInstanceUID"),
        "seriesInstanceUID": Attr(Series.series_instance_uid, "uid", "SeriesInstanceUID"),
        "modality": Attr(Series.modality, "text", "Modality"),
        "id": Attr(Series.series_number, "int", "SeriesNumber"),
        "date": Attr(Series.series_date, "date", "SeriesDate"),
        "numberOfImages": Attr(Series.number_of_instances, "int"),
    },
    "Image": {
        "sopInstanceUID": Attr(Instance.sop_instance_uid, "uid", "SOPInstanceUID"),
        "sopClassUID": Attr(Instance.sop_class_uid, "uid", "SOPClassUID"),
        "instanceNumber": Attr(Instance.instance_number, "int", "InstanceNumber"),
        "numberOfFrames": Attr(Instance.number_of_frames, "int"),
        "height": Attr(Instance.rows, "int"),
        "width": Attr(Instance.columns, "int"),
        "date": Attr(Instance.content_date, "date", "ContentDate"),
        "modality": Attr(Series.modality, "text", "Modality"),
    },
}


class PredicateError(PacsError, ValueError):
    """The request cannot be parsed or names an attribute we do not have (OsiriX: 400, the
    XML-RPC answer's error code). Still a ValueError, as it was before it carried a status."""

    http_status = 400


# --- tokens -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<num>-?\d+(?:\.\d+)?)(?![\w.])
    | (?P<op>==|=|!=|<>|<=|>=|<|>|&&|\|\||!|\(|\)|\{|\}|,)
    | (?P<word>[A-Za-z_][\w.]*)(?P<mod>\[[cdn]{1,3}\])?
    )""", re.VERBOSE)
_WORD_OPS = {"LIKE", "BEGINSWITH", "CONTAINS", "ENDSWITH", "IN", "AND", "OR", "NOT",
             "TRUEPREDICATE", "FALSEPREDICATE"}
_COMPARE = {"==", "=", "!=", "<>", "<", "<=", ">", ">=", "LIKE", "BEGINSWITH", "CONTAINS",
            "ENDSWITH", "IN"}


@dataclass
class _Tok:
    kind: str   # str num op word
    text: str
    mod: str = ""


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PredicateError(f"cannot read the request at {text[pos:pos + 20]!r}")
        pos = m.end()
        if m["str"]:
            body = m["str"][1:-1]
            out.append(_Tok("str", re.sub(r"\\(.)", r"\1", body)))
        elif m["num"]:
            out.append(_Tok("num", m["num"]))
        elif m["op"]:
            out.append(_Tok("op", m["op"]))
        else:
            word = m["word"]
            if word.upper() in _WORD_OPS:
                out.append(_Tok("op", word.upper(), (m["mod"] or "").lower()))
            elif m["mod"]:
                raise PredicateError(f"{m['mod']} after {word!r}")
            else:
                out.append(_Tok("word", word))
    return out


# --- values and conditions --------------------------------------------------------------------

def _glob_literal(value: str) -> str:
    """A literal for a GLOB pattern (matching.glob): its own metacharacters made harmless."""
    return re.sub(r"([*?\[])", r"[\1]", value)


def _like_to_glob(pattern: str) -> str:
    """NSPredicate LIKE (* any run, ? one character, backslash escapes) -> a GLOB pattern."""
    out, escaped = [], False
    for ch in pattern:
        if escaped:
            out.append(_glob_literal(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "[":
            out.append("[[]")
        else:
            out.append(ch)
    return "".join(out)


def _norm_name(value: str) -> str:
    """OsiriX shows 'DOE^JOHN' as 'DOE JOHN'; either form matches the upper-cased key."""
    return re.sub(r"[\^ ]+", " ", value.upper()).strip()


def _norm_date(value: str) -> str:
    v = value.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
        return v.replace("-", "")
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}\s*-\s*\d{4}-\d{2}-\d{2}", v):
        lo, hi = re.split(r"\s*-\s*(?=\d{4}-)", v, maxsplit=1)
        return lo.replace("-", "") + "-" + hi.replace("-", "")
    return v


def _comparison(attr: Attr, op: str, mod: str, value: Any) -> Any:
    name = attr.kind == "name"
    ci = "c" in mod and not name and attr.kind != "int"   # names always compare upper-cased
    # A person name is kept upper-cased with '^'; it is compared with '^' folded to spaces.
    col: Any = fn.TRIM(fn.REPLACE(attr.field, "^", " ")) if name else attr.field
    if ci:
        col = fn.UPPER(col)

    def norm(v: Any) -> Any:
        if attr.kind == "int":
            return _scalar(attr, v)
        text = str(v)
        if name:
            return _norm_name(text)
        if attr.kind == "date":
            text = _norm_date(text)
        return text.upper() if ci else text

    if op == "IN":
        values = value if isinstance(value, list) else [value]
        if attr.kind == "modalities":
            return _dicom(attr.keyword, "\\".join(str(v) for v in values))
        return col.in_([norm(v) for v in values])
    if isinstance(value, list):
        raise PredicateError(f"a list needs IN, not {op}")
    v = norm(value)
    if attr.kind == "modalities" and op in ("==", "=", "!=", "<>"):
        cond = _dicom(attr.keyword, v)   # C.2.2.2.8: any series of that modality
        return (cond is not True and ~cond) if op in ("!=", "<>") else cond
    if op in ("==", "="):
        if attr.kind == "date" and "-" in v:
            return _dicom(attr.keyword, v)   # a DICOM date range, inclusive
        return col == v
    if op in ("!=", "<>"):
        return col != v
    if attr.kind == "modalities":
        if op in ("<", "<=", ">", ">="):
            raise PredicateError(f"{op} does not apply to modality")
    elif op in ("<", "<=", ">", ">="):
        if attr.kind in ("date", "text", "uid"):   # an empty value is unknown, not "earliest"
            return Expression(col, op, v) & (attr.field != "")
        return Expression(col, op, v)
    if attr.kind == "int":
        raise PredicateError(f"{op} does not apply to a number")
    pattern = {"LIKE": _like_to_glob(v), "BEGINSWITH": _glob_literal(v) + "*",
               "CONTAINS": "*" + _glob_literal(v) + "*", "ENDSWITH": "*" + _glob_literal(v)}[op]
    if attr.kind == "modalities":
        # Study.modality holds every modality of the study: match any one of them.
        mcol = fn.UPPER(Series.modality) if ci else Series.modality
        return Study.id.in_(Series.select(Series.study).where(matching.glob(mcol, pattern)))
    return matching.glob(col, pattern)


def _dicom(keyword: str, value: str) -> Any:
    """DICOM matching from matching.condition; True where it means universal matching."""
    try:
        cond = matching.condition(keyword, value)
    except matching.QueryError as e:
        raise PredicateError(str(e)) from None
    return True if cond is None else cond


def _scalar(attr: Attr, value: Any) -> Any:
    if attr.kind != "int":
        return str(value)
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise PredicateError(f"{value!r} is not a number") from None


def resolve(table: str, keypath: str) -> Attr:
    """An OsiriX key path on `table` -> the attribute it names."""
    parts = keypath.split(".")
    entity = table
    for rel in parts[:-1]:   # series.study.patientID, study.name, ...
        if rel == "series" and entity == "Image":
            entity = "Series"
        elif rel == "study" and entity in ("Series", "Image"):
            entity = "Study"
        elif rel == "image" or rel == "images" or rel == "series" or rel == "study":
            raise PredicateError(f"{keypath!r}: only relationships upwards are supported "
                                 f"(e.g. study.patientID on Series)")
        else:
            raise PredicateError(f"unknown relationship {rel!r} in {keypath!r}")
    name = parts[-1]
    while entity:
        attr = ATTRIBUTES[entity].get(name)
        if attr is not None:
            return attr
        entity = UPPER[entity]
    known, entity = set(), table
    while entity:
        known |= set(ATTRIBUTES[entity])
        entity = UPPER[entity]
    raise PredicateError(f"unknown attribute {keypath!r} for {table} (known: "
                         f"{', '.join(sorted(known))})")


class _Parser:
    def __init__(self, table: str, text: str) -> None:
        if len(text) > MAX_REQUEST:
            raise PredicateError(f"request longer than {MAX_REQUEST} characters")
        self.table = table
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise PredicateError("the request ends too early")
        self.i += 1
        return tok

    def is_op(self, *ops: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == "op" and tok.text in ops

    def parse(self) -> Expression | None:
        if not self.toks:
            raise PredicateError("empty request")
        expr = self.or_(0)
        if self.peek() is not None:
            raise PredicateError(f"unexpected {self.peek().text!r}")  # type: ignore[union-attr]
        return expr

    def or_(self, depth: int) -> Any:
        left = self.and_(depth)
        while self.is_op("OR", "||"):
            self.take()
            left = _combine(left, self.and_(depth), "OR")
        return left

    def and_(self, depth: int) -> Any:
        left = self.not_(depth)
        while self.is_op("AND", "&&"):
            self.take()
            left = _combine(left, self.not_(depth), "AND")
        return left

    def not_(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise PredicateError("request nested too deeply")
        if self.is_op("NOT", "!"):
            self.take()
            inner = self.not_(depth + 1)
            return False if inner is True else True if inner is False else ~inner
        if self.is_op("("):
            self.take()
            inner = self.or_(depth + 1)
            if not self.is_op(")"):
                raise PredicateError("missing ')'")
            self.take()
            return inner
        if self.is_op("TRUEPREDICATE", "FALSEPREDICATE"):
            return self.take().text == "TRUEPREDICATE"
        return self.comparison()

    def value(self) -> Any:
        tok = self.take()
        if tok.kind in ("str", "num"):
            return tok.text
        if tok.kind == "op" and tok.text == "{":
            values = []
            while not self.is_op("}"):
                values.append(self.value())
                if self.is_op(","):
                    self.take()
                elif not self.is_op("}"):
                    raise PredicateError("expected ',' or '}' in a list")
                if len(values) > 1000:
                    raise PredicateError("list too long")
            self.take()
            return values
        if tok.kind == "word" and tok.text.upper() in ("NIL", "NULL"):
            return ""
        raise PredicateError(f"expected a quoted value, not {tok.text!r}")

    def comparison(self) -> Expression:
        tok = self.take()
        if tok.kind != "word":
            raise PredicateError(f"expected an attribute name, not {tok.text!r}")
        attr = resolve(self.table, tok.text)
        op = self.take()
        if op.kind != "op" or op.text not in _COMPARE:
            raise PredicateError(f"expected a comparison after {tok.text!r}, not {op.text!r}")
        return _comparison(attr, op.text, op.mod, self.value())


def _combine(left: Any, right: Any, how: str) -> Any:
    """AND / OR of two conditions, where True / False stand for TRUEPREDICATE / FALSEPREDICATE."""
    if how == "AND":
        if left is True or right is False:
            return right
        if right is True or left is False:
            return left
        return left & right
    if left is False or right is True:
        return right
    if right is False or left is True:
        return left
    return left | right


def parse(table: str, request: str) -> Any:
    """The condition for a DBWindowFind request on `table`: a peewee expression, or True / False
    for requests that match everything / nothing."""
    if table not in TABLES:
        raise PredicateError(f"table {table!r} is not one of {', '.join(TABLES)}")
    return _Parser(table, request).parse()


# --- the reads -----------------------------------------------------------------------------

def select(table: str, cond: Any) -> Any:
    """Rows of `table` (joined up to the patient) matching `cond`, oldest first."""
    model = MODEL[table]
    q = model.select(model, Series, Study, Patient) if table == "Image" else \
        model.select(model, Study, Patient) if table == "Series" else \
        model.select(model, Patient)
    if table == "Image":
        q = q.join(Series).join(Study).join(Patient)
    elif table == "Series":
        q = q.join(Study).join(Patient)
    else:
        q = q.join(Patient)
    if cond is False:
        q = q.where(model.id < 0)
    elif cond is not True:
        q = q.where(cond)
    return q.order_by(model.id)


UID_FIELD = {"Study": Study.study_instance_uid, "Series": Series.series_instance_uid,
             "Image": Instance.sop_instance_uid}


@dataclass
class Found:
    rows: list[Any]    # model rows, joined up to the patient: reading them costs no query
    count: int         # how many match (beyond the rows, when there are more)
    uids: list[str]    # with `uids`: the UIDs of every match, at the table's level


def find(table: str, cond: Any, limit: int, uids: bool = False) -> Found:
    """DBWindowFind: at most `limit` rows of `table` matching `cond` (from `parse`), how many
    match, and with `uids` the UID of each (what a Delete removes). One query when at most
    `limit` match; a count beyond that, and the UIDs, one more each."""
    with reading():
        q = select(table, cond)
        rows = list(q.limit(limit + 1))
        count = len(rows) if len(rows) <= limit else q.count()
        found = ([str(u) for (u,) in q.select(UID_FIELD[table]).tuples()]
                 if uids and count else [])
    return Found(rows[:limit], count, found)


def within(cond: Any, scope: Any) -> Any:
    """`cond` (from `parse` or `exact`) narrowed to what a caller's scope
    (pacsd.query.scope.Scope; None: everything) allows."""
    if scope is None or cond is False:
        return cond
    return scope.condition() if cond is True or cond is None else cond & scope.condition()


def exact(keys: dict[str, str]) -> Any:
    """The condition that each DICOM keyword's column holds exactly its value (DisplayStudy /
    DisplaySeries: no wildcards, no case folding), or None for no keys."""
    cond = None
    for keyword, value in keys.items():
        c = matching.KEYS[keyword].field == value
        cond = c if cond is None else cond & c
    return cond


def first_rows(table: str, cond: Any, limit: int) -> list[Any]:
    """At most `limit` rows of `table` matching `cond` (from `exact` or `parse`), oldest first."""
    with reading():
        return list(select(table, cond).limit(limit))
