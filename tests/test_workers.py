"""DICOM worker processes (`[dicom] workers`, pacsd.daemon.workers): the server in this process
supervises real `python -m pacsd.daemon.worker` children that serve the DICOM port.

Stores over concurrent associations into one SQLite index from two processes, then C-FIND,
C-GET and C-ECHO through them; both association caps hold for the server as a whole; the
workers' log records reach the server's log; counters are added up; a killed worker is replaced
and the run is marked unclean from when it began; a stop ends every worker cleanly.
The kill storms with workers are tests/reliability/test_kill_workers.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import pytest
import requests
from conftest import LOCAL, associate, c_find, c_get, store_files, wait_for
from data import write_series
from pydicom import dcmread
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pacsd.daemon.workers import cores, worker_count
from pacsd.index.models import Instance

WORKERS = {"workers": 2}


def children(pid: int) -> set[int]:
    """The pids whose parent is `pid` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry))
    return out


def echo_status(port: int, aet: str = "PYNETDICOM") -> str:
    """'accepted', 'rejected' or 'aborted' for one association (released at once)."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    try:
        if assoc.is_established:
            return "accepted"
        return "rejected" if assoc.is_rejected else "aborted"
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_worker_count_follows_the_setting(make_server, tmp_path):
    from pacsd.config import loader
    from conftest import write_config
    cfg = loader.load(write_config(tmp_path / "a.toml", tmp_path / "d"), env={})
    assert cfg.dicom_workers == 0 and worker_count(cfg) == cores() >= 1
    cfg = loader.load(write_config(tmp_path / "b.toml", tmp_path / "d", dicom={"workers": 3}),
                      env={})
    assert worker_count(cfg) == 3


def test_stores_from_concurrent_associations_then_find_get_echo(make_server, tmp_path):
    server = make_server(dicom=WORKERS)
    pids = set(server.dicom.pids())
    # Forked by the zygote, itself forked by this process before it started its threads.
    zygote = server.dicom.zygote.pid
    assert len(pids) == 2 and pids <= children(zygote) and zygote in children(os.getpid())
    sets = [write_series(tmp_path / f"s{n}", seed=n, patients=1, studies=1, series=1,
                         images=12, size=64) for n in range(6)]
    results: dict[int, list[int]] = {}

    def send(n: int) -> None:
        results[n] = store_files(server.dicom_port, sets[n])

    threads = [threading.Thread(target=send, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {n: set(s) for n, s in results.items()} == {n: {0} for n in range(6)}

    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for s in sets for p in s}
    with server.index.reading():
        rows = {r.sop_instance_uid: r.path for r in Instance.select()}
    assert set(rows) == sent
    assert all((server.cfg.storage_path / path).is_file() for path in rows.values())
    assert server.index.counts()["instances"] == 72 and server.index.counts()["patients"] == 6
    status, matches = c_find(server.dicom_port, "STUDY", PatientID="PID*", StudyInstanceUID="")
    assert status == 0 and len(matches) == 6
    series = dcmread(sets[3][0], stop_before_pixels=True)
    status, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "SERIES",
                                            "StudyInstanceUID": series.StudyInstanceUID,
                                            "SeriesInstanceUID": series.SeriesInstanceUID},
                        CTImageStorage, ExplicitVRLittleEndian)
    assert status == 0 and len(got) == 12
    assert echo_status(server.dicom_port) == "accepted"
    figures = server.dicom.figures()
    assert figures["workers"] == 2 and figures["worker_restarts"] == 0
    assert sum(figures["stores"].values()) == 72
    assert figures["requests"]["C-STORE"] == 72 and figures["requests"]["C-FIND"] == 1
    assert figures["associations_accepted"] >= 9   # 6 stores, the find, the get, the echo
    assert set(server.dicom.pids()) == pids   # none died on the way


def test_association_caps_hold_for_the_server_as_a_whole(make_server, caplog):
    """Three held associations from this host, the cap at three: the fourth is refused
    whichever worker takes it, and one more is accepted once one is released."""
    caplog.set_level(logging.INFO)
    server = make_server(dicom={**WORKERS, "max_associations_per_host": 3})
    port = server.dicom_port
    with associate(port, [build_context(Verification)]), \
            associate(port, [build_context(Verification)]), \
            associate(port, [build_context(Verification)]) as third:
        wait_for(lambda: server.dicom.active_associations == 3, 10, "three counted")
        assert [echo_status(port) for _ in range(4)] == ["rejected"] * 4
        third.release()
        wait_for(lambda: server.dicom.active_associations == 2, 10, "the released one given back")
        assert echo_status(port) == "accepted"
    wait_for(lambda: server.dicom.active_associations == 0, 10, "every slot given back")
    # The refusals were logged by the workers and written by this process, as its own.
    refused = [r for r in caplog.records if r.name == "pacsd.dimse.access"
               and "max_associations_per_host" in r.getMessage()]
    assert len(refused) == 4 and all(r.levelno == logging.WARNING for r in refused)
    assert {r.process for r in refused} <= set(server.dicom.pids())
    assert server.dicom.figures()["associations_rejected"].get("refused") == 4


def test_the_total_cap_holds_across_workers(make_server):
    server = make_server(dicom={**WORKERS, "max_associations": 2,
                                "max_associations_per_host": 0})
    port = server.dicom_port
    with associate(port, [build_context(Verification)]), \
            associate(port, [build_context(Verification)]):
        assert [echo_status(port) for _ in range(3)] == ["rejected"] * 3
    wait_for(lambda: echo_status(port) == "accepted", 10, "a slot free again")


def test_a_killed_worker_is_replaced_and_the_run_marked_unclean(make_server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    server = make_server(dicom=WORKERS)
    pidfile = server.cfg.pidfile
    began = pidfile.stat().st_mtime
    victim = server.dicom.workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: victim.pid not in server.dicom.pids() and len(server.dicom.pids()) == 2,
             30, "a new worker in place of the killed one")
    wait_for(lambda: all(w.ready.is_set() for w in server.dicom.workers), 30, "it is ready")
    died = [r for r in caplog.records if "ended unexpectedly" in r.getMessage()]
    assert len(died) == 1 and died[0].levelno == logging.ERROR
    assert f"pid {victim.pid}" in died[0].getMessage() and "signal 9" in died[0].getMessage()
    assert server.dicom.figures()["worker_restarts"] == 1
    status = requests.get(server.http_url + "/status", timeout=10).json()
    assert (status["dicom_workers"], status["dicom_worker_restarts"]) == (2, 1)
    # Recovery at the next start begins when the dead worker began (not before this run).
    assert abs(pidfile.stat().st_mtime - victim.started) < 1 and victim.started >= began - 1
    paths = write_series(tmp_path / "after", seed=40, images=8, size=32)
    assert store_files(server.dicom_port, paths) == [0] * 8
    server.stop()
    assert pidfile.exists(), "a run that lost a worker must leave its pidfile: the next " \
        "start checks the files that worker was writing"


def test_stop_ends_every_worker_cleanly(make_server):
    server = make_server(dicom=WORKERS)
    procs = [w.proc for w in server.dicom.workers]
    with associate(server.dicom_port, [build_context(Verification)]) as assoc:
        assert assoc.send_c_echo().Status == 0
    zygote = server.dicom.zygote.pid
    server.stop()
    assert [p.returncode for p in procs] == [0, 0]
    assert zygote not in children(os.getpid())   # reaped: gone with its workers
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)
    assert not server.cfg.pidfile.exists()   # a clean run


def test_metrics_add_up_every_worker(make_server, tmp_path):
    server = make_server(dicom=WORKERS)
    for n in range(3):   # three associations: likely both workers, whichever takes them
        assert store_files(server.dicom_port,
                           write_series(tmp_path / f"m{n}", seed=50 + n, images=4, size=32)) \
            == [0] * 4
    text = requests.get(server.http_url + "/metrics", timeout=10).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line and not line.startswith("#"))
    assert lines["pacsd_dicom_workers"] == "2"
    assert lines["pacsd_dicom_worker_restarts_total"] == "0"
    assert lines['pacsd_dicom_stores_total{status="0x0000",result="success"}'] == "12"
    assert lines['pacsd_dicom_requests_total{operation="C-STORE"}'] == "12"
    # The workers' index writers committed the 12 rows: their commits are counted too.
    assert float(lines["pacsd_index_commit_seconds_count"]) >= 3


def test_without_its_zygote_the_server_keeps_its_workers_and_spawns_new_ones(make_server,
                                                                                tmp_path, caplog):
    """The process that forks the workers killed: the workers it forked keep serving (their
    pipes say they live); one that dies after it is replaced by a new interpreter."""
    caplog.set_level(logging.INFO)
    server = make_server(dicom=WORKERS)
    zygote = server.dicom.zygote.pid
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: not server.dicom.zygote.alive, 10, "the zygote's end seen")
    # The store below takes several rounds of the watcher (every 0.25 s): no worker is
    # counted dead for its zygote's end (worker_restarts is 1, for the victim, at the end).
    assert len(server.dicom.pids()) == 2
    assert store_files(server.dicom_port, write_series(tmp_path / "a", seed=60, images=3,
                                                       size=32)) == [0] * 3
    victim = server.dicom.workers[1].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.dicom.pids() and len(server.dicom.pids()) == 2
             and all(w.ready.is_set() for w in server.dicom.workers), 60, "a spawned worker")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"pid {victim}" in m and "ended unexpectedly" in m for m in messages)
    assert any("new interpreters" in m for m in messages)
    assert server.dicom.figures()["worker_restarts"] == 1
    status = requests.get(server.http_url + "/status", timeout=10).json()
    assert (status["dicom_workers"], status["dicom_worker_restarts"]) == (2, 1)
    assert not [m for m in messages if "ended unexpectedly" in m and f"pid {victim}" not in m]
    # Whichever worker takes them, stores go on.
    for n in range(3):
        assert store_files(server.dicom_port, write_series(tmp_path / f"b{n}", seed=61 + n,
                                                           images=2, size=32)) == [0] * 2
    workers = [w.pid for w in server.dicom.workers]
    server.stop()
    for pid in workers:   # all stopped, the zygote's orphan too
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
