"""XML-RPC as OsiriX/Horos answers it (Horos/Sources/XMLRPCMethods.mm, WebPortalConnection.mm),
with xmlrpc.client against the real server, and a second pacsd as the node that holds studies."""

from __future__ import annotations

import http.server
import logging
import threading
import time
import xmlrpc.client

import pytest
import requests
from pydicom import dcmread

from conftest import LOCAL, free_port, remote_pacsd, store_files
from data import dataset_bytes, write_series
from pacsd import query
from test_xmlrpc import bad_request, proxy, wait_until

# Horos's method table (selectorStringForXMLRPCRequestMethodName:): every name, parameters
# that Horos accepts, and what a required parameter left out answers (400) or None.
# The GUI methods answer {error: "0"}; the rest are checked in their own tests below.
GUI = {
    "SwitchToDefaultDBIfNeeded": ({}, None),
    "OpenDB": ({"path": "/Users/x/Documents/"}, "path"),
    "SelectAlbum": ({"name": "Today"}, "name"),
    "CloseAllWindows": ({}, None),
    "Close2DViewerWithSeriesUID": ({"uid": "1.2.3"}, "uid"),
    "Close2DViewerWithStudyUID": ({"uid": "1.2.3"}, "uid"),
    "DisplayStudyListByPatientName": ({"PatientName": "DOE^JOHN"}, "PatientName"),
    "DisplayStudyListByPatientId": ({"PatientID": "0123456789"}, "PatientID"),
    "KillOsiriX": ({}, None),
}
# Methods whose answer carries more than {error: "0"} without a viewer open.
VIEWER = {
    "GetDisplayed2DViewerSeries": {"error": "0", "elements": []},
    "GetDisplayed2DViewerStudies": {"error": "0", "elements": []},
    "PathToFrontDCM": {"error": "0", "currentDCMPath": ""},
}
# The rest of the table, each with a call that Horos answers 400 (a required parameter empty).
DATA = {
    "DownloadURL": {}, "DisplayStudy": {}, "DisplaySeries": {}, "DBWindowFind": {"table": "Study"},
    "FindObject": {"table": "Study"}, "Retrieve": {"filterKey": "PatientID"},
    "CMove": {"server": "x"},
}
HOROS_TABLE = sorted({*GUI, *VIEWER, *DATA})


def test_the_table_is_horos_table():
    """The names are exactly Horos's (19 selectors, DBWindowFind and FindObject one method)."""
    assert len(HOROS_TABLE) == 19


@pytest.mark.parametrize("name", HOROS_TABLE)
def test_every_horos_method_answers_as_horos(server, name):
    rpc = proxy(server)
    for spelling in (name, name.lower(), name.upper()):   # case-insensitive, as in Horos
        call = getattr(rpc, spelling)
        if name in GUI:
            params, required = GUI[name]
            assert call(params) == {"error": "0"}
            if required:
                bad_request(lambda: call({}))
                bad_request(lambda: call({**params, required: ""}))
        elif name in VIEWER:
            assert call({}) == VIEWER[name]
        else:
            bad_request(lambda: call(DATA[name]))


def test_a_struct_that_is_not_one_is_400_and_unknown_methods_a_fault(server):
    rpc = proxy(server)
    bad_request(lambda: rpc.CloseAllWindows("text"))
    with pytest.raises(xmlrpc.client.Fault) as fault:
        rpc.NoSuchOsiriXMethod({})
    assert fault.value.faultCode == -32601


def test_elements_are_strings_with_osirix_attributes(make_server, tmp_path):
    server = make_server()
    files = write_series(tmp_path / "in", seed=31, images=2, size=16)
    assert store_files(server.dicom_port, files) == [0, 0]
    ds = dcmread(files[0])
    rpc = proxy(server)
    [study] = rpc.DisplayStudy({"patientID": str(ds.PatientID)})["elements"]
    # Horos's DicomStudy attributes that pacsd holds (dictionaryForObject: every NSString,
    # NSNumber and NSDate attribute, as its description).
    for key in ("name", "patientID", "dateOfBirth", "patientSex", "studyInstanceUID",
                "accessionNumber", "studyName", "id", "date", "modality", "institutionName",
                "referringPhysician", "numberOfImages", "dateAdded", "hasDICOM"):
        assert key in study, key
    assert all(isinstance(v, str) for v in study.values()), study
    assert study["numberOfImages"] == "2" and study["hasDICOM"] == "1"
    assert study["dateAdded"].endswith(" +0000")
    [series] = rpc.DisplaySeries({"PatientID": str(ds.PatientID)})["elements"]
    for key in ("name", "seriesDescription", "seriesDICOMUID", "seriesInstanceUID", "modality",
                "id", "date", "numberOfImages"):
        assert key in series, key
    assert all(isinstance(v, str) for v in series.values()), series


