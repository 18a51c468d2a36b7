"""The tables of the index, as peewee models, for every backend (SQLite, PostgreSQL).

Patient / Study / Series / Instance hold everything C-FIND and QIDO-RS match or return, so no
query opens a file. Beside them: facts about the index itself (pacsd_meta), the nodes and users
added on the admin page (pacsd_node, pacsd_user) and the leases that let one node of several
run a job alone (pacsd_lease).

The models sit behind one DatabaseProxy, bound by `Index.open` (pacsd.index) to the database
that pacsd.index.backends makes from `[index] url`. Schema changes go through pacsd.index.migrations.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peewee import (
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    Expression,
    Field,
    ForeignKeyField,
    IntegerField,
    Model,
)
from playhouse.pool import PooledDatabase

database = DatabaseProxy()


class Text(CharField):
    """A DICOM string column: no length limit (a peer's over-long value must not fail a
    C-STORE), compared byte by byte. PostgreSQL gets `TEXT COLLATE "C"` (pacsd.index.backends): DICOM
    matching is case-sensitive, and only the C collation lets a btree index serve
    `LIKE 'prefix%'` and the range bounds of pacsd.query."""

    field_type = "PACSD_TEXT"

    def get_modifiers(self) -> None:   # no VARCHAR(n)
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Patient(BaseModel):
    id = AutoField()
    patient_id = Text(index=True)
    issuer_of_patient_id = Text(default="", index=True)
    patient_name = Text(default="")
    # Upper-cased copy for case-insensitive person name matching (PS3.4 C.2.2.2.1).
    patient_name_key = Text(default="", index=True)
    # The pages' search and sort key (search_key; schema 7). NULL only until the migration
    # to schema 7 has filled the rows it found (migrations.fill_search_keys).
    patient_name_search = Text(null=True, index=True)
    patient_birth_date = Text(default="", index=True)
    patient_sex = Text(default="", index=True)
    number_of_studies = IntegerField(default=0)
    number_of_series = IntegerField(default=0)
    number_of_instances = IntegerField(default=0)

    class Meta:
        indexes = ((("patient_id", "issuer_of_patient_id"), True),)


class Study(BaseModel):
    id = AutoField()
    patient = ForeignKeyField(Patient, backref="studies", index=True)
    study_instance_uid = Text(unique=True)
    study_date = Text(default="", index=True)
    study_time = Text(default="", index=True)
    accession_number = Text(default="", index=True)
    study_id = Text(default="", index=True)
    study_description = Text(default="", index=True)
    study_description_search = Text(null=True, index=True)   # as patient_name_search
    referring_physician_name = Text(default="")
    referring_physician_name_key = Text(default="", index=True)
    institution_name = Text(default="", index=True)
    patient_age = Text(default="", index=True)
    specific_character_set = Text(default="")
    modalities_in_study = Text(default="")
    number_of_series = IntegerField(default=0)
    number_of_instances = IntegerField(default=0)
    created = DateTimeField(default=_now, index=True)


class Series(BaseModel):
    id = AutoField()
    study = ForeignKeyField(Study, backref="series", index=True)
    series_instance_uid = Text(unique=True)
    modality = Text(default="", index=True)
    series_number = IntegerField(null=True, index=True)
    series_description = Text(default="", index=True)
    series_date = Text(default="", index=True)
    series_time = Text(default="", index=True)
    body_part_examined = Text(default="", index=True)
    protocol_name = Text(default="", index=True)
    station_name = Text(default="", index=True)
    number_of_instances = IntegerField(default=0)

    class Meta:
        indexes = ((("study", "modality"), False),)


class Instance(BaseModel):
    id = AutoField()
    series = ForeignKeyField(Series, backref="instances", index=True)
    sop_instance_uid = Text(unique=True)
    sop_class_uid = Text(index=True)
    instance_number = IntegerField(null=True, index=True)
    content_date = Text(default="", index=True)
    content_time = Text(default="", index=True)
    acquisition_number = IntegerField(null=True, index=True)
    number_of_frames = IntegerField(null=True)
    rows = IntegerField(null=True)
    columns = IntegerField(null=True)
    transfer_syntax_uid = Text()
    path = Text(unique=True)   # relative to the storage root
    size = BigIntegerField()   # whole-slide and long multi-frame files pass 2 GiB
    calling_aet = Text(default="", index=True)   # schema 10: [[groups]] calling_aet scopes
    received = DateTimeField(default=_now, index=True)
    # SHA-256 of the data set bytes after the File Meta group (which every receiver rewrites),
    # in hex: a re-send with other content is told from a true duplicate. NULL for instances
    # stored before schema 4 (computed when one is sent again).
    content_hash = Text(null=True)


class Meta_(BaseModel):
    """Key/value facts about the index itself (schema version, health probes)."""

    key = CharField(primary_key=True, max_length=64)
    value = CharField(max_length=255)

    class Meta:
        table_name = "pacsd_meta"


class NodeRow(BaseModel):
    """A DICOM node added on the admin page (pacsd.accounts)."""

    name = CharField(primary_key=True, max_length=64)
    aet = CharField(max_length=16, unique=True)
    host = CharField(max_length=255)
    port = IntegerField()
    # What the node may ask of us (config.Node); schema 5.
    allow_find = BooleanField(default=True)
    allow_get = BooleanField(default=True)
    allow_move = BooleanField(default=True)
    allow_store = BooleanField(default=True)
    # Its WADO-URI endpoint on its own host (config.Node.wado_url); NULL for none; schema 6.
    wado_url = CharField(max_length=1024, null=True)

    class Meta:
        table_name = "pacsd_node"


class UserRow(BaseModel):
    """A web user added on the admin page (pacsd.accounts)."""

    name = CharField(primary_key=True, max_length=64)
    password_hash = CharField(max_length=255)
    admin = BooleanField(default=False)

    class Meta:
        table_name = "pacsd_user"


class Lease(BaseModel):
    """Who runs a must-run-once job, until when (seconds since the epoch, by the database's
    clock so that nodes with drifting clocks agree)."""

    name = CharField(primary_key=True, max_length=64)
    holder = CharField(max_length=255)
    expires = DoubleField()   # float8: a float4 of epoch seconds is off by minutes

    class Meta:
        table_name = "pacsd_lease"


class RouteJob(BaseModel):
    """A durable routing job (pacsd.nodes.routing): one study, or one instance, for one destination.
    Claimed by a node until `claimed_until` (database clock); a node that dies leaves it to be
    claimed again, so an instance may be sent twice (harmless in DICOM), never not at all."""

    id = AutoField()
    route = CharField(max_length=64)
    destination = CharField(max_length=64)   # a node's name
    study_uid = Text()
    sop_uid = Text(default="")               # empty: the whole study
    state = CharField(max_length=8, default="queued")   # queued, done, dead
    attempts = IntegerField(default=0)
    next_try = DoubleField(default=0.0)
    claimed_by = CharField(max_length=255, default="")
    claimed_until = DoubleField(default=0.0)
    last_error = Text(default="")
    created = DoubleField(default=0.0)
    updated = DoubleField(default=0.0)

    class Meta:
        table_name = "pacsd_route_job"
        indexes = ((("state", "next_try"), False), (("destination", "state"), False))


class StudyActivity(BaseModel):
    """When each study last received an instance (database clock), until it is stable: the
    on_study_stable hooks and the when = "stable" routes then run, and the row goes."""

    study_uid = Text(primary_key=True)
    last_received = DoubleField(index=True)

    class Meta:
        table_name = "pacsd_study_activity"


class Totals(BaseModel):
    """What the whole index holds, in one row kept by the writer in the same transactions as
    the rows it counts (pacsd.index.counters), so that `/status` and the admin page read five
    numbers instead of counting ten million rows."""

    id = IntegerField(primary_key=True)   # always 1
    patients = BigIntegerField(default=0)
    studies = BigIntegerField(default=0)
    series = BigIntegerField(default=0)
    instances = BigIntegerField(default=0)
    bytes = BigIntegerField(default=0)

    class Meta:
        table_name = "pacsd_totals"


class Conflict(BaseModel):
    """A copy of a stored SOP Instance UID that came with other content: refused (C-STORE
    0x0111), yet kept aside under STORAGE/.conflicts so that nothing a sender handed over is
    lost. While one exists, storage commitment reports the instance as failed: the request
    names no content, so pacsd cannot tell which copy the asker holds. Resolved by deleting
    the instance (its conflicts go with it; their files stay for a person to look at)."""

    id = AutoField()
    sop_instance_uid = Text(index=True)
    content_hash = Text()
    path = Text()               # relative to the storage root, under .conflicts/
    transfer_syntax_uid = Text(default="")
    calling_aet = Text(default="")
    received = DateTimeField(default=_now)

    class Meta:
        table_name = "pacsd_conflict"


class Change(BaseModel):
    """What was done to the archive by hand or by a rule, for `pacsd history` and the pages:
    a deletion (to the bin), a restore from it, a purge of it. One row per action, whatever
    the number of instances it touched; `detail` holds what the object was (JSON)."""

    id = AutoField()
    at = DoubleField(index=True)             # seconds since the epoch
    who = Text(default="")                  # a web user, "xml-rpc from ...", a command's user
    action = CharField(max_length=16)       # delete, restore, purge
    level = CharField(max_length=8)         # STUDY, SERIES, IMAGE
    uid = Text(index=True)                  # the object acted on
    study_uid = Text(default="", index=True)   # its study: `pacsd history STUDY` lists all
    instances = IntegerField(default=0)
    detail = Text(default="")

    class Meta:
        table_name = "pacsd_history"


class Binned(BaseModel):
    """An instance in the recycle bin (pacsd.storage.trash): its row taken out of the index,
    its file moved, byte for byte, to STORAGE/.trash/<path>; what its index row said beside it
    so that a restore puts it back as it was, and the bin can be listed without opening files."""

    id = AutoField()
    deletion = IntegerField(index=True)     # the pacsd_history row of the deletion
    deleted = DoubleField(index=True)       # seconds since the epoch
    sop_instance_uid = Text(index=True)
    series_instance_uid = Text(index=True)
    study_instance_uid = Text(index=True)
    patient_id = Text(default="")
    patient_name = Text(default="")
    study_date = Text(default="")
    study_description = Text(default="")
    modality = Text(default="")
    path = Text(unique=True)                # where it was stored (relative to the storage root)
    size = BigIntegerField()
    transfer_syntax_uid = Text(default="")
    calling_aet = Text(default="")
    received = Text(default="")
    content_hash = Text(null=True)

    class Meta:
        table_name = "pacsd_trash"


class Damage(BaseModel):
    """A stored file found not to be what was stored (pacsd.storage.integrity): missing, or
    its content no longer the content hash kept at ingest. While it is here, the instance is
    never sent (C-GET, C-MOVE, WADO answer a failure for it); it goes when a check finds the
    file sound again (put back from a copy) or the instance is deleted."""

    sop_instance_uid = Text(primary_key=True)
    path = Text()
    problem = CharField(max_length=16)      # missing, changed, unreadable
    expected = Text(default="")             # the content hash kept at ingest
    actual = Text(default="")               # what the file hashes to now (changed)
    found = DoubleField()                   # seconds since the epoch

    class Meta:
        table_name = "pacsd_damage"


class Label(BaseModel):
    """A label on a study (issue 22): set by hand, by the API or by a [[labels]] rule on ingest;
    what [[groups]] scopes are made of. Keyed by the study's UID, not its row, so that a label
    outlives a deletion and restore of the study and is set before its first instance lands."""

    id = AutoField()
    study_uid = Text(index=True)
    label = CharField(max_length=64, index=True)

    class Meta:
        table_name = "pacsd_label"
        indexes = ((("study_uid", "label"), True),)


class Share(BaseModel):
    """A link that shows one study to whoever holds it, until it expires or is revoked. Only the
    token's SHA-256 is kept: the index never holds what opens the study."""

    token_hash = CharField(primary_key=True, max_length=64)
    study_uid = Text(index=True)
    created_by = Text(default="")
    created = DoubleField()                 # seconds since the epoch
    expires = DoubleField()
    pin_hash = Text(null=True)              # pbkdf2, as users' passwords
    revoked = DoubleField(null=True)
    uses = IntegerField(default=0)
    note = Text(default="")

    class Meta:
        table_name = "pacsd_share"


