"""The Worklist's JSON API (pacsd.web.worklist) against a real server over HTTP: items added,
listed by day, modality, status and text, changed, given a status by hand and cancelled; bad
values answered 400 with clean_step's message; what the modalities reported (MPPS) and the study
that came of an item; users limited by [[groups]] refused; cross-site changes refused; each
change an audit record (schedule, schedule-change: 110109 Order Record)."""

from __future__ import annotations

import pytest
import requests
from pydicom import dcmread

from conftest import store_files, wait_for, write_config
from data import ct_slice
from pacsd.web.auth import hash_password

H = {"X-Requested-With": "pacsd"}
PASSWORDS = {"boss": "boss-password", "reader": "reader-password",
             "teacher": "teacher-password"}
DAY, NEXT = "20261208", "20261209"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """An administrator, a reader (in no group: sees everything) and a teacher (group "teach":
    studies labelled teaching only); one CT study stored."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("worklist-api")
    users = [{"name": n, "password_hash": hash_password(p), "admin": n == "boss"}
             for n, p in PASSWORDS.items()]
    cfg = config.load(write_config(
        tmp / "c.toml", tmp / "data", users=users, dicom={"workers": 1},
        groups=[{"name": "teach", "users": ["teacher"], "labels": ["teaching"]}]), env={})
    server = Server(cfg).start()
    ds = ct_slice(seed=23, patient=1, study=1, series=1, number=1, size=16)
    path = tmp / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert store_files(server.dicom_port, [path]) == [0]
    server.study = str(dcmread(path).StudyInstanceUID)
    server.sessions = {}
    try:
        yield server
    finally:
        server.stop()


def session(pacs, name: str) -> requests.Session:
    """A logged-in session of the pages (the cookie), sending X-Requested-With as they do."""
    if name not in pacs.sessions:
        s = requests.Session()
        s.headers.update(H)
        r = s.post(f"{pacs.http_url}/app/login", json={"name": name,
                                                       "password": PASSWORDS[name]}, timeout=10)
        assert r.status_code == 200, r.text
        pacs.sessions[name] = s
    return pacs.sessions[name]


def call(pacs, method: str, path: str, who: str = "reader", **kw) -> requests.Response:
    return session(pacs, who).request(method, f"{pacs.http_url}/api/{path}", timeout=10, **kw)


def add(pacs, **values) -> dict:
    r = call(pacs, "POST", "worklist", json=values)
    assert r.status_code == 201, r.text
    return r.json()


def listed(pacs, **params) -> list[dict]:
    r = call(pacs, "GET", "worklist", params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def audit(pacs, **params) -> list[dict]:
    r = call(pacs, "GET", "audit", who="boss", params=params)
    assert r.status_code == 200, r.text
    return r.json()["records"]


def test_add_list_edit_and_cancel(pacs):
    ct = add(pacs, PatientName="Doe^Jane", PatientID="WL-1", PatientBirthDate="19800201",
             PatientSex="f", Modality="ct", ScheduledProcedureStepStartDate=DAY,
             ScheduledProcedureStepStartTime="0930", AccessionNumber="ACC-WL-1",
             RequestedProcedureDescription="CT head")
    assert (ct["status"], ct["source"], ct["modality"], ct["patient_sex"]) == (
        "SCHEDULED", "api", "CT", "F")   # CS values upper-cased
    assert ct["study_instance_uid"].startswith("2.25.") and ct["performed"] == []
    mr = add(pacs, patient_name="Roe^Rick", patient_id="WL-2", modality="MR", start_date=DAY,
             start_time="0800", accession_number="ACC-WL-2")   # by column names
    add(pacs, PatientID="WL-3", Modality="CT", ScheduledProcedureStepStartDate=NEXT)

    r = call(pacs, "GET", "worklist", params={"day": DAY})
    assert r.json()["modalities"] == ["CT", "MR"] and r.json()["day"] == DAY
    assert [i["id"] for i in r.json()["items"]] == [mr["id"], ct["id"]]   # earliest first
    assert [i["id"] for i in listed(pacs, day=DAY, modality="ct")] == [ct["id"]]
    assert [i["patient_id"] for i in listed(pacs, day=NEXT)] == ["WL-3"]
    assert [i["id"] for i in listed(pacs, day="all", q="ACC-WL-2")] == [mr["id"]]
    assert [i["id"] for i in listed(pacs, day="all", q="acc-wl-2")] == [mr["id"]]   # case ignored
    assert [i["id"] for i in listed(pacs, day=DAY, q="doe")] == [ct["id"]]
    assert "patient_name_key" not in ct

    # Changes are partial: what is sent changes, the rest stays.
    r = call(pacs, "PATCH", f"worklist/{ct['id']}", json={
        "ScheduledProcedureStepStartTime": "1015", "station_aet": "CT_1"})
    assert r.status_code == 200, r.text
    assert (r.json()["start_time"], r.json()["station_aet"], r.json()["patient_name"]) == (
        "1015", "CT_1", "Doe^Jane")
    r = call(pacs, "PUT", f"worklist/{ct['id']}", json={"RequestedProcedureDescription": "CT chest"})
    assert r.json()["requested_procedure_description"] == "CT chest"
    one = call(pacs, "GET", f"worklist/{ct['id']}").json()
    assert (one["start_time"], one["requested_procedure_description"]) == ("1015", "CT chest")
    r = call(pacs, "PUT", f"worklist/{ct['id']}", json={"PatientID": ""})
    assert r.status_code == 400 and r.json()["error"] == "a scheduled step needs PatientID"

    # Statuses by hand: the patient arrived, then not after all; never STARTED (the modality's).
    for status in ("ARRIVED", "SCHEDULED"):
        r = call(pacs, "POST", f"worklist/{ct['id']}/status", json={"status": status})
        assert r.status_code == 200 and r.json()["status"] == status, r.text
    r = call(pacs, "POST", f"worklist/{ct['id']}/status", json={"status": "STARTED"})
    assert r.status_code == 400 and "SCHEDULED" in r.json()["error"]

    r = call(pacs, "POST", f"worklist/{ct['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "CANCELED" and r.json()["ended"]
    assert [i["id"] for i in listed(pacs, day=DAY, status="open")] == [mr["id"]]
    assert [i["id"] for i in listed(pacs, day=DAY, status="canceled")] == [ct["id"]]
    # What was performed can no longer be cancelled.
    call(pacs, "POST", f"worklist/{mr['id']}/status", json={"status": "COMPLETED"})
    r = call(pacs, "POST", f"worklist/{mr['id']}/cancel")
    assert r.status_code == 409 and "COMPLETED" in r.json()["error"]
    assert call(pacs, "GET", "worklist/999999").status_code == 404
    assert call(pacs, "POST", "worklist/999999/cancel").status_code == 404


def test_bad_values_answer_400_with_the_reason(pacs):
    base = {"PatientID": "WL-BAD", "Modality": "CT", "ScheduledProcedureStepStartDate": DAY}
    for values, message in [
            ({**base, "ScheduledProcedureStepStartDate": "2026-12-08"},
             "ScheduledProcedureStepStartDate: a date as YYYYMMDD, not '2026-12-08'"),
            ({**base, "PatientWeight": "heavy"}, "PatientWeight: a decimal number, not 'heavy'"),
            ({**base, "Modality": "C/T"}, "Modality: letters, digits, space, _ - or . only"),
            ({**base, "AccessionNumber": "A" * 17}, "AccessionNumber: at most 16 characters"),
            ({**base, "PatientName": "Doe\\Jane"},
             "PatientName: one value, without control characters or '\\'"),
            ({**base, "Shoe size": "42"}, "'Shoe size' is not a worklist field"),
            ({"PatientID": "WL-BAD"}, "a scheduled step needs Modality, "
                                      "ScheduledProcedureStepStartDate"),
            ({**base, "ScheduledProcedureStepStatus": "STARTED"},
             "ScheduledProcedureStepStatus: set by hand, one of SCHEDULED, ARRIVED, READY, "
             "COMPLETED, DISCONTINUED, CANCELED"),
            ({**base, "PatientName": ["Doe"]}, "'PatientName': a text or a number")]:
        r = call(pacs, "POST", "worklist", json=values)
        assert (r.status_code, r.json()) == (400, {"error": message}), values
    r = call(pacs, "POST", "worklist", data=b"{not json", headers={
        "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "the body is not JSON"
    # A Study Instance UID names one item: the modality copies it into its images.
    first = add(pacs, **base)
    r = call(pacs, "POST", "worklist", json={**base,
                                             "StudyInstanceUID": first["study_instance_uid"]})
    assert r.status_code == 409 and f"worklist item {first['id']}" in r.json()["error"]
    assert call(pacs, "GET", "worklist", params={"day": "tomorrow"}).status_code == 400
    assert call(pacs, "GET", "worklist", params={"status": "lost"}).status_code == 400
    assert listed(pacs, day=DAY, q="WL-BAD") == [first]   # nothing else was kept
    assert first["performed"] == [] and first["study"] == ""


def test_performed_steps_and_the_study_show_on_the_item_and_the_study(pacs):
    item = add(pacs, PatientID="PID23-001", PatientName="Test^Patient001", Modality="CT",
               ScheduledProcedureStepStartDate=DAY, AccessionNumber="ACC-MPPS",
               RequestedProcedureDescription="CT abdomen", StudyInstanceUID=pacs.study)
    assert item["study"] == pacs.study   # the study with its UID is stored already
    mpps = {"sop_instance_uid": "1.2.826.0.1.3680043.10.1.23", "status": "IN PROGRESS",
            "calling_aet": "CT_1", "step": item["id"], "study_instance_uid": pacs.study,
            "modality": "CT", "started": "20261208093000"}
    pacs.index.put_performed(mpps, step_status=(item["id"], "STARTED"))
    got = listed(pacs, day=DAY, q="ACC-MPPS")[0]
    assert got["status"] == "STARTED"
    assert [(p["status"], p["calling_aet"], p["series"]) for p in got["performed"]] == [
        ("IN PROGRESS", "CT_1", 0)]
    pacs.index.put_performed({**mpps, "status": "COMPLETED", "finished": "20261208094500",
                              "series": "1.2.3.1\\1.2.3.2", "images": 40},
                             step_status=(item["id"], "COMPLETED"))
    got = listed(pacs, day=DAY, q="ACC-MPPS")[0]
    assert got["status"] == "COMPLETED" and got["study"] == pacs.study
    assert [(p["status"], p["series"], p["images"]) for p in got["performed"]] == [
        ("COMPLETED", 2, 40)]
    one = call(pacs, "GET", f"worklist/{item['id']}").json()
    assert one["performed"][0]["series_uids"] == ["1.2.3.1", "1.2.3.2"]
    assert (one["performed"][0]["started"], one["performed"][0]["finished"]) == (
        "20261208093000", "20261208094500")

    # The viewer asks for the order of the study it shows.
    r = call(pacs, "GET", f"studies/{pacs.study}/order")
    assert r.status_code == 200, r.text
    order = r.json()
    assert (order["order"]["accession_number"], order["order"]["status"],
            order["order"]["requested_procedure_description"], order["worklist"]) == (
        "ACC-MPPS", "COMPLETED", "CT abdomen", True)
    assert [(p["status"], p["images"]) for p in order["performed"]] == [("COMPLETED", 40)]
    r = call(pacs, "GET", "studies/1.2.3.999/order")
    assert r.json() == {"order": None, "performed": [], "worklist": True}


def test_users_limited_by_groups_are_refused(pacs):
    for method, path in [("GET", "worklist"), ("POST", "worklist"), ("GET", "worklist/1"),
                         ("PATCH", "worklist/1"), ("POST", "worklist/1/cancel")]:
        r = call(pacs, method, path, who="teacher", json={"PatientID": "X"})
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"] == ("the Worklist is for users who see every study (yours "
                                     "are limited by [[groups]])")
    # The order of a study they may not see is no more there than the study.
    assert call(pacs, "GET", f"studies/{pacs.study}/order", who="teacher").status_code == 404
    assert call(pacs, "GET", "worklist", who="boss").status_code == 200
    assert requests.get(f"{pacs.http_url}/api/worklist", timeout=10).status_code == 401


def test_cross_site_changes_are_refused(pacs):
    before = len(listed(pacs, day="all"))
    reader = session(pacs, "reader")
    values = {"PatientID": "WL-CSRF", "Modality": "CT", "ScheduledProcedureStepStartDate": DAY}
    # Another site's page: its Origin gives it away, whatever the cookie.
    r = reader.post(f"{pacs.http_url}/api/worklist", json=values,
                    headers={"Origin": "http://evil.example"}, timeout=10)
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    # A form post (no Origin, a form's type, no X-Requested-With).
    r = requests.post(f"{pacs.http_url}/api/worklist", data=values,
                      cookies=reader.cookies, timeout=10)
    assert r.status_code == 403
    r = reader.post(f"{pacs.http_url}/api/worklist/1/cancel", timeout=10,
                    headers={"Referer": "http://evil.example/page"})
    assert r.status_code == 403
    assert len(listed(pacs, day="all")) == before
    # The page's own origin passes.
    r = reader.post(f"{pacs.http_url}/api/worklist", json=values,
                    headers={"Origin": pacs.http_url}, timeout=10)
    assert r.status_code == 201


def test_each_change_is_an_audit_record(pacs):
    item = add(pacs, PatientID="WL-AUDIT", PatientName="Audit^Anna", Modality="US",
               ScheduledProcedureStepStartDate=NEXT, ScheduledProcedureStepStartTime="1400")
    call(pacs, "PATCH", f"worklist/{item['id']}", json={"AccessionNumber": "ACC-AUD"})
    call(pacs, "POST", f"worklist/{item['id']}/cancel")
    assert call(pacs, "POST", "worklist", json={"PatientID": "WL-AUDIT"}).status_code == 400

    made = wait_for(lambda: [r for r in audit(pacs, action="schedule", user="reader")
                             if r["patients"] == [{"id": "WL-AUDIT", "name": "Audit^Anna"}]],
                    10, "the schedule record")
    assert len(made) == 1
    assert (made[0]["outcome"], made[0]["via"], made[0]["event"], made[0]["detail"],
            made[0]["studies"]) == (
        "ok", "http", "110109", f"worklist item {item['id']} added: US {NEXT} 1400",
        [item["study_instance_uid"]])
    changes = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(
        audit(pacs, action="schedule-change", patient="WL-AUDIT")), 10, "two changes")
    assert sorted(r["detail"] for r in changes) == [
        f"worklist item {item['id']} SCHEDULED -> CANCELED",
        f"worklist item {item['id']} changed: AccessionNumber"]
    assert {r["event"] for r in changes} == {"110109"}
    refused = wait_for(lambda: [r for r in audit(pacs, action="schedule", user="reader")
                                if r["outcome"] == "refused"], 10, "the refused one")
    assert refused
    # Reading the worklist is a query.
    assert wait_for(lambda: [r for r in audit(pacs, action="query", user="reader")
                             if "day=" in r["detail"]], 10, "a worklist query")