def received(server, accession: str, n: int):
    with server.index.reading():
        studies = [m["StudyInstanceUID"] for m in query.find(
            query.Request("STUDY", {"AccessionNumber": accession}), ["StudyInstanceUID"])]
        got = query.instances(query.Request(
            "STUDY", {"StudyInstanceUID": "\\".join(studies)})) if studies else []
    return got if len(got) >= n else None


def job_of(server, answer: dict):
    job = wait_until(lambda: (j := server.runtime.jobs.get(answer["job"])) and j.ended and j)
    return job


def test_cmove_pulls_the_study_from_the_node(make_server, tmp_path, caplog):
    """OsiriX's CMove: C-FIND `server` for the accession number, C-MOVE the study here."""
    files = write_series(tmp_path / "in", seed=32, studies=2, series=2, images=2, size=32)
    study1 = [f for f in files if dcmread(f).AccessionNumber == "ACC3200101"]
    assert len(study1) == 4
    with remote_pacsd(tmp_path, files) as (remote, local_port):
        server = make_server(dicom={"aet": "LOCALPACS", "port": local_port},
                             nodes=[{"name": "Main-PACS", "aet": "REMOTE", "host": LOCAL,
                                     "port": remote.port}])
        assert server.index.counts()["instances"] == 0
        rpc = proxy(server, "/")
        caplog.set_level(logging.INFO, logger="pacsd.web.xmlrpc_remote")
        answer = rpc.CMove({"accessionNumber": "ACC3200101", "server": "Main-PACS"})
        assert answer["error"] == "0"
        got = wait_until(lambda: received(server, "ACC3200101", 4))
        assert {i.sop_instance_uid: dataset_bytes(server.cfg.storage_path / i.path)
                for i in got} == {str(dcmread(f).SOPInstanceUID): dataset_bytes(f)
                                  for f in study1}
        job = job_of(server, answer)
        assert (job.state, job.done, job.failed) == ("done", 4, 0)
        assert server.index.counts()["instances"] == 4   # the other study stayed there
        [line] = [r.getMessage() for r in caplog.records if "XML-RPC CMove from" in
                  r.getMessage()]
        assert "REMOTE" in line and "4 image(s) received, 0 failed" in line
        # An accession number given as a number (Horos formats it as a string).
        assert rpc.CMove({"accessionNumber": 12345, "server": "Main-PACS"})["error"] == "0"
        # Horos: -1 for a server that is not among its nodes; 400 without either parameter.
        assert rpc.CMove({"accessionNumber": "ACC3200101", "server": "nowhere"})["error"] == "-1"
        bad_request(lambda: rpc.CMove({"accessionNumber": "ACC3200101"}))
        bad_request(lambda: rpc.cmove({"server": "Main-PACS", "accessionNumber": ""}))


@pytest.mark.parametrize("mode", ["0", 1, "2"])
def test_retrieve_modes(make_server, tmp_path, mode, caplog):
    """retrieveMode as Horos's enum: 0 C-MOVE, 1 C-GET, 2 WADO (C-MOVE here, said in the log)."""
    files = write_series(tmp_path / "in", seed=33, images=3, size=32)
    with remote_pacsd(tmp_path, files) as (remote, local_port):
        server = make_server(dicom={"aet": "LOCALPACS", "port": local_port},
                             nodes=[{"name": "remote", "aet": "REMOTE", "host": LOCAL,
                                     "port": remote.port}])
        caplog.set_level(logging.INFO, logger="pacsd.web.xmlrpc_remote")
        rpc = proxy(server)
        started = time.monotonic()
        answer = rpc.retrieve({"serverName": "remote", "filterKey": "AccessionNumber",
                               "filterValue": "ACC3300101", "retrieveMode": mode})
        assert answer["error"] == "0" and time.monotonic() - started < 10
        got = wait_until(lambda: received(server, "ACC3300101", 3))
        assert {i.sop_instance_uid: dataset_bytes(server.cfg.storage_path / i.path)
                for i in got} == {str(dcmread(f).SOPInstanceUID): dataset_bytes(f)
                                  for f in files}
        job = job_of(server, answer)
        assert (job.state, job.done) == ("done", 3)
        lines = [r.getMessage() for r in caplog.records]
        by = "C-GET" if mode == 1 else "C-MOVE"
        assert any(f"by {by}: 3 image(s) received" in line for line in lines), lines
        assert any("WADO retrieve is not available" in line for line in lines) == (mode == "2")
        # A node without wado_url: WADO falls back to C-MOVE, and the line at the end says so.
        assert any("(WADO asked; the node has no wado_url)" in line
                   for line in lines) == (mode == "2")
        # -2 unknown server, -3 nothing matches (Horos's codes), 400 without serverName.
        assert rpc.Retrieve({"serverName": "nowhere", "filterKey": "PatientID",
                             "filterValue": "x", "retrieveMode": mode})["error"] == "-2"
        assert rpc.Retrieve({"serverName": "remote", "filterKey": "PatientID",
                             "filterValue": "nobody", "retrieveMode": mode})["error"] == "-3"
        bad_request(lambda: rpc.Retrieve({"filterKey": "PatientID", "filterValue": "x"}))