class ScheduledStep(BaseModel):
    """One item of the Modality Worklist (issue 23): a Scheduled Procedure Step of a Requested
    Procedure (PS3.4 K.6.1), created by an HL7 order, the Worklist page or its API. Its columns
    are what modalities match on and copy into their images; a performed step (PerformedStep)
    reported by the modality, or a study arriving with its accession number, marks it done.

    status: SCHEDULED (and ARRIVED, READY) until a modality starts it; STARTED while an MPPS is
    IN PROGRESS; COMPLETED, DISCONTINUED, CANCELED (by the order's sender or by hand) and
    EXPIRED (housekeeping, past its date) are ended: modalities no longer see them."""

    id = AutoField()
    status = CharField(max_length=16, default="SCHEDULED", index=True)
    source = CharField(max_length=8, default="")          # hl7, web, api
    # The patient (PS3.4 K.6.1.2.2 Patient Identification, Demographic, Medical).
    patient_id = Text(default="", index=True)
    issuer_of_patient_id = Text(default="")
    patient_name = Text(default="")
    patient_name_key = Text(default="", index=True)       # models.name_key
    patient_birth_date = Text(default="")
    patient_sex = Text(default="")
    patient_weight = Text(default="")                     # DS, kg
    patient_size = Text(default="")                       # DS, m
    medical_alerts = Text(default="")
    allergies = Text(default="")
    # The Imaging Service Request and Requested Procedure (K.6.1.2.3 / K.6.1.2.4).
    accession_number = Text(default="", index=True)
    placer_order_number = Text(default="", index=True)
    filler_order_number = Text(default="", index=True)
    requested_procedure_id = Text(default="")
    requested_procedure_description = Text(default="")
    requested_procedure_code = Text(default="")           # value^scheme^meaning
    requested_procedure_priority = Text(default="")       # STAT HIGH ROUTINE MEDIUM LOW
    reason = Text(default="")                              # Reason for the Requested Procedure
    study_instance_uid = Text(unique=True)                # the UID the modality is to use
    referring_physician_name = Text(default="")
    referring_physician_name_key = Text(default="", index=True)
    requesting_physician = Text(default="")
    admission_id = Text(default="")
    # The Scheduled Procedure Step (K.6.1.2.2, the Scheduled Procedure Step Sequence's item).
    sps_id = Text(default="")
    sps_description = Text(default="")
    modality = Text(default="", index=True)
    station_aet = Text(default="", index=True)
    station_name = Text(default="")
    location = Text(default="")
    start_date = Text(default="", index=True)             # YYYYMMDD
    start_time = Text(default="")                          # HHMMSS
    performing_physician_name = Text(default="")
    performing_physician_name_key = Text(default="", index=True)
    protocol_code = Text(default="")                       # value^scheme^meaning
    comments = Text(default="")
    # Bookkeeping.
    created = DoubleField()                                # seconds since the epoch
    updated = DoubleField()
    ended = DoubleField(null=True, index=True)            # when it became COMPLETED ... EXPIRED
    performed_uid = Text(default="")                       # the MPPS that reported on it
    linked_study = Text(default="", index=True)           # the study that arrived for it

    class Meta:
        table_name = "pacsd_worklist"
        indexes = ((("start_date", "modality"), False),)


