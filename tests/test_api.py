"""The pages' JSON API against a real server over HTTP: search, paging and sorting, one study,
tags, send, delete, nodes and users from the admin page, sessions and the CSRF guard."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from conftest import LOCAL, store_files
from data import ct_slice, write_series
from pacsd.web.auth import hash_password

H = {"X-Requested-With": "pacsd"}


def wait_job(url: str, job: str, timeout: float = 60, **kw) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = requests.get(f"{url}/api/jobs/{job}", timeout=10, **kw).json()
        if j["state"] not in ("queued", "running"):
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job} still running after {timeout} s")


@pytest.fixture
def many(make_server, tmp_path: Path):
    """30 studies: 3 patients x 10 studies, dates spread over 10 days, CT and MR."""
    server = make_server()
    paths = []
    for p in range(1, 4):
        for st in range(1, 11):
            ds = ct_slice(seed=40, patient=p, study=st, series=1, number=1, size=16)
            ds.StudyDate = f"202401{st:02d}"
            ds.Modality = "MR" if st % 2 else "CT"
            ds.StudyDescription = f"Head {'contrast' if st == 3 else 'plain'} {st}"
            path = tmp_path / f"p{p}s{st}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    assert store_files(server.dicom_port, paths) == [0] * 30
    return server


def studies(server, **params) -> dict:
    r = requests.get(f"{server.http_url}/api/studies", params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_study_list_filters_sorts_and_pages(many):
    everything = studies(many, limit=500)
    assert everything["total"] == 30 and len(everything["studies"]) == 30
    dates = [s["study_date"] for s in everything["studies"]]
    assert dates == sorted(dates, reverse=True)   # newest first by default

    page = studies(many, sort="patient", order="asc", limit=7, offset=7)
    assert page["total"] == 30 and len(page["studies"]) == 7 and page["offset"] == 7
    names = [s["patient_name"] for s in studies(many, sort="patient", limit=500)["studies"]]
    assert names == sorted(names) and page["studies"][0]["patient_name"] == names[7]

    one = studies(many, patient="patient002")   # case-insensitive, part of the name
    assert one["total"] == 10
    assert {s["patient_name"] for s in one["studies"]} == {names[10]}
    assert studies(many, patient_id="PID40-003")["total"] == 10
    assert studies(many, **{"from": "20240103", "to": "2024-01-05"})["total"] == 9
    assert studies(many, modality="CT")["total"] == 15
    assert studies(many, modality="ct", patient="patient001")["total"] == 5
    assert studies(many, description="CONTRAST")["total"] == 3
    assert studies(many, accession="nothing-like-it")["total"] == 0
    r = requests.get(f"{many.http_url}/api/studies", params={"from": "last week"}, timeout=10)
    assert r.status_code == 400 and "date" in r.json()["error"]
    r = requests.get(f"{many.http_url}/api/studies", params={"sort": "id; drop"}, timeout=10)
    assert r.status_code == 400


def test_one_study_and_its_tags(make_server, tmp_path):
    server = make_server()
    files = write_series(tmp_path / "in", seed=41, series=2, images=3, size=16)
    store_files(server.dicom_port, files)
    uid = str(dcmread(files[0]).StudyInstanceUID)
    study = requests.get(f"{server.http_url}/api/studies/{uid}", timeout=10).json()
    assert study["study_uid"] == uid and [s["number"] for s in study["series"]] == [1, 2]
    first = dcmread(files[0])
    assert study["series"][0]["first_sop"] == str(first.SOPInstanceUID)
    assert study["series"][0]["instances"] == 3

    tags = requests.get(f"{server.http_url}/api/instances/{first.SOPInstanceUID}/tags",
                        timeout=10).json()
    by_keyword = {t["keyword"]: t for t in tags}
    assert by_keyword["PatientName"]["value"] == str(first.PatientName)
    assert by_keyword["PatientName"]["name"] == "Patient's Name"
    assert by_keyword["TransferSyntaxUID"]["tag"] == "(0002,0010)"
    assert "PixelData" not in by_keyword   # the header only
    assert requests.get(f"{server.http_url}/api/studies/1.2.3.4", timeout=10).status_code == 404
    assert requests.get(f"{server.http_url}/api/studies/..%2F..%2Fetc",
                        timeout=10).status_code == 400


def test_csrf_guard_and_sessions(make_server, tmp_path):
    server = make_server(users=[
        {"name": "boss", "password_hash": hash_password("boss-password"), "admin": True},
        {"name": "reader", "password_hash": hash_password("reader-password")}])
    url = server.http_url
    # Pages go to the login page, the API answers 401 without a Basic pop-up.
    r = requests.get(f"{url}/app/admin", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == "login?next=/app/admin"
    r = requests.get(f"{url}/api/studies", timeout=10)
    assert r.status_code == 401 and "WWW-Authenticate" not in r.headers
    assert requests.get(f"{url}/app/static/common.js", timeout=10).status_code == 200
    assert requests.get(f"{url}/app/login", timeout=10).status_code == 200

    reader = requests.Session()
    assert reader.post(f"{url}/app/login", json={"name": "reader", "password": "nope"},
                       timeout=10).status_code == 401
    r = reader.post(f"{url}/app/login", json={"name": "reader", "password": "reader-password"},
                    timeout=10)
    assert r.status_code == 200 and "HttpOnly" in r.headers["Set-Cookie"]
    assert reader.get(f"{url}/api/me", timeout=10).json() == {
        "user": "reader", "admin": False, "auth": True, "shared": False, "restricted": False,
        "share": False}
    assert reader.get(f"{url}/api/users", timeout=10).status_code == 403
    # Without the header a change is refused even with a good session (CSRF).
    assert reader.post(f"{url}/api/nodes", json={}, timeout=10).status_code == 403
    # The cookie also opens DICOMweb (the viewer's images).
    assert reader.get(f"{url}/dicom-web/studies", timeout=10).status_code in (200, 204)
    # A forged cookie is nobody.
    forged = requests.Session()
    forged.cookies.set("pacsd_session", reader.cookies["pacsd_session"][:-3] + "AAA")
    assert forged.get(f"{url}/api/me", timeout=10).status_code == 401

    boss = requests.Session()
    boss.auth = ("boss", "boss-password")   # Basic works as before
    r = boss.post(f"{url}/api/users", json={"name": "night", "password": "night-shift",
                                            "admin": False}, headers=H, timeout=10)
    assert r.status_code == 201, r.text
    assert boss.post(f"{url}/api/users", json={"name": "short", "password": "x"}, headers=H,
                     timeout=10).status_code == 400
    assert boss.put(f"{url}/api/users/reader", json={"admin": True}, headers=H,
                    timeout=10).status_code == 409   # from the config file: read-only
    night = requests.Session()
    assert night.post(f"{url}/app/login", json={"name": "night", "password": "night-shift"},
                      timeout=10).status_code == 200
    assert night.get(f"{url}/api/me", timeout=10).json()["user"] == "night"
    # A new password ends the old sessions.
    assert boss.put(f"{url}/api/users/night", json={"password": "new-password"}, headers=H,
                    timeout=10).status_code == 200
    assert night.get(f"{url}/api/me", timeout=10).status_code == 401
    assert boss.delete(f"{url}/api/users/night", headers=H, timeout=10).status_code == 200
    names = {u["name"]: u["source"] for u in boss.get(f"{url}/api/users", timeout=10).json()}
    assert names == {"boss": "config", "reader": "config"}
    assert night.post(f"{url}/app/login", json={"name": "night", "password": "new-password"},
                      timeout=10).status_code == 401


def test_nodes_from_the_admin_page_persist_and_serve_c_move(make_server, tmp_path):
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts
    received: list[str] = []
    scp = AE(ae_title="WS")
    scp.supported_contexts = AllStoragePresentationContexts
    scp.add_supported_context("1.2.840.10008.1.1")   # Verification
    listener = scp.start_server((LOCAL, 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda e: received.append(str(e.request.AffectedSOPInstanceUID))
         or 0x0000)])
    try:
        data = tmp_path / "pacsd"
        server = make_server(data=data, nodes=[{"name": "cfg", "aet": "CFG", "host": LOCAL,
                                                "port": 104}])
        url = server.http_url
        files = write_series(tmp_path / "in", seed=42, images=4, size=16)
        store_files(server.dicom_port, files)
        node = {"name": "ws", "aet": "WS", "host": LOCAL,
                "port": listener.server_address[1]}
        assert requests.post(f"{url}/api/nodes", json=node, timeout=10).status_code == 403
        assert requests.post(f"{url}/api/nodes", json=node, headers=H,
                             timeout=10).status_code == 201
        assert requests.post(f"{url}/api/nodes", json=node, headers=H,
                             timeout=10).status_code == 409
        assert requests.post(f"{url}/api/nodes", json={**node, "name": "x", "aet": "BAD\\AE"},
                             headers=H, timeout=10).status_code == 400
        assert requests.put(f"{url}/api/nodes/cfg", json=node, headers=H,
                            timeout=10).status_code == 409
        echo = requests.post(f"{url}/api/nodes/ws/echo", headers=H, timeout=30).json()
        assert echo["ok"] is True and echo["ms"] > 0

        uid = str(dcmread(files[0]).StudyInstanceUID)
        r = requests.post(f"{url}/api/studies/{uid}/send", json={"node": "ws"}, headers=H,
                          timeout=10)
        assert r.status_code == 202
        job = wait_job(url, r.json()["job"])
        assert (job["state"], job["done"], job["total"]) == ("done", 4, 4), job
        assert sorted(received) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)

        # A C-MOVE to the node added on the page works at once, without a restart.
        from conftest import associate
        from pydicom.dataset import Dataset
        from pynetdicom import build_context
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
        received.clear()
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", uid
        with associate(server.dicom_port, [build_context(MOVE)]) as assoc:
            final = list(assoc.send_c_move(q, "WS", MOVE))[-1][0]
        assert final.Status == 0 and len(received) == 4
        server.stop()

        # Kept in the index: a restarted server still knows the node.
        # (Without the test clients as nodes: the list below is the admin page's nodes only.)
        again = make_server(data=data, qr_clients=False)
        nodes = requests.get(f"{again.http_url}/api/nodes", timeout=10).json()
        assert [(n["name"], n["source"]) for n in nodes] == [("ws", "admin")]
        assert requests.delete(f"{again.http_url}/api/nodes/ws", headers=H,
                               timeout=10).status_code == 200
        assert requests.get(f"{again.http_url}/api/nodes", timeout=10).json() == []
    finally:
        listener.shutdown()


def test_delete_is_for_administrators_and_is_logged(make_server, tmp_path, caplog):
    server = make_server(users=[
        {"name": "boss", "password_hash": hash_password("boss-password"), "admin": True},
        {"name": "reader", "password_hash": hash_password("reader-password")}])
    files = write_series(tmp_path / "in", seed=43, series=2, images=2, size=16)
    store_files(server.dicom_port, files)
    series = str(dcmread(files[0]).SeriesInstanceUID)
    url = server.http_url
    r = requests.delete(f"{url}/api/series/{series}", headers=H,
                        auth=("reader", "reader-password"), timeout=10)
    assert r.status_code == 403
    r = requests.delete(f"{url}/api/series/{series}", headers=H, auth=("boss", "boss-password"),
                        timeout=10)
    assert r.status_code == 200 and r.json() == {"deleted": 2}
    assert requests.delete(f"{url}/api/series/{series}", headers=H,
                           auth=("boss", "boss-password"), timeout=10).status_code == 404
    # Logged (the log file's audit line), but no "recent error" for the admin page: nothing
    # to act on there (issue 19, point 11).
    assert any("deleted (2 instances) by boss" in r.getMessage() for r in caplog.records)
    log = requests.get(f"{url}/api/log", auth=("boss", "boss-password"), timeout=10).json()
    assert not any("deleted (2 instances)" in e["message"] for e in log), log
    assert requests.get(f"{url}/api/log", auth=("reader", "reader-password"),
                        timeout=10).status_code == 403
    status = requests.get(f"{url}/api/status", auth=("reader", "reader-password"),
                          timeout=10).json()
    assert status["instances"] == 2 and status["stored_today"] == 2   # received today, kept
    assert status["disk_free_bytes"] > 0 and status["index_bytes"] > 0


def test_zip_of_a_study_streams_the_stored_files_under_a_dicomdir(make_server, tmp_path):
    import io
    import zipfile
    from pydicom.fileset import FileSet
    server = make_server()
    files = write_series(tmp_path / "in", seed=44, series=2, images=3, size=16)
    store_files(server.dicom_port, files)
    uid = str(dcmread(files[0]).StudyInstanceUID)
    r = requests.get(f"{server.http_url}/api/studies/{uid}/zip", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/zip"
    assert r.headers["Content-Disposition"].startswith('attachment; filename="PID44-001-')
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert z.testzip() is None
    members = {n: z.read(n) for n in z.namelist()}
    assert set(members.pop("DICOMDIR")[128:132]) == set(b"DICM")
    stored = [p.read_bytes() for p in server.cfg.storage_path.rglob("*.dcm")
              if ".tmp" not in p.parts]
    assert sorted(members.values()) == sorted(stored)   # the stored files, unchanged
    (tmp_path / "out").mkdir()
    z.extractall(tmp_path / "out")
    fs = FileSet(dcmread(tmp_path / "out" / "DICOMDIR"))
    assert len(fs) == 6 and len(fs.find(SeriesInstanceUID=str(dcmread(files[0])
                                                                .SeriesInstanceUID))) == 3
    series = str(dcmread(files[-1]).SeriesInstanceUID)
    flat = requests.get(f"{server.http_url}/api/series/{series}/zip?dicomdir=0", timeout=30)
    assert sorted(zipfile.ZipFile(io.BytesIO(flat.content)).namelist()) == [
        "DICOM/IM000000", "DICOM/IM000001", "DICOM/IM000002"]


def test_pages_and_their_files_and_nothing_else(server):
    """The pages are served from the package with a CSP; paths out of static/ are refused."""
    import socket
    url = server.http_url
    r = requests.get(f"{url}/", timeout=10)
    assert r.url.endswith("/app/") and "text/html" in r.headers["Content-Type"]
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    for name in ("viewer", "qr", "admin", "login"):
        assert requests.get(f"{url}/app/{name}", timeout=10).status_code == 200, name
    assert requests.get(f"{url}/app/static/common.js", timeout=10).status_code == 200
    host, port = url.split("//")[1].split(":")
    for path in ("/app/static/../../errors.py", "/app/static/%2e%2e/%2e%2e/errors.py",
                 "/app/static/..%2f..%2ferrors.py", "/app/../pacsd.json", "/app/nothing"):
        with socket.create_connection((host, int(port)), timeout=10) as c:   # sent verbatim
            c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            status = c.recv(64).split(b"\r\n")[0]
        assert status.split()[1] in (b"400", b"403", b"404"), (path, status)


def test_password_guessing_is_throttled(make_server):
    server = make_server(users=[{"name": "boss", "password_hash": hash_password("boss-password"),
                                 "admin": True}])
    url = f"{server.http_url}/app/login"
    codes = [requests.post(url, json={"name": "boss", "password": f"guess{i}"},
                           timeout=30).status_code for i in range(11)]
    assert codes == [401] * 10 + [429]
    # Even the right password waits now: the address is blocked for the window.
    r = requests.post(url, json={"name": "boss", "password": "boss-password"}, timeout=30)
    assert r.status_code == 429 and r.headers["Retry-After"] == "900"


def test_recent_errors_include_those_of_the_previous_run(tmp_path):
    """After a restart the admin page still shows why: the log file's tail is read at start."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_context
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    from conftest import associate, serve, write_config
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "pacsd.toml", data, log={"file": str(tmp_path / "pacsd.log")})
    with serve(cfg, data) as p:
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", "1.2.3"
        with associate(p.port, [build_context(MOVE)]) as assoc:
            final = list(assoc.send_c_move(q, "NOWHERE", MOVE))[-1][0]
        assert final.Status == 0xA801
    with serve(cfg, data) as p:
        log = requests.get(f"{p.http_url}/api/log", timeout=10).json()
        moved = [e for e in log if "unknown destination 'NOWHERE'" in e["message"]]
        assert len(moved) == 1 and moved[0]["level"] == "WARNING", log
        assert moved[0]["logger"] == "pacsd.dimse.retrieve" and moved[0]["time"] < time.time()


