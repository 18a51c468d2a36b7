"""Which instances a routing rule ([[routes]]) takes.

A rule matches on the calling AE title and on any attribute of the data set (a keyword or a
tag, DICOM wildcards `*` and `?`, a list meaning any of them). `when = "stored"` rules are
checked against each instance's header as it is stored (`for_instance`); `when = "stable"`
rules against the study as a whole (`study_view`: any of its series' modalities, any of its
callers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset

from pacsd.config import Route
from pacsd.imaging.header import read_header
from pacsd.imaging.rules import dataset_values, matches  # noqa: F401 - routing reads it here
from pacsd.query import routing as reads
from pacsd.storage.store import Store

log = logging.getLogger(__name__)


def for_instance(routes: Sequence[Route], header: Dataset, calling_aet: str
                 ) -> list[tuple[str, str]]:
    """(route, destination) of every one of these (`stored`) rules this instance matches."""
    out = []
    for route in routes:
        values = dataset_values(header, (k for k, _ in route.match))
        if matches(route, values, [calling_aet]):
            out.append((route.name, route.to))
    return out


def study_view(store: Store, study_uid: str) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """A stable study as rules and hooks see it: its attributes (the index's, every series'
    modality, the first instance's header for anything else), its callers, and the event
    given to on_study_stable."""
    study = reads.study_for_rules(study_uid)
    if study is None:
        return {}, [], {}
    values: dict[str, Any] = {}
    if study.first_path is not None:
        try:
            with open(store.placed(study.first_path), "rb") as f:
                header = read_header(f)
            for e in header:
                if e.VR != "SQ":
                    values[e.keyword or f"{e.tag:08X}"] = e.value
        except (OSError, ValueError) as e:
            log.warning("study %s: header of its first instance unreadable: %s", study_uid, e)
    modalities = [m for m in study.series_modalities if m]
    values["Modality"] = modalities or values.get("Modality", "")
    values["ModalitiesInStudy"] = modalities
    event = {"study_uid": study_uid, "patient_id": study.patient_id,
             "patient_name": study.patient_name, "study_date": study.study_date,
             "study_time": study.study_time, "accession_number": study.accession_number,
             "study_description": study.study_description,
             "modalities": sorted(set(modalities)), "series": len(study.series_modalities),
             "instances": study.number_of_instances, "calling_aets": study.callers,
             "referring_physician_name": study.referring_physician_name,
             "issuer_of_patient_id": study.issuer_of_patient_id,
             "patient_birth_date": study.patient_birth_date,
             "patient_sex": study.patient_sex}
    return values, study.callers, event
