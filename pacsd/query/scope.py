"""Who sees which studies (issue 22): a `Scope` is what one restricted caller may see, as SQL
on the study table, applied by every read that finds or serves studies for a caller (C-FIND,
C-GET, C-MOVE, QIDO-RS, WADO, the pages, XML-RPC, ZIPs, sends).

None means no restriction (administrators, and users and nodes in no [[groups]]). A scope
made of several groups sees the union of theirs. Studies are told apart by their UID only, so
labels (pacsd_label) can be set before a study arrives and outlive its deletion and restore.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from peewee import SQL

from pacsd.index.models import Instance, Label, Patient, Series, Share, Study, name_key, reading
from pacsd.query.matching import glob


@dataclass(frozen=True)
class Scope:
    """The studies carrying one of `labels`, or referred by a physician matching one of
    `referring` (DICOM wildcards, case ignored), or received from one of `calling_aets`, or
    named in `studies` (a share link's one study)."""

    labels: frozenset[str] = frozenset()
    referring: tuple[str, ...] = ()
    calling_aets: frozenset[str] = frozenset()
    studies: frozenset[str] = frozenset()
    who: str = field(default="", compare=False)   # for log lines: "groups a, b", "share link"

    @property
    def empty(self) -> bool:
        return not (self.labels or self.referring or self.calling_aets or self.studies)

    def condition(self) -> Any:
        """SQL true for a study row (Study must be in the query) this scope allows."""
        parts: list[Any] = []
        if self.studies:
            parts.append(Study.study_instance_uid.in_(sorted(self.studies)))
        if self.labels:
            parts.append(Study.study_instance_uid.in_(
                Label.select(Label.study_uid).where(Label.label.in_(sorted(self.labels)))))
        for pattern in self.referring:
            # Wildcards as C-FIND's ('[' made literal), on the upper-cased key column.
            parts.append(glob(Study.referring_physician_name_key,
                              name_key(pattern).replace("[", "[[]")))
        if self.calling_aets:
            parts.append(Study.id.in_(
                Series.select(Series.study).join(Instance)
                .where(Instance.calling_aet.in_(sorted(self.calling_aets)))))
        if not parts:
            return SQL("1 = 0")
        cond = parts[0]
        for p in parts[1:]:
            cond = cond | p
        return cond

    def patient_condition(self) -> Any:
        """SQL true for a patient row with at least one study this scope allows."""
        return Patient.id.in_(Study.select(Study.patient).where(self.condition()))

    def allows(self, study_uid: str) -> bool:
        return bool(self.visible([study_uid]))

    def visible(self, study_uids: Iterable[str]) -> set[str]:
        """Which of these studies this scope allows (those not stored count as not allowed,
        except a share link's own)."""
        uids = sorted(set(study_uids))
        out: set[str] = set()
        with reading():
            for i in range(0, len(uids), 500):
                batch = uids[i:i + 500]
                rows: Any = (Study.select(Study.study_instance_uid)
                             .where(Study.study_instance_uid.in_(batch) & self.condition())
                             .tuples())
                out.update(r[0] for r in rows)
        return out


def of_groups(groups: Sequence[Any], who: str) -> Scope | None:
    """The scope of a user or node in these [[groups]] (config.Group); None, everything, for
    one in no group: as before groups existed."""
    if not groups:
        return None
    return merged([Scope(labels=frozenset(g.labels), referring=tuple(g.referring),
                         calling_aets=frozenset(g.calling_aets)) for g in groups],
                  who=f"{who} (group {', '.join(g.name for g in groups)})")


def merged(scopes: Sequence[Scope], who: str = "") -> Scope:
    """One scope that allows what any of these allows."""
    return Scope(labels=frozenset().union(*(s.labels for s in scopes)),
                 referring=tuple(dict.fromkeys(p for s in scopes for p in s.referring)),
                 calling_aets=frozenset().union(*(s.calling_aets for s in scopes)),
                 studies=frozenset().union(*(s.studies for s in scopes)), who=who)


def study_of(level: str, uid: str) -> str | None:
    """The Study Instance UID holding this series ("SERIES") or instance ("IMAGE")."""
    with reading():
        if level == "SERIES":
            q = Study.select(Study.study_instance_uid).join(Series).where(
                Series.series_instance_uid == uid)
        else:
            q = (Study.select(Study.study_instance_uid).join(Series).join(Instance)
                 .where(Instance.sop_instance_uid == uid))
        return q.scalar()


# --- labels -----------------------------------------------------------------------------------

def labels_of(study_uids: Iterable[str]) -> dict[str, list[str]]:
    """Study UID -> its labels, sorted (every UID asked is a key)."""
    uids = list(dict.fromkeys(study_uids))
    out: dict[str, list[str]] = {u: [] for u in uids}
    with reading():
        for i in range(0, len(uids), 500):
            rows: Any = (Label.select(Label.study_uid, Label.label)
                         .where(Label.study_uid.in_(uids[i:i + 500]))
                         .order_by(Label.label).tuples())
            for study, label in rows:
                out[study].append(label)
    return out


def all_labels() -> list[tuple[str, int]]:
    """Every label in use and how many studies carry it."""
    from peewee import fn
    with reading():
        rows: Any = (Label.select(Label.label, fn.COUNT(Label.id)).group_by(Label.label)
                     .order_by(Label.label).tuples())
        return [(str(label), int(n)) for label, n in rows]


def with_label(label: str) -> Any:
    """SQL true for a study carrying this label (the study list's filter)."""
    return Study.study_instance_uid.in_(Label.select(Label.study_uid)
                                        .where(Label.label == label))


# --- share links ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShareLink:
    token_hash: str
    study_uid: str
    created_by: str
    created: float
    expires: float
    pin_hash: str | None
    revoked: float | None
    uses: int
    note: str

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("pin_hash")
        d["pin"] = self.pin_hash is not None
        d["id"] = self.token_hash[:16]
        return d


_SHARE_FIELDS = (Share.token_hash, Share.study_uid, Share.created_by, Share.created,
                 Share.expires, Share.pin_hash, Share.revoked, Share.uses, Share.note)


def share(token_hash: str) -> ShareLink | None:
    with reading():
        row: Any = (Share.select(*_SHARE_FIELDS).where(Share.token_hash == token_hash)
                    .tuples().first())
    return ShareLink(*row) if row else None


def shares(study_uid: str | None = None, limit: int = 500) -> list[ShareLink]:
    """Share links, newest first, of one study or all."""
    with reading():
        q = Share.select(*_SHARE_FIELDS)
        if study_uid:
            q = q.where(Share.study_uid == study_uid)
        rows: Any = q.order_by(Share.created.desc()).limit(limit).tuples()
        return [ShareLink(*r) for r in rows]


def share_by_id(prefix: str) -> ShareLink | None:
    """A link by the first 16 hex digits of its hash (what the pages show and revoke by)."""
    if len(prefix) != 16 or any(c not in "0123456789abcdef" for c in prefix):
        return None
    with reading():
        row: Any = (Share.select(*_SHARE_FIELDS).where(Share.token_hash.startswith(prefix))
                    .tuples().first())
    return ShareLink(*row) if row else None
