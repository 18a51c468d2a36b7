"""The Modality Worklist SCP (pacsd.dimse.worklist) with DCMTK's findscu -W, and the MPPS SCP
(pacsd.dimse.mpps) with pynetdicom as SCU, against a real server whose index holds scheduled
steps (written through the server's own index, as the Worklist page and HL7 do)."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS
from pynetdicom.sop_class import ModalityWorklistInformationFind as MWL
from pynetdicom.sop_class import Verification

from conftest import LOCAL, associate, dcmtk, run_peer, wait_for
from pacsd.audit import Search, search
from pacsd.query import worklist as wl

SPS = "ScheduledProcedureStepSequence"
# (name, ID, accession, modality, station, date, time, status) and a few more per step.
STEPS = {
    "s1": dict(patient_name="Doe^John", patient_id="P1", accession_number="A1", modality="CT",
               station_aet="CT1", start_date="20261208", start_time="0900", sps_id="SPS1",
               requested_procedure_id="RP1", sps_description="Head CT",
               requested_procedure_code="RP-1^99PACSD^CT head",
               protocol_code="P-CT1^99PACSD^Head protocol", patient_birth_date="19700101",
               patient_sex="M", referring_physician_name="Ref^Rita", allergies="Latex"),
    "s2": dict(patient_name="Müller^Jürgen", patient_id="P2", accession_number="A2",
               modality="MR", station_aet="MR1", start_date="20261208", start_time="2130"),
    "s3": dict(patient_name="Doe^Jane", patient_id="P3", accession_number="A3", modality="CT",
               station_aet="CT1", start_date="20261209", start_time="0700", sps_id="SPS3"),
    "s4": dict(patient_name="Smith^Ann", patient_id="P4", accession_number="A4", modality="CT",
               station_aet="CT1", start_date="20261209", start_time="1400"),
    "s5": dict(patient_name="Old^Done", patient_id="P5", accession_number="A5", modality="CT",
               station_aet="CT1", start_date="20261208", start_time="1000", status="COMPLETED"),
}
# What findscu asks for unless a test says otherwise ("" : return key).
RETURN_KEYS = {"PatientName": "", "PatientID": "", "AccessionNumber": "",
               "StudyInstanceUID": "", f"{SPS}[0].ScheduledStationAETitle": "",
               f"{SPS}[0].ScheduledProcedureStepStartDate": "",
               f"{SPS}[0].ScheduledProcedureStepStartTime": "", f"{SPS}[0].Modality": "",
               f"{SPS}[0].ScheduledProcedureStepStatus": ""}


def seed(server, **steps) -> dict[str, int]:
    """The steps written through the running server's index: name -> step id."""
    return {name: server.index.add_step(wl.clean_step(values)) for name, values in steps.items()}


@pytest.fixture
def pacs(make_server):
    """A server with the steps of STEPS; CT9 (a modality) is a node, FINDSCU and PYNETDICOM
    too (conftest's test clients)."""
    server = make_server(nodes=[{"name": "ct9", "aet": "CT9", "host": LOCAL, "port": 104}])
    server.steps = seed(server, **STEPS)
    return server


def run_findscu(server, out: Path, keys: dict[str, str], aet: str = "FINDSCU",
                check: bool = True) -> subprocess.CompletedProcess:
    """findscu -W with RETURN_KEYS and `keys`, its responses extracted (-X) into `out`."""
    out.mkdir()
    args = [dcmtk("findscu"), "-W", "-aet", aet, "-aec", "PACSD", "-X", "-od", str(out)]
    for k, v in {**RETURN_KEYS, **keys}.items():
        args += ["-k", f"{k}={v}" if v != "" else k]
    return run_peer([*args, LOCAL, str(server.dicom_port)], timeout=30, check=check)