class PerformedStep(BaseModel):
    """A Modality Performed Procedure Step (PS3.4 F) a modality reported: created IN PROGRESS
    by N-CREATE, then set COMPLETED or DISCONTINUED by N-SET (final: no later change). The
    attributes it carries are kept whole (`attributes`, DICOM JSON, bounded) beside the columns
    the pages and the linking need."""

    sop_instance_uid = Text(primary_key=True)
    status = CharField(max_length=16, index=True)         # IN PROGRESS, COMPLETED, DISCONTINUED
    calling_aet = Text(default="")
    step = IntegerField(null=True, index=True)            # the ScheduledStep it performed
    study_instance_uid = Text(default="", index=True)
    accession_number = Text(default="", index=True)
    patient_id = Text(default="")
    patient_name = Text(default="")
    modality = Text(default="")
    station_aet = Text(default="")
    description = Text(default="")
    started = Text(default="")                             # YYYYMMDDHHMMSS as reported
    finished = Text(default="")
    series = Text(default="")                              # the performed series' UIDs, \-joined
    images = IntegerField(default=0)                       # the instances the series list
    discontinued_reason = Text(default="")
    attributes = Text(default="")                          # DICOM JSON of the whole data set
    created = DoubleField()
    updated = DoubleField(index=True)

    class Meta:
        table_name = "pacsd_mpps"