def test_a_node_s_wado_url_on_the_admin_api(make_server, tmp_path):
    """An admin-page node may have a WADO-URI address (XML-RPC Retrieve, retrieveMode 2), on
    its own host only: a wado_url elsewhere is refused with 400 and nothing saved."""
    data = tmp_path / "pacsd"
    server = make_server(data=data, qr_clients=False)
    url = server.http_url
    node = {"name": "ws", "aet": "WS", "host": LOCAL, "port": 104,
            "wado_url": f"http://{LOCAL}:8080/wado"}
    for wado_url in ("http://192.0.2.1:8080/wado", "http://localhost:8080/wado",
                     f"file://{LOCAL}/etc/passwd", f"http://{LOCAL}/wado?x=1"):
        r = requests.post(f"{url}/api/nodes", json={**node, "wado_url": wado_url}, headers=H,
                          timeout=10)
        assert r.status_code == 400 and "wado_url" in r.text, (wado_url, r.text)
    r = requests.post(f"{url}/api/nodes", json={**node, "wado_url": "http://192.0.2.1/wado"},
                      headers=H, timeout=10)
    assert "is not the node's host" in r.text
    assert requests.get(f"{url}/api/nodes", timeout=10).json() == []
    r = requests.post(f"{url}/api/nodes", json=node, headers=H, timeout=10)
    assert r.status_code == 201 and r.json()["wado_url"] == node["wado_url"]
    # A change that does not mention it keeps it, checked against the (new) host.
    change = {"name": "ws", "aet": "WS", "host": LOCAL, "port": 105}
    r = requests.put(f"{url}/api/nodes/ws", json=change, headers=H, timeout=10)
    assert r.status_code == 200 and r.json()["wado_url"] == node["wado_url"]
    r = requests.put(f"{url}/api/nodes/ws", json={**change, "host": "localhost"}, headers=H,
                     timeout=10)
    assert r.status_code == 400 and "is not the node's host" in r.text
    server.stop()
    # Kept in the index.
    again = make_server(data=data, qr_clients=False)
    assert requests.get(f"{again.http_url}/api/nodes", timeout=10).json() == [
        {"name": "ws", "aet": "WS", "host": LOCAL, "port": 105, "source": "admin",
         "wado_url": node["wado_url"]}]
    assert again.runtime.accounts.node("ws").wado_url == node["wado_url"]