def findscu(server, tmp: Path, keys: dict[str, str], aet: str = "FINDSCU") -> list[Dataset]:
    """The responses of run_findscu, read back from its files, in the order they came."""
    out = tmp / f"rsp-{len(list(tmp.glob('rsp-*')))}"
    run_findscu(server, out, keys, aet)
    return [dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def ids(responses: list[Dataset]) -> list[str]:
    return sorted(str(r.PatientID) for r in responses)


def mwl(server, query: Dataset, aet: str = "PYNETDICOM") -> tuple[int, list[Dataset]]:
    """(final status, items) of a worklist C-FIND with pynetdicom."""
    with associate(server.dicom_port, [build_context(MWL)], aet=aet) as assoc:
        out = list(assoc.send_c_find(query, MWL))
    return int(out[-1][0].Status), [ds for st, ds in out if st and st.Status == 0xFF00]


# --- the worklist -----------------------------------------------------------------------------

def test_findscu_by_station_date_modality_name_and_accession(pacs, tmp_path):
    # Ended steps (s5, COMPLETED) are not on the worklist.
    assert ids(findscu(pacs, tmp_path, {f"{SPS}[0].ScheduledStationAETitle": "CT1"})) == [
        "P1", "P3", "P4"]
    assert ids(findscu(pacs, tmp_path, {f"{SPS}[0].ScheduledProcedureStepStartDate":
                                        "20261208"})) == ["P1", "P2"]
    assert ids(findscu(pacs, tmp_path, {f"{SPS}[0].Modality": "MR"})) == ["P2"]
    assert ids(findscu(pacs, tmp_path, {"PatientName": "doe*"})) == ["P1", "P3"]
    assert ids(findscu(pacs, tmp_path, {"AccessionNumber": "A3"})) == ["P3"]
    # Earliest first.
    got = findscu(pacs, tmp_path, {f"{SPS}[0].ScheduledStationAETitle": "CT1"})
    assert [r.PatientID for r in got] == ["P1", "P3", "P4"]


def test_returned_values_and_unknown_keys(pacs, tmp_path):
    (r,) = findscu(pacs, tmp_path, {
        "AccessionNumber": "A1", "PatientBirthDate": "", "PatientSex": "", "Allergies": "",
        "ReferringPhysicianName": "", "RequestedProcedureID": "", "PatientAge": "",
        "RequestedProcedureCodeSequence[0].CodeValue": "",
        "RequestedProcedureCodeSequence[0].CodingSchemeDesignator": "",
        "RequestedProcedureCodeSequence[0].CodeMeaning": "",
        f"{SPS}[0].ScheduledProcedureStepID": "",
        f"{SPS}[0].ScheduledProcedureStepDescription": "",
        f"{SPS}[0].ScheduledProtocolCodeSequence[0].CodeValue": "",
        f"{SPS}[0].ScheduledProtocolCodeSequence[0].CodeMeaning": "",
        f"{SPS}[0].ScheduledPerformingPhysicianName": ""})
    s1 = STEPS["s1"]
    assert (str(r.PatientName), r.PatientID, r.PatientBirthDate, r.PatientSex, r.Allergies,
            str(r.ReferringPhysicianName), r.RequestedProcedureID) == (
        "Doe^John", "P1", "19700101", "M", "Latex", "Ref^Rita", "RP1")
    assert r.StudyInstanceUID.startswith("2.25.")   # made when the step was scheduled
    assert "PatientAge" in r and not r.PatientAge   # unknown here: empty (C.2.2.1.2)
    assert "SpecificCharacterSet" not in r   # ASCII only: none
    (code,) = r.RequestedProcedureCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "RP-1", "99PACSD", "CT head")
    (item,) = r[SPS].value
    assert (item.ScheduledStationAETitle, item.ScheduledProcedureStepStartDate,
            item.ScheduledProcedureStepStartTime, item.Modality, item.ScheduledProcedureStepID,
            item.ScheduledProcedureStepDescription, item.ScheduledProcedureStepStatus) == (
        s1["station_aet"], "20261208", "0900", "CT", "SPS1", "Head CT", "SCHEDULED")
    assert "ScheduledPerformingPhysicianName" in item and not item.ScheduledPerformingPhysicianName
    (protocol,) = item.ScheduledProtocolCodeSequence
    # The item keys asked for, no more.
    assert (protocol.CodeValue, protocol.CodeMeaning) == ("P-CT1", "Head protocol")
    assert "CodingSchemeDesignator" not in protocol


def test_an_empty_step_sequence_returns_the_step_attributes(pacs):
    q = Dataset()
    q.PatientID = "P1"
    q.PatientName = ""
    q.ScheduledProcedureStepSequence = []
    status, (r,) = mwl(pacs, q)
    assert status == 0
    (item,) = r.ScheduledProcedureStepSequence
    for keyword in ("ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
                    "ScheduledProcedureStepStartTime", "Modality",
                    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
                    "ScheduledProcedureStepID", "ScheduledStationName",
                    "ScheduledProcedureStepLocation", "ScheduledProtocolCodeSequence",
                    "ScheduledProcedureStepStatus"):
        assert keyword in item, keyword
    assert (item.Modality, item.ScheduledProcedureStepID) == ("CT", "SPS1")
    assert item.ScheduledProtocolCodeSequence[0].CodingSchemeDesignator == "99PACSD"