DICOM_MODELS = (Patient, Study, Series, Instance)
MODELS = (*DICOM_MODELS, Meta_, NodeRow, UserRow, Lease, RouteJob, StudyActivity, Conflict,
          Totals, Change, Binned, Damage, Label, Share, ScheduledStep, PerformedStep)

PATIENT_FIELDS = ("patient_name", "patient_birth_date", "patient_sex")
STUDY_FIELDS = ("study_date", "study_time", "accession_number", "study_id",
                "study_description", "referring_physician_name", "institution_name",
                "patient_age", "specific_character_set")
SERIES_FIELDS = ("modality", "series_number", "series_description", "series_date",
                 "series_time", "body_part_examined", "protocol_name", "station_name")
INSTANCE_FIELDS = ("sop_class_uid", "instance_number", "content_date", "content_time",
                   "acquisition_number", "number_of_frames", "rows", "columns")


def name_key(name: str) -> str:
    """Upper case, without the empty trailing components that some modalities send
    ("DOE^JOHN^^^" matches "Doe^John")."""
    return re.sub(r"[\^ ]+(?=(=|$))", "", name.upper())


# Letters that Unicode does not decompose into a base letter and an accent, but that a
# person types as the base letter (Dansk "Søren" as "soren", Polski "Łukasz" as "lukasz").
_FOLD = str.maketrans({"ø": "o", "đ": "d", "ð": "d", "ł": "l", "ħ": "h", "ı": "i", "ŧ": "t",
                       "æ": "ae", "œ": "oe", "þ": "th"})
