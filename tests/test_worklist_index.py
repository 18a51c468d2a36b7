"""The worklist's reads and writes (pacsd.query.worklist, pacsd.index.worklist) on both index
backends, SQLite and a real PostgreSQL: the matching a Modality Worklist C-FIND relies on
(wildcards and case in names, date and time ranges alone and combined, code sequences, lists,
status), the page's search, and what the housekeeping and the arriving studies change."""

from __future__ import annotations

import time

import pytest

from pacsd.index import Index
from pacsd.index.models import reading
from pacsd.query import worklist as wl
from pacsd.query.matching import QueryError

STEPS = {
    "ct_morning": {"PatientID": "P1", "PatientName": "Müller^Hans", "Modality": "CT",
                   "ScheduledStationAETitle": "CT_1", "AccessionNumber": "ACC-1",
                   "ScheduledProcedureStepStartDate": "20261208",
                   "ScheduledProcedureStepStartTime": "083000",
                   "ScheduledProtocolCodeSequence": "CTHEAD^99LOCAL^CT head"},
    "ct_night": {"PatientID": "P2", "PatientName": "Doe^John", "Modality": "CT",
                 "ScheduledStationAETitle": "CT_2", "AccessionNumber": "acc-2",
                 "ScheduledProcedureStepStartDate": "20261208",
                 "ScheduledProcedureStepStartTime": "220000"},
    "mr_next": {"PatientID": "P3", "PatientName": "Roe^Jane", "Modality": "MR",
                "ScheduledStationAETitle": "MR_1", "AccessionNumber": "ACC-3",
                "ScheduledProcedureStepStartDate": "20261209",
                "ScheduledProcedureStepStartTime": "060000"},
    "done": {"PatientID": "P4", "PatientName": "Done^Dora", "Modality": "CT",
             "ScheduledProcedureStepStartDate": "20261208", "ScheduledProcedureStepStatus":
             "COMPLETED"},
}


@pytest.fixture
def index(index_url):
    idx = Index(index_url).open()
    idx.ids = {name: idx.add_step(wl.clean_step(values)) for name, values in STEPS.items()}
    yield idx
    idx.close()


def found(index, top=None, sps=None, codes=None) -> list[str]:
    names = {v: k for k, v in index.ids.items()}
    with reading():
        rows = wl.find_steps(wl.WorklistQuery(top or {}, sps or {}, codes or {}), 100)
    return [names[r["id"]] for r in rows]


def test_worklist_matching(index):
    assert found(index) == ["ct_morning", "ct_night", "mr_next"]   # open ones, by time
    assert found(index, top={"PatientName": "müller*"}) == ["ct_morning"]   # case ignored
    assert found(index, top={"PatientName": "D?E^JOHN"}) == ["ct_night"]
    assert found(index, sps={"ScheduledStationAETitle": "CT_1\\MR_1"}) == [
        "ct_morning", "mr_next"]   # a list of values (C.2.2.2.1: AE and CS)
    assert found(index, top={"AccessionNumber": "ACC-*"}) == ["ct_morning", "mr_next"]
    assert found(index, sps={"ScheduledStationAETitle": "CT_*", "Modality": "CT"}) == [
        "ct_morning", "ct_night"]
    assert found(index, sps={"ScheduledProcedureStepStartDate": "20261209-"}) == ["mr_next"]
    assert found(index, sps={"ScheduledProcedureStepStartTime": "2100-2300"}) == ["ct_night"]
    # Date and time both ranges: one range from 21:00 on the 8th to 07:00 on the 9th.
    assert found(index, sps={"ScheduledProcedureStepStartDate": "20261208-20261209",
                             "ScheduledProcedureStepStartTime": "2100-0700"}) == [
        "ct_night", "mr_next"]
    assert found(index, codes={"ScheduledProtocolCodeSequence": {
        "CodeValue": "CTHEAD", "CodingSchemeDesignator": "99LOCAL"}}) == ["ct_morning"]
    assert found(index, codes={"ScheduledProtocolCodeSequence": {"CodeValue": "MRKNEE"}}) == []
    assert found(index, sps={"ScheduledProcedureStepStatus": "COMPLETED"}) == ["done"]
    with pytest.raises(QueryError):
        found(index, sps={"ScheduledProcedureStepStartDate": "yesterday"})


def test_the_pages_reads(index):
    with reading():
        assert [r["patient_id"] for r in wl.steps(day="20261208", modality="ct")] == [
            "P4", "P1", "P2"]   # no time first
        assert [r["patient_id"] for r in wl.steps(text="ACC-2")] == ["P2"]   # case ignored
        assert [r["patient_id"] for r in wl.steps(text="roe")] == ["P3"]
        assert [r["patient_id"] for r in wl.steps(status="ended")] == ["P4"]
        assert wl.modalities_scheduled("20261208") == ["CT"]
        assert [s["patient_id"] for s in wl.order_steps(accession="ACC-3")] == ["P3"]


def test_patients_expiry_and_pruning(index):
    assert index.update_step_patient("P2", None, {"patient_name": "Doe-Smith^John"}) == 1
    assert found(index, top={"PatientName": "DOE-SMITH^JOHN"}) == ["ct_night"]
    assert index.merge_step_patients("P3", None, {"patient_id": "P1",
                                                   "patient_name": "Müller^Hans"}) == 1
    assert found(index, top={"PatientID": "P1"}) == ["ct_morning", "mr_next"]
    # Expiry: still open before 20261208 22:00 -> EXPIRED.
    assert index.expire_steps("20261208", "220000") == 1
    assert found(index) == ["ct_night", "mr_next"]
    with reading():
        assert wl.step(index.ids["ct_morning"])["status"] == "EXPIRED"
    # Pruning: what ended before now goes, the open ones stay.
    assert index.forget_steps(time.time() + 1) == 2   # ct_morning, done
    with reading():
        assert sorted(r["patient_id"] for r in wl.steps()) == ["P1", "P2"]