def test_combined_date_and_time_range(pacs, tmp_path):
    # C.2.2.2.5: from 8 pm on the 8th to 8 am on the 9th, not each day between 8 pm and 8 am.
    got = findscu(pacs, tmp_path, {f"{SPS}[0].ScheduledProcedureStepStartDate":
                                   "20261208-20261209",
                                   f"{SPS}[0].ScheduledProcedureStepStartTime": "2000-0800"})
    assert ids(got) == ["P2", "P3"]
    # A time range alone holds on every day.
    got = findscu(pacs, tmp_path, {f"{SPS}[0].ScheduledProcedureStepStartTime": "0800-1500"})
    assert ids(got) == ["P1", "P4"]


def test_code_sequence_match(pacs, tmp_path):
    got = findscu(pacs, tmp_path, {
        f"{SPS}[0].ScheduledProtocolCodeSequence[0].CodeValue": "P-CT1",
        f"{SPS}[0].ScheduledProtocolCodeSequence[0].CodingSchemeDesignator": "99PACSD"})
    assert ids(got) == ["P1"]
    got = findscu(pacs, tmp_path, {"RequestedProcedureCodeSequence[0].CodeValue": "RP-9"})
    assert got == []


def test_status_filtering(pacs, tmp_path):
    key = f"{SPS}[0].ScheduledProcedureStepStatus"
    assert ids(findscu(pacs, tmp_path, {key: "COMPLETED"})) == ["P5"]
    pacs.index.update_step(pacs.steps["s4"], {"status": "CANCELED"})
    assert ids(findscu(pacs, tmp_path, {f"{SPS}[0].Modality": "CT"})) == ["P1", "P3"]
    assert ids(findscu(pacs, tmp_path, {key: "SCHEDULED\\CANCELED"})) == [
        "P1", "P2", "P3", "P4"]


def test_character_set(pacs, tmp_path):
    """A name with letters beyond ASCII: in UTF-8 when the query asks for it, and matched."""
    got = findscu(pacs, tmp_path, {"SpecificCharacterSet": "ISO_IR 192",
                                   "PatientName": "Müller*"})
    assert [(str(r.PatientName), r.SpecificCharacterSet) for r in got] == [
        ("Müller^Jürgen", "ISO_IR 192")]
    # Asked in Latin-1, answered in Latin-1 (it can carry the name).
    q = Dataset()
    q.SpecificCharacterSet = "ISO_IR 100"
    q.PatientName = "M*"
    q.PatientID = "P2"
    status, (r,) = mwl(pacs, q)
    assert (status, r.SpecificCharacterSet, str(r.PatientName)) == (
        0, "ISO_IR 100", "Müller^Jürgen")


def test_bad_identifiers_are_refused_with_a_log_line(pacs, caplog):
    q = Dataset()
    q.PatientName = ""
    item = Dataset()
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        item.ScheduledProcedureStepStartDate = "2026-12-08x"
    q.ScheduledProcedureStepSequence = [item]
    assert mwl(pacs, q)[0] == 0xA900
    q.ScheduledProcedureStepSequence = [Dataset(), Dataset()]   # one item at most
    assert mwl(pacs, q)[0] == 0xA900
    lines = [r.getMessage() for r in caplog.records if "worklist C-FIND" in r.getMessage()
             and "refused" in r.getMessage()]
    assert len(lines) == 2, lines


def test_worklist_query_is_audited(pacs, tmp_path):
    findscu(pacs, tmp_path, {f"{SPS}[0].Modality": "MR"})
    recs = wait_for(lambda: search(pacs.cfg.data / "audit",
                                   Search(action="query", user="FINDSCU")), 10,
                    "the worklist query's audit record")
    assert recs[0]["detail"].startswith("WORKLIST") and "Modality=MR" in recs[0]["detail"]
    assert (recs[0]["count"], recs[0]["outcome"]) == (1, "ok")


