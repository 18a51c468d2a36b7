"""The elements the XML-RPC methods answer with, in OsiriX's terms: its attribute names, person
names and dates as OsiriX shows them. Built from the rows pacsd.query.predicate reads (joined up
to the patient, so reading them costs no query).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any


def osirix_name(name: str) -> str:
    """A person name as OsiriX shows it: components separated by spaces."""
    return re.sub(r"\s+", " ", name.split("=")[0].replace("^", " ")).strip()


def osirix_date(date: str, time_: str = "") -> str:
    """DICOM DA (+TM) -> the NSDate description OsiriX returns: 2024-01-02 08:01:00 +0000."""
    if not re.fullmatch(r"\d{8}", date or ""):
        return ""
    t = re.sub(r"[^\d]", "", (time_ or "").split(".")[0]).ljust(6, "0")[:6]
    return f"{date[:4]}-{date[4:6]}-{date[6:]} {t[:2]}:{t[2:4]}:{t[4:]} +0000"


def osirix_moment(value: Any) -> str:
    """A local time the index wrote (datetime, or "YYYY-MM-DD HH:MM:SS") -> NSDate's
    description, in UTC as OsiriX shows it."""
    if isinstance(value, str):
        try:
            value = dt.datetime.strptime(value[:19], "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return ""
    if not isinstance(value, dt.datetime):
        return ""
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def study_element(study: Any) -> dict[str, str]:
    p = study.patient
    return {
        "name": osirix_name(p.patient_name), "patientID": p.patient_id,
        "dateOfBirth": osirix_date(p.patient_birth_date), "patientSex": p.patient_sex,
        "studyInstanceUID": study.study_instance_uid,
        "accessionNumber": study.accession_number, "studyName": study.study_description,
        "id": study.study_id, "date": osirix_date(study.study_date, study.study_time),
        "modality": study.modalities_in_study, "institutionName": study.institution_name,
        "referringPhysician": osirix_name(study.referring_physician_name),
        "numberOfImages": _text(study.number_of_instances),
        "numberOfSeries": _text(study.number_of_series),
        # Horos's DicomStudy attributes pacsd can fill: when it arrived; it holds DICOM.
        "dateAdded": osirix_moment(study.created), "hasDICOM": "1",
    }


def series_element(series: Any) -> dict[str, str]:
    study = series.study
    return {
        "name": series.series_description, "seriesDescription": series.series_description,
        "seriesDICOMUID": series.series_instance_uid,
        "seriesInstanceUID": series.series_instance_uid, "modality": series.modality,
        "id": _text(series.series_number),
        "date": osirix_date(series.series_date or study.study_date,
                            series.series_time or study.study_time),
        "numberOfImages": _text(series.number_of_instances),
        "studyInstanceUID": study.study_instance_uid, "patientID": study.patient.patient_id,
    }


def image_element(inst: Any) -> dict[str, str]:
    series = inst.series
    return {
        "sopInstanceUID": inst.sop_instance_uid, "sopClassUID": inst.sop_class_uid,
        "instanceNumber": _text(inst.instance_number),
        "numberOfFrames": _text(inst.number_of_frames or 1),
        "height": _text(inst.rows), "width": _text(inst.columns),
        "modality": series.modality,
        "date": osirix_date(inst.content_date or series.series_date or series.study.study_date,
                            inst.content_time or series.series_time or series.study.study_time),
        "seriesDICOMUID": series.series_instance_uid,
        "studyInstanceUID": series.study.study_instance_uid,
    }


ELEMENT = {"Study": study_element, "Series": series_element, "Image": image_element}
