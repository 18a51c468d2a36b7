"""What each plugin hook is given: one TypedDict per payload, and the hooks' signatures.

The contract between pacsd and its plugins, in the manner of datasette's hookspecs. A plugin
may annotate its functions with these types (`def on_study_stable(event: StudyStable) -> None`,
with `from pacsd.plugins.specs import StudyStable`). A payload is a plain dict at run time; each
notification gets a copy of its own.

Notifications run after the fact on threads of their own and their answer is ignored;
filters are waited for (at most `[hooks] timeout` seconds): `None` or `True` accepts,
`False` or a string (the reason) refuses, any other value replaces what was asked about.

The host is pacsd.plugins.hooks. The manual's hooks reference is generated from this module
(docs/hooks/generate.py): the paragraphs above, each signature and class docstring, and the
string under each field.
"""

# No `from __future__ import annotations`: TypedDict reads NotRequired from evaluated
# annotations only (Python < 3.14); names imported for type checking alone are quoted.
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

if TYPE_CHECKING:
    import bottle
    from pydicom.dataset import Dataset

    from pacsd.plugins.hooks import Context


class Peer(TypedDict):
    """Who is on the other end of a DICOM association."""

    calling_aet: str
    """The caller's AE title, stripped of padding."""
    called_aet: str
    """The AE title the caller asked for (this server's, normally)."""
    peer_address: str
    """The caller's IP address."""


class Association(Peer):
    """`on_association`: a peer asks to associate; nothing is negotiated yet. Refusing answers
    A-ASSOCIATE-RJ (calling AE title not recognised)."""


class StoreRequest(Peer):
    """`on_store`: the second argument, beside the decoded data set, of one C-STORE."""

    sop_class_uid: str
    """Affected SOP Class UID of the request."""
    sop_instance_uid: str
    """Affected SOP Instance UID of the request."""
    transfer_syntax: str
    """The transfer syntax UID the data set came in (and is kept in)."""


class Query(TypedDict):
    """`on_query`: a C-FIND or a QIDO-RS search, before it is matched. Return it with other
    `keys` to restrict what is matched (this does not restrict retrieval)."""

    source: Literal["C-FIND", "QIDO-RS"]
    """Which front end asks."""
    level: str
    """PATIENT, STUDY, SERIES or IMAGE."""
    keys: dict[str, str]
    """The matching keys, by DICOM keyword, as the caller sent them (values as strings)."""
    peer_address: str
    """The caller's IP address (for QIDO-RS, the client's, as the web side believes it)."""
    calling_aet: NotRequired[str]
    """C-FIND only: the caller's AE title."""
    called_aet: NotRequired[str]
    """C-FIND only: the AE title the caller asked for."""
    user: NotRequired[str]
    """QIDO-RS only: the logged-in user's name; empty when the web side is open."""


class InstanceStored(TypedDict):
    """`on_instance_stored`: a new instance was stored, its file and index row committed. Not
    sent for a duplicate (the same SOP Instance UID with the same content). Values taken from
    the header are '' when it lacks them."""

    sop_instance_uid: str
    """SOP Instance UID."""
    study_uid: str
    """Study Instance UID."""
    series_uid: str
    """Series Instance UID."""
    calling_aet: str
    """AE title of the sender (empty for STOW-RS)."""
    path: str
    """Absolute path of the stored file."""
    sop_class_uid: str
    """SOP Class UID, from the header."""
    patient_id: str
    """Patient ID, from the header."""
    patient_name: str
    """Patient's Name, from the header."""
    modality: str
    """Modality, from the header."""
    study_date: str
    """Study Date (YYYYMMDD), from the header."""
    accession_number: str
    """Accession Number, from the header."""
    study_description: str
    """Study Description, from the header."""


class StudyStable(TypedDict):
    """`on_study_stable`: a study received nothing for `[hooks] study_stable_after` seconds. It
    fires again, with the new totals, when more instances arrive later. Values from the index."""

    study_uid: str
    """Study Instance UID."""
    patient_id: str
    """Patient ID."""
    patient_name: str
    """Patient's Name."""
    study_date: str
    """Study Date (YYYYMMDD)."""
    study_time: str
    """Study Time."""
    accession_number: str
    """Accession Number."""
    study_description: str
    """Study Description."""
    modalities: list[str]
    """The series' modalities, sorted, each once."""
    series: int
    """Number of series in the study."""
    instances: int
    """Number of instances in the study."""
    calling_aets: list[str]
    """AE titles that sent the study's instances, sorted."""
    referring_physician_name: str
    """Referring Physician's Name."""
    issuer_of_patient_id: str
    """Issuer of Patient ID."""
    patient_birth_date: str
    """Patient's Birth Date."""
    patient_sex: str
    """Patient's Sex."""


#: Each hook pacsd calls with a payload: (kind, payload type). The hooks reference lists them in
#: this order; tests/test_hooks.py checks it against pacsd.plugins.hooks.
PAYLOADS: dict[str, tuple[Literal["notification", "filter"], type]] = {
    "on_instance_stored": ("notification", InstanceStored),
    "on_study_stable": ("notification", StudyStable),
    "on_association": ("filter", Association),
    "on_store": ("filter", StoreRequest),
    "on_query": ("filter", Query),
}


# --- the hooks' signatures: what a plugin defines (all optional) --------------------------------

def setup(settings: dict[str, Any], context: "Context") -> None:
    """Once, at start-up, with the plugin's `[plugin.NAME]` table and `Context` (this server's
    AE title `aet`, and its data folder `data`: a plugin may keep its own state in
    `data / "plugins" / NAME`). A plugin whose setup raises is logged and left out."""


def on_instance_stored(event: InstanceStored) -> None:
    """Notification, after each new instance is committed (file and index row)."""


def on_study_stable(event: StudyStable) -> None:
    """Notification, once a study has received nothing for `[hooks] study_stable_after`
    seconds; again, with the new totals, when more instances arrive later."""


def on_association(event: Association) -> None | bool | str:
    """Filter: `False` or a reason refuses the calling AE title (A-ASSOCIATE-RJ)."""


def on_store(dataset: "Dataset", event: StoreRequest) -> "None | bool | str | Dataset":
    """Filter: `False` or a reason refuses the image (the sender gets 0x0124, Not Authorized);
    a returned data set is stored instead (encoded in the same transfer syntax; not for a
    deflated one). The data set is decoded only when some plugin has this hook. Return a
    changed copy rather than change the one given: changes made in place before a failure are
    not undone."""


def on_query(event: Query) -> None | bool | str | Query:
    """Filter: `False` or a reason refuses the search (C-FIND 0x0124, QIDO-RS 403); the event
    returned with other `keys` is matched instead."""


def routes(app: "bottle.Bottle") -> None:
    """Add HTTP routes to `app`, served under `/plugins/NAME/` behind the same logins as the
    rest of the web side."""


#: The functions a plugin may define, in the order the reference lists them.
SIGNATURES = (setup, on_instance_stored, on_study_stable, on_association, on_store, on_query,
              routes)