def test_a_stranger_is_refused_unless_the_worklist_is_open(make_server, tmp_path, caplog):
    server = make_server()
    seed(server, s1=STEPS["s1"])
    proc = run_findscu(server, tmp_path / "refused", {}, aet="STRANGER", check=False)
    assert proc.returncode != 0
    assert "No Acceptable Presentation Contexts" in proc.stdout + proc.stderr
    assert any("Modality Worklist/MPPS refused to 'STRANGER'" in r.getMessage()
               for r in caplog.records)
    # Nor may it report performed steps (C-ECHO it may).
    with associate(server.dicom_port, [build_context(Verification), build_context(MPPS)],
                   aet="STRANGER") as assoc:
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [
            str(Verification)]
    server.stop()
    server = make_server(worklist={"open": True})
    assert ids(findscu(server, tmp_path, {}, aet="STRANGER")) == ["P1"]


# --- MPPS -------------------------------------------------------------------------------------

def _pps(step: dict, status: str = "IN PROGRESS", *, study: str = "") -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = step["patient_name"]
    ds.PatientID = step["patient_id"]
    item = Dataset()
    item.StudyInstanceUID = study
    item.AccessionNumber = step["accession_number"]
    item.ScheduledProcedureStepID = step.get("sps_id", "")
    item.RequestedProcedureID = step.get("requested_procedure_id", "")
    ds.ScheduledStepAttributesSequence = [item]
    ds.PerformedProcedureStepID = "PPS-" + step["patient_id"]
    ds.PerformedStationAETitle = "CT9"
    ds.PerformedProcedureStepStartDate = "20261208"
    ds.PerformedProcedureStepStartTime = "091500.123"
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "Head CT done"
    ds.Modality = step["modality"]
    ds.PerformedSeriesSequence = []
    return ds


def _end(status: str, series: int = 0, images: int = 0, reason: str = "") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261208"
    ds.PerformedProcedureStepEndTime = "0940"
    ds.PerformedSeriesSequence = []
    for s in range(series):
        item = Dataset()
        item.SeriesInstanceUID = f"1.2.3.{s}"
        item.ReferencedImageSequence = [Dataset() for _ in range(images)]
        ds.PerformedSeriesSequence.append(item)
    if reason:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
            "110514", "DCM", reason)
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = [code]
    return ds


def _status_of(server, step_id: int) -> str:
    with server.index.reading():
        return str(wl.step(step_id)["status"])


def _performed(server, uid: str) -> dict:
    with server.index.reading():
        return wl.performed(uid)


def test_mpps_in_progress_then_completed(pacs):
    s1 = pacs.steps["s1"]
    with pacs.index.reading():
        study = wl.step(s1)["study_instance_uid"]
    uid = "1.2.826.0.1.3680043.9.7433.1.1"
    with associate(pacs.dicom_port, [build_context(MPPS)], aet="CT9") as assoc:
        status, attrs = assoc.send_n_create(_pps(STEPS["s1"], study=study), MPPS, uid)
        assert status.Status == 0x0000 and attrs.PerformedProcedureStepStatus == "IN PROGRESS"
        assert _status_of(pacs, s1) == "STARTED"
        # The modality sees it STARTED (still on the worklist).
        q = Dataset()
        q.PatientID = ""
        q.ScheduledProcedureStepSequence = [Dataset()]
        q.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = "STARTED"
        assert ids(mwl(pacs, q)[1]) == ["P1"]

        status, attrs = assoc.send_n_set(_end("COMPLETED", series=2, images=3), MPPS, uid)
        assert status.Status == 0x0000 and attrs.PerformedProcedureStepStatus == "COMPLETED"
        assert _status_of(pacs, s1) == "COMPLETED"
        row = _performed(pacs, uid)
        assert (row["status"], row["step"], row["calling_aet"], row["study_instance_uid"],
                row["accession_number"], row["station_aet"], row["started"], row["finished"],
                row["series"], row["images"]) == (
            "COMPLETED", s1, "CT9", study, "A1", "CT9", "20261208091500", "20261208094000",
            "1.2.3.0\\1.2.3.1", 6)
        assert "Head CT done" in row["attributes"]
        # Ended: no longer on the worklist.
        q = Dataset()
        q.PatientID = "P1"
        q.ScheduledProcedureStepSequence = []
        assert mwl(pacs, q) == (0, [])
        # Final: no more changes (F.7.2.2.2).
        status, _ = assoc.send_n_set(_end("DISCONTINUED"), MPPS, uid)
        assert status.Status == 0x0110
        # The same instance twice; an instance nobody created.
        status, _ = assoc.send_n_create(_pps(STEPS["s1"], study=study), MPPS, uid)
        assert status.Status == 0x0111
        status, _ = assoc.send_n_set(_end("COMPLETED"), MPPS, uid + ".9")
        assert status.Status == 0x0112
    assert _performed(pacs, uid)["status"] == "COMPLETED"
    # Each performed step reported is a Procedure Record in the audit trail (refusals are not).
    recs = wait_for(lambda: [r for r in search(pacs.cfg.data / "audit",
                                               Search(action="procedure", user="CT9"))
                             if uid in r["detail"]] or None, 10, "the MPPS audit records")
    assert sorted(r["detail"].split(": ")[0] for r in recs) == ["MPPS N-CREATE", "MPPS N-SET"]
    assert all(r["studies"] == [study] and r["via"] == "dicom" for r in recs)