def test_retrieve_by_wado_fetches_each_object_from_the_node_s_wado_url(make_server, tmp_path,
                                                                      caplog):
    """retrieveMode 2 on a node with a wado_url, as Horos's WADORetrieve: C-FIND down to the
    images, then one WADO-URI GET per object from the node (here a second pacsd's /wado)."""
    files = write_series(tmp_path / "in", seed=36, series=2, images=2, size=32)
    with remote_pacsd(tmp_path, files) as (remote, _):
        # Our DICOM port is not the one the remote knows us by: a C-MOVE could not reach us,
        # so what arrives came by WADO.
        server = make_server(dicom={"aet": "LOCALPACS"},
                             nodes=[{"name": "remote", "aet": "REMOTE", "host": LOCAL,
                                     "port": remote.port, "wado_url": f"{remote.http_url}/wado"}])
        caplog.set_level(logging.INFO, logger="pacsd.web.xmlrpc_remote")
        rpc = proxy(server)
        answer = rpc.Retrieve({"serverName": "remote", "filterKey": "AccessionNumber",
                               "filterValue": "ACC3600101", "retrieveMode": 2})
        assert answer["error"] == "0"
        got = wait_until(lambda: received(server, "ACC3600101", 4))
        assert {i.sop_instance_uid: dataset_bytes(server.cfg.storage_path / i.path)
                for i in got} == {str(dcmread(f).SOPInstanceUID): dataset_bytes(f)
                                  for f in files}
        job = job_of(server, answer)
        assert (job.state, job.done, job.failed) == ("done", 4, 0)
        lines = [r.getMessage() for r in caplog.records if r.name == "pacsd.web.xmlrpc_remote"]
        assert lines == ["XML-RPC Retrieve from REMOTE: 1 study(ies) by WADO: 4 image(s) "
                         "received, 0 failed"], lines
        assert list((server.cfg.data / "incoming").iterdir()) == []
        # The remote answered WADO-URI GETs (its access log), not a C-MOVE.
        text = remote.log.read_text()
        assert "C-MOVE" not in text


def test_testdbalive_as_osirix_answers_it(server):
    rsp = requests.get(server.http_url + "/testdbalive", timeout=5)
    assert rsp.status_code == 200
    assert rsp.headers["Content-Type"].split(";")[0] == "text/html"
    assert rsp.text == "Test DB Alive succeeded"


def test_the_osirix_port_serves_the_same_app(make_server, tmp_path):
    port = free_port()
    server = make_server(http={"osirix_port": port})
    assert server.http.osirix_port == port != server.http.port
    files = write_series(tmp_path / "in", seed=34, images=1, size=16)
    assert store_files(server.dicom_port, files) == [0]
    url = f"http://{LOCAL}:{port}"
    rsp = requests.get(url + "/testdbalive", timeout=5)
    assert (rsp.status_code, rsp.text) == (200, "Test DB Alive succeeded")
    rpc = xmlrpc.client.ServerProxy(url + "/")
    assert rpc.DBWindowFind({"request": "TRUEPREDICATE", "table": "Study"})["count"] == 1
    assert rpc.CloseAllWindows({}) == {"error": "0"}


def test_the_osirix_port_is_off_by_default(server):
    assert server.http.osirix_port == 0 and server.http.osirix is None


# --- DownloadURL ----------------------------------------------------------------------------