# The combining accents of Latin, Greek and Cyrillic letters. Only these are dropped: the
# sound marks of kana (U+3099, U+309A) are not accents, and Hangul jamo are letters.
_ACCENTS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
_NAME_SEPARATORS = re.compile(r"[\s^=,;/\-]+")   # PN components (^) and groups (=), and spaces
_SPACES = re.compile(r"\s+")


def search_key(text: str, name: bool = False) -> str:
    """What the pages search and sort on: casefolded, compatibility-decomposed (NFKD: full-width
    letters and ligatures become plain ones), accents dropped, then composed again (NFC), so
    that "MÜLLER^HANS", "Müller Hans" and "muller hans" have one key while CJK, kana and Hangul
    stay as they are. For a person `name`, the component and group separators (^ =) and
    hyphens become spaces, so that each part of the name is a word ("Yamada^Tarou=山田^太郎"
    -> "yamada tarou 山田 太郎"). Runs of spaces become one; no space at either end."""
    folded = unicodedata.normalize("NFKD", text.casefold()).translate(_FOLD)
    folded = unicodedata.normalize("NFC", _ACCENTS.sub("", folded))
    return _SPACES.sub(" ", _NAME_SEPARATORS.sub(" ", folded) if name else folded).strip()


def starts_with(field: Any, prefix: str) -> Expression:
    """`field` (a column, or an expression with an index) begins with `prefix`, as a range
    on its index (both backends; peewee's startswith is ILIKE on PostgreSQL, which no btree
    index serves)."""
    return (field >= prefix) & (field < prefix + "\U0010ffff")


@contextmanager
def reading() -> Iterator[None]:
    """A connection for this thread's reads.

    SQLite: make sure this thread has a connection, and keep it for the thread's next request:
    HTTP workers and association threads serve many requests, and opening SQLite with its
    pragmas costs more than a small query (a fifth of a viewer's frame request). Outside a
    transaction the connection holds no snapshot, so it never holds back a checkpoint; it is
    closed when its thread ends.
    PostgreSQL: take one from the pool and give it back afterwards, so that a thread that
    ends never keeps a pooled connection from the others."""
    if not isinstance(database.obj, PooledDatabase):
        database.connect(reuse_if_open=True)
        yield
        return
    opened = database.is_closed()
    if opened:
        database.connect()
    try:
        yield
    finally:
        if opened:
            database.close()
