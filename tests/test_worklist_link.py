"""The worklist's housekeeping (issue 23, part 5), on a real server: a study arriving with an
order's accession number (or with the Study Instance UID the worklist gave it) is linked to the
order and completes it once it is whole; steps past their date expire; ended ones go after
[worklist] keep_days. Images go in over DICOM (pynetdicom as SCU)."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import store_files, wait_for
from data import ct_slice
from pacsd.index.models import StudyActivity, reading
from pacsd.query import worklist

SUCCESS = 0x0000
QUICK = {"hooks": {"study_stable_after": 0.3}}


def step(step_id: int) -> dict:
    with reading():
        row = worklist.step(step_id)
    assert row is not None
    return row


def schedule(server, **values: str) -> int:
    base = {"PatientID": "PID23-001", "PatientName": "Order^Olga", "Modality": "CT",
            "ScheduledProcedureStepStartDate": time.strftime("%Y%m%d")}
    return server.index.add_step(worklist.clean_step({**base, **values}))


def quiet_pending(uid: str) -> bool:
    """Whether the study still waits to turn stable (pacsd.nodes.routing's watcher)."""
    with reading():
        return StudyActivity.select().where(StudyActivity.study_uid == uid).exists()


def send(tmp_path: Path, port: int, study: int, *, accession: str = "",
         study_uid: str = "") -> str:
    """Two slices of one study, stored over DICOM; the study's UID."""
    paths = []
    for n in (1, 2):
        ds = ct_slice(seed=23, patient=1, study=study, series=1, number=n, size=16,
                      accession=accession)
        if study_uid:
            ds.StudyInstanceUID = study_uid
        path = tmp_path / f"s{study}i{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert store_files(port, paths) == [SUCCESS, SUCCESS]
    return str(ds.StudyInstanceUID)


def test_a_study_with_the_orders_accession_completes_it_once_whole(make_server, tmp_path):
    server = make_server(**QUICK)
    order = schedule(server, AccessionNumber="ACC-LINK-1")
    other = schedule(server, AccessionNumber="ACC-LINK-2")
    unnumbered = schedule(server)   # no accession: never guessed
    uid = send(tmp_path, server.dicom.port, 1, accession="ACC-LINK-1")
    wait_for(lambda: step(order)["linked_study"], 15, "the order linked to its study")
    row = step(order)
    assert (row["status"], row["linked_study"]) == ("COMPLETED", uid)
    assert row["ended"] is not None
    for untouched in (other, unnumbered):
        assert (step(untouched)["status"], step(untouched)["linked_study"]) == ("SCHEDULED", "")


def test_a_study_made_with_the_worklists_uid_is_linked_without_accession(make_server, tmp_path):
    server = make_server(**QUICK)
    given = worklist.new_uid()
    order = schedule(server, StudyInstanceUID=given)
    send(tmp_path, server.dicom.port, 2, accession="", study_uid=given)
    wait_for(lambda: step(order)["status"] == "COMPLETED", 15, "the order completed")
    assert step(order)["linked_study"] == given


def test_a_step_in_progress_is_linked_but_left_to_its_mpps(make_server, tmp_path):
    server = make_server(**QUICK)
    order = schedule(server, AccessionNumber="ACC-MPPS")
    server.index.put_performed({"sop_instance_uid": "1.2.826.0.1.3680043.10.23.1",
                                "status": "IN PROGRESS", "step": order}, (order, "STARTED"))
    uid = send(tmp_path, server.dicom.port, 3, accession="ACC-MPPS")
    wait_for(lambda: step(order)["linked_study"], 15, "the order linked to its study")
    assert (step(order)["status"], step(order)["linked_study"]) == ("STARTED", uid)


def test_housekeeping_links_late_orders_expires_and_prunes(make_server, tmp_path):
    server = make_server(worklist={"expire_after_days": 1, "keep_days": 0.00002}, **QUICK)
    uid = send(tmp_path, server.dicom.port, 4, accession="ACC-LATE")
    wait_for(lambda: not quiet_pending(uid), 15, "the study stable")
    late = schedule(server, AccessionNumber="ACC-LATE")   # the order came after its study
    old_day = time.strftime("%Y%m%d", time.localtime(time.time() - 3 * 86400))
    stale = schedule(server, ScheduledProcedureStepStartDate=old_day,
                     ScheduledProcedureStepStartTime="0800")
    today = schedule(server, ScheduledProcedureStepStartTime="235959")
    assert server.housekeeping is not None
    done = server.housekeeping.run_once()
    assert {"worklist-link", "worklist-expire", "worklist-prune"} <= set(done)
    assert (step(late)["status"], step(late)["linked_study"]) == ("COMPLETED", uid)
    assert step(stale)["status"] == "EXPIRED"
    assert step(today)["status"] == "SCHEDULED"
    # keep_days (about two seconds here): ended steps go, open ones stay.

    def pruned() -> bool:
        server.housekeeping.run_once()
        with reading():
            return worklist.step(stale) is None and worklist.step(late) is None
    wait_for(pruned, 15, "the ended steps pruned")
    assert step(today)["status"] == "SCHEDULED"
