"""pacsd/compat/pynetdicom_pace.py: associations wait for work instead of polling, and leave nothing behind."""

from __future__ import annotations

import time

import psutil
from conftest import associate, c_find, store_files
from data import write_series
from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from pacsd.compat.pynetdicom_pace import BriskDUL


def _idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.dicom.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.dicom.active_associations == 0


def test_accepted_associations_wait_for_work_and_close_their_wake_up_sockets(server):
    wake_ups = psutil.Process().net_connections   # the socket pairs pace makes (AF_UNIX)
    before = len(wake_ups("unix"))
    for _ in range(25):
        with associate(server.dicom_port, [build_context(Verification)]) as assoc:
            accepted = server.dicom.ae.active_associations
            assert accepted and all(type(a.dul) is BriskDUL for a in accepted)
            assert assoc.send_c_echo().Status == 0
    _idle(server)
    deadline = time.monotonic() + 10   # closed as each connection closes, just after
    while len(wake_ups("unix")) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(wake_ups("unix")) == before   # each association made a socket pair


def test_release_abort_and_requests_are_all_seen_on_an_idle_association(server, tmp_path):
    paths = write_series(tmp_path / "in", seed=5, patients=1, studies=1, series=1, images=3,
                         size=32)
    assert store_files(server.dicom_port, paths) == [0, 0, 0]
    with associate(server.dicom_port, [build_context(Verification)]) as assoc:
        time.sleep(0.1)   # idle longer than the reactor's and the DUL's waits
        assert assoc.send_c_echo().Status == 0
        assoc.abort()
    _idle(server)
    status, matches = c_find(server.dicom_port, "STUDY", PatientID="",
                             NumberOfStudyRelatedInstances="")
    assert status == 0 and [m.NumberOfStudyRelatedInstances for m in matches] == [3]
    _idle(server)
