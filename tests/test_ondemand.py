"""PACS On-Demand, its search (issue 24, parts 1 and 2): [[nodes]] marked on_demand are
upstreams, and C-FIND (PATIENT, STUDY, SERIES), QIDO-RS and the study list fall through to them.
Two real upstreams: a second pacsd (`pacsd serve`) and Orthanc. Local matches come first, then
the upstreams' in on_demand_order, none twice; each upstream match names us as its Retrieve AE
Title. A restricted user gets no upstream match; an upstream that is down, or that takes the
connection and never answers, costs at most [dicom] on_demand_budget and one log line."""

from __future__ import annotations

import socket
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_FIND

sys.path.insert(0, str(Path(__file__).parent))

from conftest import (LOCAL, browser_errors, c_find, free_port, remote_pacsd,  # noqa: E402
                      serve, store_files, wait_for, write_config)
from data import write_series  # noqa: E402
from orthanc import orthanc  # noqa: E402
from pacsd.web.auth import hash_password  # noqa: E402

PASSWORDS = {"boss": "boss-pw", "ward": "ward-pw"}
USERS = [{"name": n, "password_hash": hash_password(p, iterations=1000), "admin": n == "boss"}
         for n, p in PASSWORDS.items()]
WARD = {"name": "ward", "users": ["ward"], "referring": ["Referrer^*"]}   # every local study


def study(folder: Path, seed: int) -> list[Path]:
    """One small CT study (one series, one image) of patient PID<seed>-001."""
    return write_series(folder / f"s{seed}", seed=seed, images=1, size=16)