class Node(http.server.BaseHTTPRequestHandler):
    """A node's web server gone bad: a redirect, a huge body, a body that is not DICOM."""

    def do_GET(self) -> None:
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/x.dcm")
            self.end_headers()
        elif self.path.startswith("/huge"):
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom")
            self.end_headers()   # no Content-Length: the limit must cut the reading
            chunk = b"\0" * (1 << 16)
            try:
                for _ in range(64):   # 4 MiB, over the 1 MiB limit
                    self.wfile.write(chunk)
            except OSError:
                pass
        else:
            body = b"<html>not DICOM</html>" * 10
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_downloadurl_imports_from_a_node_only(make_server, tmp_path, caplog):
    files = write_series(tmp_path / "in", seed=35, images=1, size=32)
    ds = dcmread(files[0])
    bad = http.server.ThreadingHTTPServer((LOCAL, 0), Node)
    threading.Thread(target=bad.serve_forever, daemon=True).start()
    try:
        with remote_pacsd(tmp_path, files) as (remote, local_port):
            server = make_server(http={"download_max_mb": 1},
                                 nodes=[{"name": "remote", "aet": "REMOTE", "host": LOCAL,
                                         "port": remote.port}])
            caplog.set_level(logging.INFO, logger="pacsd.web.xmlrpc_remote")
            rpc = proxy(server)
            wado = (f"{remote.http_url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}"
                    f"&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
                    "&contentType=application/dicom")
            answer = rpc.DownloadURL({"URL": wado, "Display": True})
            assert answer["error"] == "0"
            got = wait_until(lambda: received(server, str(ds.AccessionNumber), 1))
            assert dataset_bytes(server.cfg.storage_path / got[0].path) == dataset_bytes(files[0])
            assert job_of(server, answer).state == "done"

            # Attacks: another host (never contacted), other schemes, a redirect, a huge body,
            # a body that is not DICOM. Each refused with one log line, nothing stored.
            caplog.clear()
            started = time.monotonic()
            for url in ("http://192.0.2.1/wado?x=1", f"http://localhost:{remote.port}/x",
                        "http://example.org/x.dcm"):
                answer = rpc.DownloadURL({"URL": url})
                assert answer["error"] == "-2" and "not the host" in answer["message"], url
            assert time.monotonic() - started < 5
            for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1/",
                        f"http://user:pw@{LOCAL}:{bad.server_port}/x", "http://[::1"):
                bad_request(lambda: rpc.DownloadURL({"URL": url}))
            bad_request(lambda: rpc.DownloadURL({}))
            refused = [r.getMessage() for r in caplog.records
                       if r.name == "pacsd.web.xmlrpc_remote"]
            assert len(refused) == 8 and all("DownloadURL refused" in m for m in refused)
            base = f"http://{LOCAL}:{bad.server_port}"
            for path, why in (("/redirect", "HTTP 302"), ("/huge", "larger than the limit"),
                              ("/page.html", "not a DICOM Part 10 file")):
                caplog.clear()
                answer = rpc.DownloadURL({"URL": base + path})
                assert answer["error"] == "0"   # started, as Horos: the fetch fails later
                job = job_of(server, answer)
                assert job.state == "failed" and why in job.message, (path, job.message)
                lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(lines) == 1 and why in lines[0], lines
            assert server.index.counts()["instances"] == 1
            assert list((server.cfg.data / "incoming").iterdir()) == []
    finally:
        bad.shutdown()
        bad.server_close()


@pytest.mark.parametrize("path,why", [("/redirect", "HTTP 302"),
                                      ("/huge", "larger than the limit")])
def test_retrieve_by_wado_from_a_bad_wado_server_is_bounded(make_server, tmp_path, caplog,
                                                             path, why):
    """A node whose WADO server redirects or sends too much: each GET refused (no redirect
    followed, the size cap), nothing stored, and after 5 failures in a row the rest not asked."""
    files = write_series(tmp_path / "in", seed=37, images=7, size=32)
    bad = http.server.ThreadingHTTPServer((LOCAL, 0), Node)
    threading.Thread(target=bad.serve_forever, daemon=True).start()
    try:
        with remote_pacsd(tmp_path, files) as (remote, _):
            node = {"name": "remote", "aet": "REMOTE", "host": LOCAL, "port": remote.port,
                    "wado_url": f"http://{LOCAL}:{bad.server_port}{path}"}
            server = make_server(dicom={"aet": "LOCALPACS"}, http={"download_max_mb": 1},
                                 nodes=[node])
            caplog.set_level(logging.INFO, logger="pacsd")
            rpc = proxy(server)
            answer = rpc.Retrieve({"serverName": "remote", "filterKey": "AccessionNumber",
                                   "filterValue": "ACC3700101", "retrieveMode": "2"})
            assert answer["error"] == "0"
            job = job_of(server, answer)
            assert (job.state, job.done, job.failed) == ("failed", 0, 7)
            lines = [r.getMessage() for r in caplog.records
                     if r.name.startswith(("pacsd.nodes.wado_uri", "pacsd.web.xmlrpc_remote"))]
            assert len(lines) == 3 and why in lines[0], lines
            assert "5 failures in a row; 2 object(s) not asked" in lines[1]
            assert "by WADO: 0 image(s) received, 7 failed" in lines[2]
            assert server.index.counts()["instances"] == 0
            assert list((server.cfg.data / "incoming").iterdir()) == []
    finally:
        bad.shutdown()
        bad.server_close()
