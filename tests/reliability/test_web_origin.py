"""A hostile web page, tried against a real `pacsd serve` in open mode (no users: the loopback
install every workstation starts with).

- Cross-site changes: a page on another site (or on another port of localhost) posts an
  XML-RPC `DBWindowFind ... Delete`, calls the JSON API and the admin routes, uploads STOW-RS:
  each is refused with 403 (Origin, Referer, or a form's content type without either), nothing
  is deleted, one log line says so. The real clients (xmlrpc.client, a same-origin page's
  fetch, a DICOMweb client) still work.
- DNS rebinding: a foreign Host header (the attacker's name, resolving to us) is refused on
  every route, GET and POST, open mode too; `[http] allowed_hosts` adds names, '*' opens it.
- CORS with '*' never comes with credentials; a listed origin may post.
- Log forging: %0A in a path (and a newline in an XML-RPC method name) leaves no forged line.
- The index URL's password (user:password@ and ?password=) never shows in /status, the admin
  API, the log, `pacsd status` or `pacsd config`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xmlrpc.client
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).parent))

from conftest import LOCAL, pacsd_cmd, serve, store_files, write_config  # noqa: E402
from report import record  # noqa: E402

EVIL = "http://evil.example"
CT = Path(get_testdata_file("CT_small.dcm", download=False))
STUDY = str(dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
DELETE_ALL = xmlrpc.client.dumps(({"request": "TRUEPREDICATE", "table": "Study",
                                   "execute": "Delete"},), "DBWindowFind").encode()
XML = {"Content-Type": "text/xml"}


def studies(url: str) -> int:
    r = requests.get(url + "/dicom-web/studies", timeout=10)
    assert r.status_code in (200, 204), r.status_code
    return len(r.json()) if r.status_code == 200 else 0


def open_server(tmp_path: Path, **sections) -> tuple[Path, Path]:
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "data"
    sections.setdefault("log", {"file": str(tmp_path / "pacsd.log"), "level": "INFO"})
    return write_config(tmp_path / "pacsd.toml", data, **sections), data


def test_cross_site_changes_are_refused_and_nothing_is_deleted(tmp_path):
    cfg, data = open_server(tmp_path)
    with serve(cfg, data) as pacs:
        url, port = pacs.http_url, int(pacs.http_url.rsplit(":", 1)[1])
        assert store_files(pacs.port, [CT]) == [0]
        assert studies(url) == 1
        me = f"http://{LOCAL}:{port}"
        other_port = f"http://{LOCAL}:{port + 1}"   # another app on this machine
        attacks = [
            # (method, path, body, headers): what a page on another site can make a browser send
            ("POST", "/RPC2", DELETE_ALL, {**XML, "Origin": EVIL}),
            ("POST", "/", DELETE_ALL, {"Content-Type": "text/plain", "Origin": EVIL}),
            ("POST", "/RPC2", DELETE_ALL, {**XML, "Origin": other_port}),
            ("POST", "/RPC2", DELETE_ALL, {**XML, "Origin": "null"}),   # sandboxed iframe
            ("POST", "/", DELETE_ALL, {"Content-Type": "text/plain",
                                       "Referer": EVIL + "/cats.html"}),
            # Old browsers and privacy modes strip both Origin and Referer: a form's type then
            ("POST", "/RPC2", DELETE_ALL, {"Content-Type": "text/plain"}),
            ("POST", "/RPC2", DELETE_ALL, {"Content-Type": "application/x-www-form-urlencoded"}),
            ("POST", "/", DELETE_ALL, {"Content-Type": "multipart/form-data; boundary=x"}),
            ("POST", "/RPC2", DELETE_ALL, {}),                # a typeless Blob, no-cors fetch
            # The JSON API and the admin routes, even with the CSRF header a preflight allowed
            ("DELETE", f"/api/studies/{STUDY}", None, {"Origin": EVIL,
                                                       "X-Requested-With": "x"}),
            ("POST", "/api/nodes", json.dumps({"name": "evil", "aet": "EVIL", "host": "10.6.6.6",
                                               "port": 104}).encode(),
             {"Origin": other_port, "X-Requested-With": "x", "Content-Type": "application/json"}),
            ("POST", "/api/users", b"name=x&password=yyyyyyyyyy",
             {"Content-Type": "application/x-www-form-urlencoded"}),
            # A de-identified send (the study leaves for a node)
            ("POST", f"/api/studies/{STUDY}/send",
             json.dumps({"node": "evil", "deidentify": True}).encode(),
             {"Origin": EVIL, "X-Requested-With": "x", "Content-Type": "application/json"}),
            ("POST", "/dicom-web/studies", b"--x--",
             {"Origin": EVIL, "Content-Type": 'multipart/related; type="application/dicom"; '
                                              'boundary=x'}),
            ("POST", "/plugins/any/thing", b"x", {"Content-Type": "text/plain"}),
            # The recycle bin and the corrections: emptying, undoing, rewriting images
            ("POST", "/api/trash/empty", b"{}", {"Content-Type": "text/plain"}),
            ("POST", "/api/undo", json.dumps({"uid": STUDY}).encode(),
             {"Origin": EVIL, "X-Requested-With": "x", "Content-Type": "application/json"}),
            ("POST", f"/api/studies/{STUDY}/update",
             json.dumps({"changes": {"StudyDescription": "pwned"}}).encode(),
             {"Referer": EVIL + "/x", "Content-Type": "application/json"}),
            ("POST", "/api/patients/merge", b"from=a&into=b",
             {"Content-Type": "application/x-www-form-urlencoded"}),
            # Who sees what: labels, share links made, revoked, a PIN tried
            ("POST", f"/api/studies/{STUDY}/labels", json.dumps({"add": ["x"]}).encode(),
             {"Origin": EVIL, "X-Requested-With": "x", "Content-Type": "application/json"}),
            ("POST", f"/api/studies/{STUDY}/share", b"hours=1",
             {"Content-Type": "application/x-www-form-urlencoded"}),
            ("POST", f"/api/studies/{STUDY}/share", json.dumps({"hours": 1}).encode(),
             {"Referer": EVIL + "/x", "X-Requested-With": "x",
              "Content-Type": "application/json"}),
            ("POST", "/api/shares/0123456789abcdef/revoke", b"{}", {"Content-Type": "text/plain"}),
            ("POST", "/share/sometoken", json.dumps({"pin": "1234"}).encode(),
             {"Origin": EVIL, "X-Requested-With": "x", "Content-Type": "application/json"}),
            # The browser's upload: a foreign page's, or one without the CSRF header
            ("POST", "/api/upload", b"--x\r\n\r\n" + CT.read_bytes() + b"\r\n--x--\r\n",
             {"Origin": EVIL, "X-Requested-With": "x",
              "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}),
            ("POST", "/api/upload", b"--x\r\n\r\n" + CT.read_bytes() + b"\r\n--x--\r\n",
             {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}),
            ("POST", "/api/upload", b"--x--", {"Content-Type": "multipart/form-data; boundary=x"}),
            # The worklist: an order added, changed, cancelled, its status set
            ("POST", "/api/worklist", b"PatientID=P&Modality=CT&start_date=20261208",
             {"Content-Type": "application/x-www-form-urlencoded"}),
            ("POST", "/api/worklist", json.dumps({"PatientID": "P", "Modality": "CT",
                                                  "ScheduledProcedureStepStartDate": "20261208"}
                                                 ).encode(),
             {"Origin": EVIL, "X-Requested-With": "x", "Content-Type": "application/json"}),
            ("PATCH", "/api/worklist/1", json.dumps({"PatientName": "Pwned"}).encode(),
             {"Referer": EVIL + "/x", "X-Requested-With": "x",
              "Content-Type": "application/json"}),
            ("POST", "/api/worklist/1/cancel", b"{}", {"Content-Type": "text/plain"}),
            ("POST", "/api/worklist/1/status", json.dumps({"status": "COMPLETED"}).encode(),
             {"Origin": other_port, "X-Requested-With": "x", "Content-Type": "application/json"}),
        ]
        for method, path, body, headers in attacks:
            r = requests.request(method, url + path, data=body, headers=headers, timeout=10)
            assert r.status_code == 403, (method, path, headers, r.status_code, r.text[:200])
            assert "deleted" not in r.text
        assert studies(url) == 1, "a cross-site request deleted the study"
        assert requests.get(url + "/api/history", timeout=10).json() == [], \
            "a cross-site request changed the archive"
        nodes = requests.get(url + "/api/nodes", timeout=10).json()
        assert not any(n["name"] == "evil" for n in nodes)
        assert requests.get(url + "/api/labels", timeout=10).json() == []
        assert requests.get(url + "/api/shares", timeout=10).json() == []
        assert requests.get(url + "/api/worklist?day=all", timeout=10).json()["items"] == []

        # The real clients still work: the page's own fetch (same Origin), a Referer from the
        # page, a DICOMweb client (no Origin, its own type), xmlrpc.client (text/xml).
        r = requests.post(url + "/RPC2", timeout=10, headers={**XML, "Origin": me},
                          data=xmlrpc.client.dumps(({},), "Ping").encode())
        assert r.status_code == 200 and "<name>error</name>" in r.text
        r = requests.post(url + "/api/queue/retry", json={"dead": True}, timeout=10, headers={
            "X-Requested-With": "pacsd", "Origin": f"http://localhost:{port}",
            "Host": f"localhost:{port}"})   # the page as opened at http://localhost:PORT
        assert r.status_code == 200, r.text
        r = requests.post(url + "/api/queue/retry", json={"dead": True}, timeout=10, headers={
            "X-Requested-With": "pacsd", "Referer": me + "/app/admin"})
        assert r.status_code == 200, r.text
        rpc = xmlrpc.client.ServerProxy(url + "/RPC2")
        answer = rpc.DBWindowFind({"request": "TRUEPREDICATE", "table": "Study",
                                   "execute": "Delete"})
        assert answer["error"] == "0" and int(answer["deleted"]) == 1
        assert studies(url) == 0
    log = (tmp_path / "pacsd.log").read_text()
    refusals = [line for line in log.splitlines() if "refused: " in line and " from " in line]
    assert len(refusals) == 5, refusals   # 5 a minute per client and kind, then quiet
    assert "HTTP POST /RPC2 from 127.0.0.1 refused: Origin 'http://evil.example'" in log
    record("test_cross_site_changes_are_refused_and_nothing_is_deleted", bad_inputs=len(attacks))


def test_a_foreign_host_is_refused_on_every_route(tmp_path):
    """DNS rebinding: the attacker's name resolves to 127.0.0.1; the browser then sends it as
    Host, and the page is same-origin with pacsd as far as the browser knows."""
    cfg, data = open_server(tmp_path)
    with serve(cfg, data) as pacs:
        url, port = pacs.http_url, int(pacs.http_url.rsplit(":", 1)[1])
        assert store_files(pacs.port, [CT]) == [0]
        rebound = {"Host": f"evil.example:{port}"}
        for method, path, body, headers in [
                ("GET", "/status", None, {}), ("GET", "/app/", None, {}),
                ("GET", "/app/static/common.js", None, {}),
                ("GET", "/api/studies", None, {}), ("GET", "/dicom-web/studies", None, {}),
                ("GET", "/testdbalive", None, {}),
                ("GET", "/api/audit", None, {}),   # the audit trail names patients
                ("GET", "/api/worklist?day=all", None, {}),   # so does the worklist
                ("POST", "/api/worklist", json.dumps({"PatientID": "P", "Modality": "CT",
                                                      "start_date": "20261208"}).encode(),
                 {"X-Requested-With": "x", "Content-Type": "application/json"}),
                ("POST", "/RPC2", DELETE_ALL, {**XML, "Origin": f"http://evil.example:{port}"}),
                ("POST", "/RPC2", DELETE_ALL, XML),
                ("POST", "/api/trash/empty", b"{}", {"Content-Type": "application/json"}),
                ("OPTIONS", "/dicom-web/studies", None, {})]:
            r = requests.request(method, url + path, data=body, timeout=10,
                                 headers={**headers, **rebound}, allow_redirects=False)
            assert r.status_code == 421, (method, path, r.status_code)
            assert "PatientName" not in r.text and "<methodResponse>" not in r.text
        assert studies(url) == 1
        assert requests.get(url + "/api/audit", timeout=10).json()["records"]   # open mode
        # This machine's names and any address are ours, whatever the port.
        import socket
        for host in ("localhost", f"localhost:{port}", LOCAL, f"[::1]:{port}",
                     socket.gethostname(), "10.1.2.3:80"):
            r = requests.get(url + "/status", headers={"Host": host}, timeout=10)
            assert r.status_code == 200, (host, r.status_code)
    log = (tmp_path / "pacsd.log").read_text()
    assert f"refused: Host 'evil.example:{port}' does not name this server" in log

    # Names added by [http] allowed_hosts; '*' restores the old open behaviour.
    cfg, data = open_server(tmp_path / "b", http={"allowed_hosts": ["pacs.example.org",
                                                                     ".hospital.test"]})
    with serve(cfg, data) as pacs:
        for host, code in (("pacs.example.org", 200), ("ct.radiology.hospital.test:443", 200),
                           ("hospital.test", 200), ("evilhospital.test", 421),
                           ("pacs.example.org.evil.example", 421)):
            r = requests.get(pacs.http_url + "/status", headers={"Host": host}, timeout=10)
            assert r.status_code == code, (host, r.status_code)
    cfg, data = open_server(tmp_path / "c", http={"allowed_hosts": ["*"]})
    with serve(cfg, data) as pacs:
        r = requests.get(pacs.http_url + "/status", headers={"Host": "evil.example"}, timeout=10)
        assert r.status_code == 200
    record("test_a_foreign_host_is_refused_on_every_route", bad_inputs=13 + 3)


def test_cors_star_never_comes_with_credentials(tmp_path):
    viewer = "http://viewer.example:3000"
    cfg, data = open_server(tmp_path, http={"cors_origins": ["*", viewer]})
    with serve(cfg, data) as pacs:
        url = pacs.http_url
        r = requests.get(url + "/dicom-web/studies", headers={"Origin": EVIL}, timeout=10)
        assert r.headers.get("Access-Control-Allow-Origin") == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
        r = requests.options(url + "/dicom-web/studies", timeout=10, headers={
            "Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert r.headers.get("Access-Control-Allow-Origin") == "*"
        assert "Access-Control-Allow-Credentials" not in r.headers
        # '*' lets any site read without credentials, not change anything.
        r = requests.post(url + "/RPC2", data=DELETE_ALL, timeout=10,
                          headers={**XML, "Origin": EVIL})
        assert r.status_code == 403
        # A listed origin gets its credentials, and may post (OHIF's STOW-RS).
        r = requests.get(url + "/dicom-web/studies", headers={"Origin": viewer}, timeout=10)
        assert r.headers.get("Access-Control-Allow-Origin") == viewer
        assert r.headers.get("Access-Control-Allow-Credentials") == "true"
        body = (b"--x\r\nContent-Type: application/dicom\r\n\r\n" + CT.read_bytes()
                + b"\r\n--x--\r\n")
        r = requests.post(url + "/dicom-web/studies", data=body, timeout=30, headers={
            "Origin": viewer,
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
        assert r.status_code == 200, r.text[:300]
    record("test_cors_star_never_comes_with_credentials", bad_inputs=3)


FORGED = "2030-01-01 00:00:00 ERROR   pacsd.web: FORGED admin logged in"


def test_control_characters_cannot_forge_log_lines(tmp_path):
    cfg, data = open_server(tmp_path)
    forged = FORGED.replace(" ", "%20")
    with serve(cfg, data) as pacs:
        url = pacs.http_url
        for path in (f"/api/studies/%0A{forged}", f"/dicom-web/studies/1.2%0D%0A{forged}/x",
                     f"/nothing%0A{forged}%0B%1B[2J%C2%85%E2%80%A8{forged}"):
            requests.get(url + path, timeout=10)
            requests.post(url + path, data=b"x", timeout=10, headers={"Origin": EVIL})
            requests.delete(url + path, timeout=10, headers={"X-Requested-With": "x"})
        r = requests.post(url + "/RPC2", headers=XML, timeout=10, data=(
            f"<?xml version='1.0'?><methodCall><methodName>Ping&#10;{FORGED}</methodName>"
            "<params/></methodCall>").encode())
        assert r.status_code == 200
        requests.get(url + "/status", timeout=10)   # a last line, so the log is flushed
    text = (tmp_path / "pacsd.log").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:20])], text[-3000:]
    assert not [line for line in lines if "FORGED" in line
                and not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR|DEBUG)",
                                 line)], text[-3000:]
    assert "\\n2030-01-01" in text   # the refusal was logged, its path escaped
    record("test_control_characters_cannot_forge_log_lines", bad_inputs=10)


def test_the_index_password_never_shows(tmp_path, postgres_url):
    url = postgres_url.replace("postgres@", "postgres:Pw-In-User-1@", 1) \
        + "?password=Pw-In-Query-2&application_name=pacsd"
    secrets = ("Pw-In-User-1", "Pw-In-Query-2")
    cfg, data = open_server(tmp_path, index={"url": url})
    outputs = []
    with serve(cfg, data) as pacs:
        for path in ("/status", "/api/status", "/api/log"):
            r = requests.get(pacs.http_url + path, timeout=10)
            assert r.status_code == 200
            outputs.append(r.text)
        assert "***" in requests.get(pacs.http_url + "/status", timeout=10).json()[
            "index_location"]
        for args in (("status", "--json"), ("status",), ("config", "--check"), ("config",)):
            proc = subprocess.run(pacsd_cmd(*args, "--config", str(cfg)), capture_output=True,
                                  text=True, timeout=60)
            outputs.append(proc.stdout + proc.stderr)
    outputs.append((tmp_path / "pacsd.log").read_text())
    for out in outputs:
        for secret in secrets:
            assert secret not in out, out[-2000:]
    assert any("password=***" in out for out in outputs)


def test_the_osirix_port_is_guarded_like_the_main_port(tmp_path):
    """[http] osirix_port serves the same application on a second listener: a cross-site
    XML-RPC Delete and a foreign Host are refused there too, nothing is deleted, and a slow
    request body is cut with 408 within its deadline."""
    import socket
    import time
    from conftest import free_port
    osirix = free_port()
    cfg, data = open_server(tmp_path, http={"osirix_port": osirix, "body_timeout": 2.0})
    with serve(cfg, data) as srv:
        assert store_files(srv.port, [CT]) == [0]
        url = f"http://{LOCAL}:{osirix}"
        assert studies(url) == 1
        r = requests.post(url + "/RPC2", data=DELETE_ALL, timeout=10,
                          headers={**XML, "Origin": EVIL})
        assert r.status_code == 403, r.text[:200]
        r = requests.post(url + "/RPC2", data=DELETE_ALL, timeout=10,
                          headers={**XML, "Host": f"evil.example:{osirix}"})
        assert r.status_code == 421, r.text[:200]
        assert studies(url) == 1
        # A body a byte at a time: cut with 408 after body_timeout (+ body_min_rate slack).
        with socket.create_connection((LOCAL, osirix), timeout=10) as s:
            s.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
                      b"Content-Length: 100000\r\n\r\n")
            t0, answer = time.monotonic(), b""
            while time.monotonic() - t0 < 15 and not answer:
                try:
                    s.sendall(b"<")
                except OSError:
                    break
                s.settimeout(0.3)
                try:
                    answer = s.recv(200)
                except socket.timeout:
                    pass
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - t0 < 10
        # The real client still works there.
        rpc = xmlrpc.client.ServerProxy(url + "/RPC2")
        assert rpc.DBWindowFind({"request": "TRUEPREDICATE", "table": "Study"})["count"] == 1
    record("test_the_osirix_port_is_guarded_like_the_main_port", bad_inputs=3)