def uid_of(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Here: studies L and B. The second pacsd (upstream "archive", order 1): R and B.
    Orthanc (upstream "orthanc", order 2): O, R and B."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("ondemand")
    files = {name: study(tmp / "in", seed) for name, seed in
             (("L", 31), ("B", 32), ("R", 33), ("O", 34))}
    with ExitStack() as stack:
        archive, _ = stack.enter_context(remote_pacsd(tmp, files["R"] + files["B"],
                                                      local_aet="PACSD"))
        peer = stack.enter_context(orthanc(
            tmp / "orthanc", DicomModalities={"pacsd": {"AET": "PACSD", "Host": LOCAL,
                                                        "Port": 104}}))
        assert store_files(peer.dicom_port, files["O"] + files["R"] + files["B"]) == [0] * 3
        cfg = config.load(write_config(
            tmp / "c.toml", tmp / "data", users=USERS, groups=[WARD],
            dicom={"workers": 1, "on_demand_budget": 8.0},
            nodes=[{"name": "orthanc", "aet": "ORTHANC", "host": LOCAL,
                    "port": peer.dicom_port, "on_demand": True, "on_demand_order": 2},
                   {"name": "archive", "aet": "REMOTE", "host": LOCAL, "port": archive.port,
                    "on_demand": True, "on_demand_order": 1, "on_demand_retrieves": 3}]),
            env={})
        server = Server(cfg).start()
        stack.callback(server.stop)
        assert store_files(server.dicom_port, files["L"] + files["B"]) == [0, 0]
        server.uid = {k: uid_of(v) for k, v in files.items()}
        yield server


def test_config_reads_upstreams(site):
    nodes = {n.name: n for n in site.cfg.nodes}
    assert (nodes["archive"].on_demand, nodes["archive"].on_demand_order,
            nodes["archive"].on_demand_retrieves) == (True, 1, 3)
    assert (nodes["orthanc"].on_demand_order, nodes["orthanc"].on_demand_retrieves) == (2, 2)
    assert not nodes["PYNETDICOM"].on_demand


def test_config_refuses_bad_upstream_keys(tmp_path):
    from pacsd import config
    from pacsd.errors import ConfigError
    base = {"name": "up", "aet": "UP", "host": LOCAL, "port": 104}
    for bad, said in (({"on_demand": "yes"}, "on_demand must be true or false"),
                      ({"on_demand": True, "on_demand_retrieves": 0}, "on_demand_retrieves"),
                      ({"on_demand_order": 1}, "need on_demand = true")):
        path = write_config(tmp_path / "c.toml", tmp_path / "d", nodes=[{**base, **bad}])
        with pytest.raises(ConfigError, match=said):
            config.load(path, env={})


def test_c_find_study_merges_local_first(site):
    status, found = c_find(site.dicom_port, "STUDY", StudyInstanceUID="", PatientID="",
                           StudyDescription="")
    assert status == 0
    uids = [str(ds.StudyInstanceUID) for ds in found]
    # Local first (L, B, in the index's order), then R (the archive's, first in order; Orthanc
    # has it too), then O (Orthanc's); B, everywhere, once.
    assert sorted(uids[:2]) == sorted([site.uid["L"], site.uid["B"]])
    assert uids[2:] == [site.uid["R"], site.uid["O"]]
    assert {str(ds.RetrieveAETitle) for ds in found} == {"PACSD"}
    assert {str(ds.PatientID) for ds in found[2:]} == {"PID33-001", "PID34-001"}
    # Keys the caller did not ask for are not sent back.
    assert all("StudyDate" not in ds for ds in found)


def test_c_find_patient_and_series_levels(site):
    status, found = c_find(site.dicom_port, "PATIENT", model=PATIENT_FIND, PatientID="",
                           PatientName="")
    assert status == 0
    ids = [str(ds.PatientID) for ds in found]
    assert sorted(ids[:2]) == ["PID31-001", "PID32-001"]
    assert ids[2:] == ["PID33-001", "PID34-001"]
    assert {str(ds.RetrieveAETitle) for ds in found} == {"PACSD"}
    status, series = c_find(site.dicom_port, "SERIES", StudyInstanceUID=site.uid["O"],
                            SeriesInstanceUID="", Modality="")
    assert status == 0
    assert [(str(ds.Modality), str(ds.RetrieveAETitle)) for ds in series] == [("CT", "PACSD")]
    status, none = c_find(site.dicom_port, "STUDY", StudyInstanceUID="", PatientID="NOBODY")
    assert (status, none) == (0, [])


def test_qido_merges_and_marks_upstream_results(site):
    url = f"{site.http_url}/dicom-web/studies"
    rsp = requests.get(url, auth=("boss", "boss-pw"), timeout=30)
    assert rsp.status_code == 200
    results = rsp.json()
    uids = [r["0020000D"]["Value"][0] for r in results]
    assert sorted(uids[:2]) == sorted([site.uid["L"], site.uid["B"]])
    assert uids[2:] == [site.uid["R"], site.uid["O"]]
    assert [r["00080056"]["Value"][0] for r in results] == ["ONLINE"] * 2 + ["NEARLINE"] * 2
    assert ["00080054" in r for r in results] == [False, False, True, True]
    assert results[2]["00080054"]["Value"] == ["PACSD"]
    assert rsp.headers["X-pacsd-Upstream"] == "archive=1, orthanc=1"
    # A page cut from the merged list: the second local study, then the archive's.
    page = requests.get(url, params={"offset": 1, "limit": 2}, auth=("boss", "boss-pw"),
                        timeout=30)
    assert [r["0020000D"]["Value"][0] for r in page.json()] == uids[1:3]
    assert "additional results" in page.headers["Warning"]
    assert page.headers["X-pacsd-Upstream"] == "archive=1"
    # Matching keys go upstream too.
    one = requests.get(url, params={"PatientID": "PID34-001"}, auth=("boss", "boss-pw"),
                       timeout=30).json()
    assert [r["0020000D"]["Value"][0] for r in one] == [site.uid["O"]]


def test_study_list_marks_upstream_rows(site):
    rsp = requests.get(f"{site.http_url}/api/studies", auth=("boss", "boss-pw"), timeout=30)
    assert rsp.status_code == 200
    body = rsp.json()
    assert body["total"] == 4
    rows = body["studies"]
    assert [r.get("upstream") for r in rows] == [None, None, "archive", "orthanc"]
    assert [r["study_uid"] for r in rows[2:]] == [site.uid["R"], site.uid["O"]]
    assert rows[3]["patient_id"] == "PID34-001" and rows[3]["instances"] == 1
    # The search fields go upstream as wildcards; a label search stays here.
    by_id = requests.get(f"{site.http_url}/api/studies", params={"patient_id": "PID34"},
                         auth=("boss", "boss-pw"), timeout=30).json()
    assert [(r["study_uid"], r["upstream"]) for r in by_id["studies"]] == [
        (site.uid["O"], "orthanc")]
    second = requests.get(f"{site.http_url}/api/studies", params={"offset": 3, "limit": 5},
                          auth=("boss", "boss-pw"), timeout=30).json()
    assert [r["study_uid"] for r in second["studies"]] == [site.uid["O"]]


def test_studies_page_shows_upstream_rows_at_their_node(site, browser):
    """The Studies page (Chromium): the upstreams' studies after the local ones, marked "at
    <node>", without a link, a checkbox or a click that opens them."""
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(site.http_url + "/app/login")
    browser.find_element("id", "name").send_keys("boss")
    browser.find_element("id", "password").send_keys(PASSWORDS["boss"] + "\n")

    def rows(d):
        return d.execute_script(
            "return [...document.querySelectorAll('#studies tbody tr[data-uid]')].map(tr => "
            "[tr.dataset.uid, tr.classList.contains('upstream'), "
            "tr.querySelectorAll('a, input').length, tr.innerText.includes('at archive'), "
            "tr.innerText.includes('at orthanc')])")
    WebDriverWait(browser, 30).until(lambda d: len(rows(d)) == 4)
    got = rows(browser)
    assert [r[1] for r in got] == [False, False, True, True]
    assert got[2][0] == site.uid["R"] and got[2][2:] == [0, True, False]
    assert got[3][0] == site.uid["O"] and got[3][2:] == [0, False, True]
    before = browser.current_url
    browser.find_element("css selector", "#studies tbody tr.upstream .description").click()
    assert browser.current_url == before
    assert browser_errors(browser) == []


def test_restricted_user_gets_no_upstream_results(site):
    rsp = requests.get(f"{site.http_url}/dicom-web/studies", auth=("ward", "ward-pw"),
                       timeout=30)
    assert sorted(r["0020000D"]["Value"][0] for r in rsp.json()) == sorted(
        [site.uid["L"], site.uid["B"]])
    assert "X-pacsd-Upstream" not in rsp.headers
    listed = requests.get(f"{site.http_url}/api/studies", auth=("ward", "ward-pw"),
                          timeout=30).json()
    assert listed["total"] == 2 and all("upstream" not in r for r in listed["studies"])


class Silent:
    """A TCP server that takes every connection and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOCAL, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()


def test_down_upstreams_cost_the_budget_once(tmp_path):
    """One upstream refuses connections, one takes them and stays silent: the search answers
    within the budget with the local matches, and each upstream is logged once."""
    silent = Silent()
    budget = 1.0
    try:
        files = study(tmp_path / "in", 35)
        cfg = write_config(
            tmp_path / "c.toml", tmp_path / "data", dicom={"workers": 1,
                                                          "on_demand_budget": budget},
            nodes=[{"name": "closed", "aet": "CLOSED", "host": LOCAL, "port": free_port(),
                    "on_demand": True},
                   {"name": "silent", "aet": "SILENT", "host": LOCAL, "port": silent.port,
                    "on_demand": True}])
        with serve(cfg, tmp_path / "data") as proc:
            assert store_files(proc.port, files) == [0]
            for _ in range(2):
                t0 = time.monotonic()
                status, found = c_find(proc.port, "STUDY", StudyInstanceUID="")
                took = time.monotonic() - t0
                assert status == 0 and [str(ds.StudyInstanceUID) for ds in found] == [
                    uid_of(files)]
                assert took < budget + 1.5, took
            t0 = time.monotonic()
            listed = requests.get(f"{proc.http_url}/api/studies", timeout=30).json()
            assert time.monotonic() - t0 < budget + 1.5
            assert [r["study_uid"] for r in listed["studies"]] == [uid_of(files)]

            def lines(name: str) -> list[str]:
                return [ln for ln in proc.log.read_text().splitlines()
                        if "left out of searches" in ln and f"upstream {name} " in ln]
            wait_for(lambda: lines("closed") and lines("silent"), 10, "the upstreams' lines")
            assert len(lines("closed")) == 1 and "connection refused" in lines("closed")[0]
            assert len(lines("silent")) == 1 and "budget" in lines("silent")[0]
    finally:
        silent.close()


def test_nothing_is_asked_without_upstreams(tmp_path):
    """No upstream: no search starts anything (the local path as before)."""
    from pacsd import config
    from pacsd.nodes import ondemand
    cfg = config.load(write_config(tmp_path / "c.toml", tmp_path / "d"), env={})
    threads = threading.active_count()
    assert ondemand.upstreams(cfg) == []
    assert ondemand.start(cfg, "STUDY", {"PatientID": "X"}) is None
    assert threading.active_count() == threads
