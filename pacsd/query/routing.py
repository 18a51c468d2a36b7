"""The reads of auto-routing (pacsd.nodes.routing): a study as the `stable` rules and the
on_study_stable hooks see it, and the stored instances a routing job sends.

Each function opens its own read (`reading()`), so the router needs no model and no
transaction of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pacsd.index.models import Instance, Patient, Series, Study, reading
from pacsd.query.matching import Request, StoredInstance, instances


@dataclass(frozen=True)
class StudyForRules:
    """What the index knows of one study, for the `stable` rules and the on_study_stable
    event: its patient's and its own attributes, each series' modality (in index order, empty
    ones included), the first instance's file (whose header supplies any other attribute) and
    the calling AE titles that sent it."""

    patient_id: str
    patient_name: str
    issuer_of_patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    referring_physician_name: str
    number_of_instances: int
    series_modalities: list[str]
    first_path: str | None
    callers: list[str]


def study_for_rules(study_uid: str) -> StudyForRules | None:
    """The study `study_uid` as routing rules see it; None if it is not in the index."""
    with reading():
        row = (Study.select(Study, Patient).join(Patient)
               .where(Study.study_instance_uid == study_uid).first())
        if row is None:
            return None
        series: list[Any] = list(Series.select(Series.modality, Series.series_instance_uid)
                                 .where(Series.study == row.id).tuples())
        first = (Instance.select(Instance.path, Instance.calling_aet).join(Series)
                 .where(Series.study == row.id).order_by(Instance.id).first())
        aets: list[Any] = list(Instance.select(Instance.calling_aet).join(Series)
                               .where(Series.study == row.id).distinct().tuples())
        callers = sorted({str(a) for (a,) in aets if a})
    return StudyForRules(
        patient_id=row.patient.patient_id, patient_name=row.patient.patient_name,
        issuer_of_patient_id=row.patient.issuer_of_patient_id,
        patient_birth_date=row.patient.patient_birth_date,
        patient_sex=row.patient.patient_sex, study_date=row.study_date,
        study_time=row.study_time, accession_number=row.accession_number,
        study_description=row.study_description,
        referring_physician_name=row.referring_physician_name,
        number_of_instances=row.number_of_instances,
        series_modalities=[m for m, _ in series],
        first_path=None if first is None else first.path, callers=callers)


def instances_to_send(study_uid: str, sop_uids: Sequence[str] = ()) -> list[StoredInstance]:
    """The stored instances of a routing job: these instances of the study (when = "stored"),
    or the whole study when `sop_uids` is empty; [] when none is stored any more."""
    keys = {"StudyInstanceUID": study_uid}
    if sop_uids:
        keys["SOPInstanceUID"] = "\\".join(dict.fromkeys(sop_uids))
    with reading():
        return instances(Request("IMAGE" if sop_uids else "STUDY", keys))