def test_mpps_discontinued_found_by_accession_and_step_id(pacs):
    s3 = pacs.steps["s3"]
    with associate(pacs.dicom_port, [build_context(MPPS)], aet="CT9") as assoc:
        # No Study Instance UID: the accession and the step ID find it; the SCP makes the UID.
        status, _ = assoc.send_n_create(_pps(STEPS["s3"]), MPPS)
        assert status.Status == 0x0000 and _status_of(pacs, s3) == "STARTED"
        with pacs.index.reading():
            (row,) = wl.performed_of(step_id=s3)
        uid = row["sop_instance_uid"]
        assert uid.startswith("2.25.")
        status, _ = assoc.send_n_set(_end("DISCONTINUED", reason="Patient refused"), MPPS, uid)
        assert status.Status == 0x0000
    assert _status_of(pacs, s3) == "DISCONTINUED"
    row = _performed(pacs, uid)
    assert (row["status"], row["step"], row["discontinued_reason"]) == (
        "DISCONTINUED", s3, "Patient refused")


def test_mpps_refusals(pacs, caplog):
    uid = "1.2.826.0.1.3680043.9.7433.1.2"
    with associate(pacs.dicom_port, [build_context(MPPS)], aet="CT9") as assoc:
        # Created COMPLETED: it must begin IN PROGRESS.
        status, _ = assoc.send_n_create(_pps(STEPS["s2"], "COMPLETED"), MPPS, uid)
        assert status.Status == 0x0106
        # Far too big to keep.
        big = _pps(STEPS["s2"])
        big.TextValue = "x" * (300 << 10)
        status, _ = assoc.send_n_create(big, MPPS, uid)
        assert status.Status == 0x0110
        # An unscheduled patient's step is kept, linked to nothing.
        other = _pps({**STEPS["s2"], "accession_number": "NOPE"})
        status, _ = assoc.send_n_create(other, MPPS, uid)
        assert status.Status == 0x0000
        # Set COMPLETED without its end (F.7.2.2.2, final state): refused, still IN PROGRESS.
        endless = _end("COMPLETED")
        del endless.PerformedProcedureStepEndTime
        status, _ = assoc.send_n_set(endless, MPPS, uid)
        assert status.Status == 0x0121
    assert _performed(pacs, uid)["status"] == "IN PROGRESS"
    assert _performed(pacs, uid)["step"] is None
    assert _status_of(pacs, pacs.steps["s2"]) == "SCHEDULED"
    text = caplog.text
    assert "not IN PROGRESS" in text and "more than the 256 KiB" in text
    assert "set COMPLETED without PerformedProcedureStepEndTime" in text


def test_c_cancel_stops_a_long_worklist_answer(make_server, tmp_path, caplog):
    """DCMTK's findscu cancels after the first item, from its own process (as in
    tests/test_cancel.py): pacsd answers Cancel long before the 300th item."""
    caplog.set_level(logging.INFO, logger="pacsd.dimse.worklist")
    server = make_server()
    seed(server, **{f"n{i}": {**STEPS["s4"], "patient_id": f"N{i}",
                              "accession_number": f"N{i}"} for i in range(300)})
    out = run_peer([dcmtk("findscu"), "-W", "-v", "--cancel", "1", "-aet", "FINDSCU", "-aec",
                    "PACSD", "-k", "PatientID", "-k", f"{SPS}[0].Modality=CT",
                    LOCAL, str(server.dicom_port)], timeout=30)
    text = out.stdout + out.stderr
    assert "Sending Cancel Request" in text and "Received Final Find Response (Cancel" in text
    counts = [int(m) for m in re.findall(r"cancelled after (\d+) item",
                                         "\n".join(r.getMessage() for r in caplog.records))]
    assert len(counts) == 1 and counts[0] < 300, counts
