"""What the index keeps for the Modality Worklist (issue 23): the scheduled procedure steps
(pacsd_worklist) and the performed steps modalities report (pacsd_mpps). Writes run on the
writer thread (pacsd.index.writer); reads are pacsd.query.worklist's.

Values arrive checked and as DICOM strings (pacsd.query.worklist.clean_step does it for every
source: HL7, the page, the API), keyed by ScheduledStep's column names."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from peewee import JOIN, fn

from pacsd.index.models import (PerformedStep, ScheduledStep, Study, StudyActivity, name_key)
from pacsd.index.writer import Writer

OPEN = ("SCHEDULED", "ARRIVED", "READY", "STARTED")
ENDED = ("COMPLETED", "DISCONTINUED", "CANCELED", "EXPIRED")
# The person name columns and the upper-cased copies they are matched on.
_NAME_KEYS = {"patient_name": "patient_name_key",
              "referring_physician_name": "referring_physician_name_key",
              "performing_physician_name": "performing_physician_name_key"}
_COLUMNS = frozenset(ScheduledStep._meta.fields) - {  # type: ignore[attr-defined]
    "id", "created", "updated", "ended", *_NAME_KEYS.values()}
_PATIENT = ("patient_id", "issuer_of_patient_id", "patient_name", "patient_birth_date",
            "patient_sex", "patient_weight", "patient_size", "medical_alerts", "allergies")


def _row(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(values) - _COLUMNS
    if unknown:
        raise ValueError(f"not worklist columns: {', '.join(sorted(unknown))}")
    row = dict(values)
    for name, key in _NAME_KEYS.items():
        if name in row:
            row[key] = name_key(str(row[name] or ""))
    return row


def _link(which: Any, study_uid: str, now: float) -> int:
    """Link the open, unlinked steps `which` selects to a study; COMPLETED unless an MPPS is in
    progress on them (STARTED: the modality's N-SET ends those). Writer thread only."""
    which &= ScheduledStep.status.in_(OPEN) & (ScheduledStep.linked_study == "")
    n = int(ScheduledStep.update(linked_study=study_uid, updated=now)
            .where(which & (ScheduledStep.status == "STARTED")).execute())
    return n + int(ScheduledStep.update(status="COMPLETED", linked_study=study_uid, updated=now,
                                        ended=fn.COALESCE(ScheduledStep.ended, now))
                   .where(which).execute())


class Worklist(Writer):
    """Part of pacsd.index.Index."""

    def add_step(self, values: Mapping[str, Any]) -> int:
        """A new scheduled step (study_instance_uid given); its id."""
        row = _row(values)
        now = time.time()
        row.update(created=now, updated=now)
        if row.get("status") in ENDED:
            row["ended"] = now
        new: int = self.submit(lambda: int(ScheduledStep.insert(row).execute()))
        return new

    def update_step(self, step: int, values: Mapping[str, Any]) -> bool:
        """Change a step's values (and status: an ended one gets its end time, one opened
        again loses it); False if there is no such step."""
        row = _row(values)
        now = time.time()
        row["updated"] = now
        if "status" in row:
            row["ended"] = now if row["status"] in ENDED else None

        def work() -> bool:
            q = ScheduledStep.update(row).where(ScheduledStep.id == step)
            if row.get("status") in ENDED:   # keep the first end time
                q = ScheduledStep.update({**row, "ended": fn.COALESCE(ScheduledStep.ended, now)}
                                         ).where(ScheduledStep.id == step)
            return bool(q.execute())
        done: bool = self.submit(work)
        return done

    def update_step_patient(self, patient_id: str, issuer: str | None,
                            values: Mapping[str, Any]) -> int:
        """New demographics for every step of a patient (HL7 ADT^A08/A31, a correction): how
        many steps changed. `issuer` None: any issuer."""
        row = _row({k: v for k, v in values.items() if k in _PATIENT})
        if not row:
            return 0
        row["updated"] = time.time()

        def work() -> int:
            where = ScheduledStep.patient_id == patient_id
            if issuer is not None:
                where &= ScheduledStep.issuer_of_patient_id == issuer
            return int(ScheduledStep.update(row).where(where).execute())
        n: int = self.submit(work)
        return n

    def merge_step_patients(self, from_id: str, from_issuer: str | None,
                            into: Mapping[str, Any]) -> int:
        """Every step of patient `from_id` filed under the patient `into` (its patient_id and
        demographics; HL7 ADT^A40, `pacsd patient merge`): how many steps moved."""
        return self.update_step_patient(from_id, from_issuer, into)

    def expire_steps(self, before_date: str, before_time: str) -> int:
        """Steps still SCHEDULED (ARRIVED, READY) whose start is before the given date and
        time (YYYYMMDD, HHMMSS) become EXPIRED: how many."""
        now = time.time()

        def work() -> int:
            late = ((ScheduledStep.start_date < before_date)
                    | ((ScheduledStep.start_date == before_date)
                       & (ScheduledStep.start_time < before_time)))
            return int(ScheduledStep.update(status="EXPIRED", updated=now, ended=now)
                       .where(ScheduledStep.status.in_(OPEN[:3]) & (ScheduledStep.start_date != "")
                              & late).execute())
        n: int = self.submit(work)
        return n

    def forget_steps(self, before: float) -> int:
        """Remove the steps that ended before `before`, and the performed steps reported on
        them or last changed before then and final: how many scheduled steps went."""
        def work() -> int:
            gone = [r.id for r in ScheduledStep.select(ScheduledStep.id)
                    .where(ScheduledStep.ended < before)]
            for start in range(0, len(gone), 500):
                ScheduledStep.delete().where(ScheduledStep.id.in_(gone[start:start + 500])
                                             ).execute()
            PerformedStep.delete().where(
                (PerformedStep.updated < before)
                & (PerformedStep.status != "IN PROGRESS")).execute()
            return len(gone)
        n: int = self.submit(work)
        return n

    def link_study(self, study_uid: str) -> int:
        """A study has arrived whole (it turned stable): the open steps it was made for (its
        Study Instance UID is theirs, or its accession number is) are linked to it, and those
        no modality reported on (no MPPS in progress) are COMPLETED: how many were linked."""
        now = time.time()

        def work() -> int:
            study: Any = (Study.select(Study.accession_number)
                          .where(Study.study_instance_uid == study_uid).first())
            if study is None:
                return 0
            mine = ScheduledStep.study_instance_uid == study_uid
            if study.accession_number:
                mine |= ScheduledStep.accession_number == study.accession_number
            return _link(mine, study_uid, now)
        n: int = self.submit(work)
        return n

    def link_arrived(self, stable_before: float, limit: int = 500) -> list[tuple[int, str]]:
        """What link_study does, for the steps made after their study arrived (or whose study
        turned stable while no one was linking): open, unlinked steps whose study (by Study
        Instance UID, else by accession number) has been quiet since `stable_before` (seconds
        since the epoch). The (step, study UID) pairs linked."""
        now = time.time()

        def work() -> list[tuple[int, str]]:
            found: list[tuple[int, str]] = []
            for on in (Study.study_instance_uid == ScheduledStep.study_instance_uid,
                       (Study.accession_number == ScheduledStep.accession_number)
                       & (ScheduledStep.accession_number != "")):
                # A study is quiet once its activity row is gone (pacsd.nodes.routing took
                # it stable) or older than `stable_before`.
                rows: Any = (ScheduledStep.select(ScheduledStep.id, Study.study_instance_uid)
                             .join(Study, on=on)
                             .join(StudyActivity, JOIN.LEFT_OUTER,
                                   on=(StudyActivity.study_uid == Study.study_instance_uid))
                             .where(ScheduledStep.status.in_(OPEN)
                                    & (ScheduledStep.linked_study == "")
                                    & (StudyActivity.study_uid.is_null()
                                       | (StudyActivity.last_received < stable_before)))
                             .limit(limit).tuples())
                for step, uid in list(rows):
                    if _link(ScheduledStep.id == step, str(uid), now):
                        found.append((int(step), str(uid)))
            return found
        out: list[tuple[int, str]] = self.submit(work)
        return out

    # --- performed steps (MPPS) ---------------------------------------------------------------

    def put_performed(self, values: Mapping[str, Any], step_status: tuple[int, str] | None = None
                      ) -> None:
        """Create or replace a performed step's row (values keyed by PerformedStep's columns,
        sop_instance_uid included); with `step_status`, set that scheduled step's status (and
        its performed_uid) in the same transaction."""
        row = dict(values)
        now = time.time()
        row["updated"] = now

        def work() -> None:
            exists = PerformedStep.select().where(
                PerformedStep.sop_instance_uid == row["sop_instance_uid"]).exists()
            if exists:
                PerformedStep.update(row).where(
                    PerformedStep.sop_instance_uid == row["sop_instance_uid"]).execute()
            else:
                PerformedStep.insert({**row, "created": now}).execute()
            if step_status is not None:
                step, status = step_status
                ended = now if status in ENDED else None
                ScheduledStep.update(status=status, performed_uid=row["sop_instance_uid"],
                                     updated=now, ended=ended
                                     ).where(ScheduledStep.id == step).execute()
        self.submit(work)
