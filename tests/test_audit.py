"""The audit trail (pacsd.audit): a record for each access and change, over HTTP, DICOM and the
command line, read back with `pacsd audit --json` and GET /api/audit; the files rotated by size
and removed past their retention; syslog over UDP, TCP and TLS; a dead collector blocks
nothing."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from conftest import LOCAL, associate, c_find, c_get, free_port, pacsd_cmd, store_files, \
    wait_for, write_config
from data import write_series
from pacsd.audit import AuditRecord, Auditor, Search, search
from pacsd.config import AuditSettings
from pacsd.web.auth import hash_password

H = {"X-Requested-With": "pacsd"}
BOSS = ("boss", "boss-secret")
READER = ("reader", "reader-secret")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A server with an administrator and a reader, a workstation node WS (a pynetdicom SCP
    that keeps what it receives), only known calling AE titles allowed; one study stored."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("audit")
    received: list[str] = []
    scp = AE(ae_title="WS")
    scp.supported_contexts = AllStoragePresentationContexts
    listener = scp.start_server((LOCAL, 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda e: received.append(str(e.request.AffectedSOPInstanceUID))
         or 0x0000)])
    users = [{"name": BOSS[0], "password_hash": hash_password(BOSS[1]), "admin": True},
             {"name": READER[0], "password_hash": hash_password(READER[1]), "admin": False}]
    nodes = [{"name": "ws", "aet": "WS", "host": LOCAL, "port": listener.server_address[1]}]
    # Its syslog collector is down for good: nothing of the below may wait for it.
    cfg_file = write_config(tmp / "c.toml", tmp / "data", nodes=nodes, users=users,
                            dicom={"workers": 1, "allowed_calling_aets": [
                                "PYNETDICOM", "FINDSCU", "GETSCU", "MOVESCU"]},
                            audit={"syslog": f"{LOCAL}:{free_port()}", "syslog_protocol": "tcp"})
    server = Server(config.load(cfg_file, env={})).start()
    server.cfg_file = cfg_file
    server.received = received
    server.files = write_series(tmp / "in", seed=71, images=4, size=16)
    server.study = str(dcmread(server.files[0]).StudyInstanceUID)
    server.patient = str(dcmread(server.files[0]).PatientID)
    assert store_files(server.dicom_port, server.files) == [0] * 4
    try:
        yield server
    finally:
        server.stop()
        listener.shutdown()


def api(pacs, who=BOSS, **params) -> list[dict]:
    r = requests.get(f"{pacs.http_url}/api/audit", params=params, auth=who, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["records"]


def found(pacs, what: str, **params) -> list[dict]:
    """The records matching `params`, once there is one (the writer takes milliseconds)."""
    return wait_for(lambda: api(pacs, **params), 10, what)


def cli(pacs, *args: str) -> list[dict]:
    out = subprocess.run(pacsd_cmd("audit", "--config", str(pacs.cfg_file), "--json", *args),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


# --- DICOM ------------------------------------------------------------------------------------

def test_c_store_is_one_record_per_association_and_study(pacs, tmp_path):
    recs = found(pacs, "the C-STORE record", action="store", study=pacs.study)
    assert len(recs) == 1
    r = recs[0]
    assert (r["via"], r["user"], r["address"], r["count"], r["outcome"]) == (
        "dicom", "PYNETDICOM", LOCAL, 4, "ok")
    assert r["patients"] == [{"id": pacs.patient, "name": "Test^Patient001"}]
    assert r["event"] == "110104"
    # Two studies over one association: two records, each with its own count.
    files = write_series(tmp_path / "two", seed=72, studies=2, images=3, size=16)
    assert store_files(pacs.dicom_port, files) == [0] * 6
    studies = sorted({str(dcmread(f).StudyInstanceUID) for f in files})
    for uid in studies:
        recs = found(pacs, f"the C-STORE record of {uid}", action="store", study=uid)
        assert [(x["count"], x["studies"]) for x in recs] == [(3, [uid])]
    # And `pacsd audit` says the same.
    assert [x["count"] for x in cli(pacs, "--study", studies[0], "--action", "store")] == [3]


def test_c_find_c_get_c_move_and_a_rejected_association(pacs):
    from pynetdicom import AE
    status, matches = c_find(pacs.dicom_port, "STUDY", PatientID=pacs.patient,
                             StudyInstanceUID="")
    assert status == 0 and len(matches) == 1
    recs = found(pacs, "the C-FIND record", action="query", user="PYNETDICOM")
    assert recs[0]["via"] == "dicom" and f"PatientID={pacs.patient}" in recs[0]["detail"]
    assert recs[0]["count"] == 1 and recs[0]["patients"][0]["id"] == pacs.patient

    sop_class = str(dcmread(pacs.files[0]).SOPClassUID)
    ts = str(dcmread(pacs.files[0]).file_meta.TransferSyntaxUID)
    status, got = c_get(pacs.dicom_port, {"QueryRetrieveLevel": "STUDY",
                                          "StudyInstanceUID": pacs.study}, sop_class, ts)
    assert status == 0 and len(got) == 4
    recs = found(pacs, "the C-GET record", action="retrieve", study=pacs.study)
    assert (recs[0]["count"], recs[0]["outcome"], recs[0]["event"]) == (4, "ok", "110104")

    from pydicom.dataset import Dataset
    from pynetdicom import build_context
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", pacs.study
    with associate(pacs.dicom_port, [build_context(MOVE)]) as assoc:
        assert list(assoc.send_c_move(q, "WS", MOVE))[-1][0].Status == 0
    recs = found(pacs, "the C-MOVE record", action="send", study=pacs.study, user="PYNETDICOM")
    assert recs[0]["count"] == 4 and recs[0]["detail"].startswith("to WS")

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOCAL, pacs.dicom_port, ae_title="PACSD")
    assert assoc.is_rejected
    ae.shutdown()
    recs = found(pacs, "the rejected association", action="login", user="INTRUDER")
    assert (recs[0]["outcome"], recs[0]["via"], recs[0]["event"]) == ("refused", "dicom",
                                                                       "110114")


# --- HTTP -------------------------------------------------------------------------------------

def test_logins_ok_and_failed(pacs):
    url = pacs.http_url
    assert requests.post(f"{url}/app/login", json={"name": "reader", "password": "nope"},
                         timeout=10).status_code == 401
    session = requests.Session()
    assert session.post(f"{url}/app/login", json={"name": "reader", "password": READER[1]},
                        timeout=10).status_code == 200
    assert session.post(f"{url}/app/logout", headers=H, timeout=10).status_code == 200
    assert found(pacs, "the logout", action="logout", user="reader")[0]["event"] == "110114"
    recs = found(pacs, "two logins", action="login", user="reader")
    recs = wait_for(lambda: len(api(pacs, action="login", user="reader")) >= 2
                    and api(pacs, action="login", user="reader"), 10, "both logins")
    assert [r["outcome"] for r in recs[:2]] == ["ok", "refused"]
    assert recs[0]["via"] == "http" and recs[0]["address"] == LOCAL
    # HTTP Basic: a wrong password is a failed login too.
    assert requests.get(f"{url}/api/studies", auth=("boss", "wrong"),
                        timeout=10).status_code == 401
    recs = found(pacs, "the failed Basic login", action="login", user="boss")
    assert any(r["outcome"] == "refused" and r["detail"] == "HTTP Basic" for r in recs)


def test_query_view_download_send_store(pacs, tmp_path):
    url, study = pacs.http_url, pacs.study
    s = requests.Session()
    s.auth = READER
    assert s.get(f"{url}/dicom-web/studies", params={"PatientID": pacs.patient},
                 timeout=10).status_code == 200
    recs = found(pacs, "the QIDO record", action="query", user="reader")
    assert recs[0]["patients"][0]["id"] == pacs.patient and "PatientID" in recs[0]["detail"]

    # XML-RPC, by method.
    import xmlrpc.client
    host = url.split("//", 1)[1]
    rpc = xmlrpc.client.ServerProxy(f"http://{BOSS[0]}:{BOSS[1]}@{host}/RPC2")
    answer = rpc.DBWindowFind({"request": f"patientID == '{pacs.patient}'", "table": "Study",
                               "execute": "Select"})
    assert answer["count"] == 1
    recs = found(pacs, "the XML-RPC query", action="query", user="boss")
    assert recs[0]["detail"] == "XML-RPC DBWindowFind" and recs[0]["outcome"] == "ok"

    # A viewer's many requests: one view record.
    series = str(dcmread(pacs.files[0]).SeriesInstanceUID)
    for f in pacs.files:
        sop = str(dcmread(f).SOPInstanceUID)
        assert s.get(f"{url}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
                     "/frames/1", headers={"Accept": "multipart/related; "
                                           "type=application/octet-stream"},
                     timeout=10).status_code == 200
    assert s.get(f"{url}/dicom-web/studies/{study}/metadata", timeout=10).status_code == 200
    recs = found(pacs, "the view record", action="view", study=study, user="reader")
    time.sleep(0.2)   # let any stray extra record arrive before counting
    recs = api(pacs, action="view", study=study, user="reader")
    assert len(recs) == 1 and recs[0]["patients"][0]["id"] == pacs.patient
    assert recs[0]["event"] == "110103"

    z = s.get(f"{url}/api/studies/{study}/zip", timeout=30)
    assert z.status_code == 200 and z.content[:2] == b"PK"
    recs = found(pacs, "the download record", action="download", study=study)
    assert recs[0]["user"] == "reader" and recs[0]["event"] == "110106"

    boss = requests.Session()
    boss.auth = BOSS
    r = boss.post(f"{url}/api/studies/{study}/send", json={"node": "ws"}, headers=H, timeout=10)
    assert r.status_code == 202
    recs = found(pacs, "the send record", action="send", user="boss")
    assert recs[0]["studies"] == [study] and "ws" in recs[0]["detail"]

    # STOW-RS: one record with the studies stored and the count.
    f = write_series(tmp_path / "stow", seed=73, images=1, size=16)[0]
    body = (b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
            + b"\r\n--XX--\r\n")
    r = boss.post(f"{url}/dicom-web/studies", data=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX', **H},
        timeout=30)
    assert r.status_code == 200, r.text
    stowed = str(dcmread(f).StudyInstanceUID)
    recs = found(pacs, "the STOW record", action="store", study=stowed)
    assert (recs[0]["via"], recs[0]["user"], recs[0]["count"]) == ("http", "boss", 1)

    # The pages' upload (a CD dropped on the study list): the same, one record per request.
    f = write_series(tmp_path / "upload", seed=74, images=1, size=16)[0]
    body = (b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
            + b"\r\n--XX--\r\n")
    r = s.post(f"{url}/api/upload", data=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX', **H},
        timeout=30)
    assert r.status_code == 200 and r.json()["stored"] == 1, r.text
    uploaded = str(dcmread(f).StudyInstanceUID)
    recs = found(pacs, "the upload record", action="store", study=uploaded)
    assert (recs[0]["via"], recs[0]["user"], recs[0]["count"]) == ("http", "reader", 1)


def test_correction_delete_restore_over_http_and_the_command_line(pacs, tmp_path):
    url = pacs.http_url
    files = write_series(tmp_path / "c", seed=74, images=2, size=16)
    assert store_files(pacs.dicom_port, files) == [0, 0]
    study = str(dcmread(files[0]).StudyInstanceUID)
    pid = str(dcmread(files[0]).PatientID)
    boss = requests.Session()
    boss.auth = BOSS
    r = boss.post(f"{url}/api/studies/{study}/update",
                  json={"changes": {"StudyDescription": "FIXED"}}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    recs = found(pacs, "the correction", action="correction", study=study)
    assert recs[0]["user"] == "boss" and "StudyDescription" in recs[0]["detail"]
    assert recs[0]["patients"][0]["id"] == pid

    assert boss.delete(f"{url}/api/studies/{study}", headers=H, timeout=30).status_code == 200
    recs = found(pacs, "the deletion", action="delete", study=study)
    assert (recs[0]["event"], recs[0]["patients"][0]["id"]) == ("110105", pid)
    r = boss.post(f"{url}/api/trash/restore", json={"uid": study}, headers=H, timeout=30)
    assert r.status_code == 200, r.text
    recs = found(pacs, "the restore", action="restore", study=study)
    assert recs[0]["outcome"] == "ok"

    # From the command line: the person running it, via cli.
    subprocess.run(pacsd_cmd("study", "update", study, "--description", "AGAIN", "--config",
                             str(pacs.cfg_file)), check=True, capture_output=True, timeout=60)
    recs = [r for r in cli(pacs, "--study", study, "--action", "correction")
            if r["via"] == "cli"]
    assert len(recs) == 1 and recs[0]["patients"][0]["id"] == pid
    assert recs[0]["source"].endswith("/cli")
    # `pacsd import`: one record for the command, with its studies and count.
    more = write_series(tmp_path / "imp", seed=75, images=2, size=16)
    subprocess.run(pacsd_cmd("import", str(tmp_path / "imp"), "--config", str(pacs.cfg_file)),
                   check=True, capture_output=True, timeout=60)
    imported = str(dcmread(more[0]).StudyInstanceUID)
    recs = cli(pacs, "--action", "import", "--study", imported)
    assert [(r["via"], r["count"], r["patients"][0]["id"]) for r in recs] == [
        ("cli", 2, str(dcmread(more[0]).PatientID))]
    # A non-administrator may not read the trail.
    assert requests.get(f"{url}/api/audit", auth=READER, timeout=10).status_code == 403
    # Reading it is itself recorded (Audit Log Used).
    assert found(pacs, "the audit log use", action="audit")[0]["event"] == "110101"


# --- the files ------------------------------------------------------------------------------

def settings(**kw) -> AuditSettings:
    return AuditSettings(**kw)


def test_rotation_by_size_and_retention(tmp_path):
    folder = tmp_path / "audit"
    folder.mkdir()
    old = folder / "server-20200101T000000-1.jsonl"
    old.write_text('{"t": 1577836800, "action": "login"}\n')
    os.utime(old, (time.time() - 10 * 86400,) * 2)
    kept = folder / "server-20991231T000000-1.jsonl"
    kept.write_text("")
    a = Auditor(settings(rotate_mb=1, keep_days=5), tmp_path, "server")
    for i in range(900):   # three batches of ~400 KB: the third one begins a new file
        a.record(AuditRecord("view", user=f"u{i}", studies=["1.2.3"], detail="x" * 1000))
        if i % 300 == 299:
            assert a.flush()
    a.close()
    assert not old.exists() and kept.exists()   # past keep_days: removed
    rotated = [p for p in folder.glob("server-*.jsonl") if p != kept]
    assert len(rotated) == 1 and rotated[0].stat().st_size <= 1_000_000
    assert (folder / "server.jsonl").stat().st_size > 0
    got = search(folder, Search(limit=10_000))
    assert len(got) == 900 and got[0]["user"] == "u899"   # newest first, none lost
    assert [r["user"] for r in search(folder, Search(user="u5"))] == ["u5"]


def test_a_line_cut_by_a_kill_is_skipped_and_disabled_writes_nothing(tmp_path):
    folder = tmp_path / "audit"
    folder.mkdir()
    (folder / "cli.jsonl").write_text('{"t": 5, "action": "login", "user": "a"}\n{"t": 6, "ac')
    assert [r["user"] for r in search(folder, Search())] == ["a"]
    off = Auditor(settings(enabled=False), tmp_path / "off", "server")
    off.record(AuditRecord("login"))
    off.close()
    assert not (tmp_path / "off").exists()


def test_what_was_flushed_survives_kill_9(tmp_path):
    """A process killed while recording: everything it had flushed is there, lines whole."""
    import sys
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pacsd.audit import AuditRecord, Auditor\n"
        "from pacsd.config import AuditSettings\n"
        "a = Auditor(AuditSettings(), Path(sys.argv[1]), 'dicom1')\n"
        "for i in range(2000):\n"
        "    a.record(AuditRecord('store', user=f'u{i}', studies=['1.2.3'], count=i))\n"
        "    if i == 999:\n"
        "        assert a.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    got = search(tmp_path / "audit", Search(limit=5000))
    users = {r["user"] for r in got}
    assert {f"u{i}" for i in range(1000)} <= users and len(users) == len(got)


# --- syslog -------------------------------------------------------------------------------------

HEADER = re.compile(rb"<(\d+)>1 (\S+) (\S+) pacsd (\d+) IHE\+RFC-3881 - \xef\xbb\xbf(.*)\Z",
                    re.S)


def check_message(msg: bytes, user: str) -> None:
    from xml.etree import ElementTree
    m = HEADER.match(msg)
    assert m, msg[:200]
    assert m[1] == b"85"   # authpriv.notice: a success
    root = ElementTree.fromstring(m[5])
    assert root.tag == "AuditMessage"
    ev = root.find("EventIdentification")
    assert ev.get("EventActionCode") == "R" and ev.get("EventOutcomeIndicator") == "0"
    assert ev.find("EventID").get("csd-code") == "110103"
    assert root.find("ActiveParticipant").get("UserID") == user
    ids = {p.find("ParticipantObjectIDTypeCode").get("csd-code"): p.get("ParticipantObjectID")
           for p in root.findall("ParticipantObjectIdentification")}
    assert ids == {"2": "PID1", "110180": "1.2.3"}
    assert root.find("ParticipantObjectIdentification/ParticipantObjectName").text == \
        "Doe & <Sons>^J"


def framed(conn) -> bytes:
    """One octet-counted message (RFC 5425 4.3) from a stream."""
    head = b""
    while not head.endswith(b" "):
        head += conn.recv(1)
        assert head and len(head) < 12, head
    n = int(head)
    body = b""
    while len(body) < n:
        chunk = conn.recv(n - len(body))
        assert chunk
        body += chunk
    return body


def record(user: str) -> AuditRecord:
    return AuditRecord("view", user=user, address="10.0.0.9", studies=["1.2.3"],
                       patients=[("PID1", "Doe & <Sons>^J")])


def test_syslog_over_udp(tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    sock.settimeout(10)
    a = Auditor(settings(syslog=f"{LOCAL}:{sock.getsockname()[1]}", syslog_protocol="udp"),
                tmp_path, "server")
    a.record(record("udp-user"))
    msg = sock.recv(65535)
    a.close()
    sock.close()
    check_message(msg, "udp-user")


@pytest.mark.parametrize("tls", [False, True])
def test_syslog_over_tcp_and_tls(tmp_path, tls):
    context = None
    if tls:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", f"subjectAltName=IP:{LOCAL}",
                        "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
                       check=True, capture_output=True, timeout=60)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server = socket.create_server((LOCAL, 0))
    server.settimeout(10)
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = server.accept()
        if context is not None:
            conn = context.wrap_socket(conn, server_side=True)
        conn.settimeout(10)
        got.extend([framed(conn), framed(conn)])
        conn.close()
    t = threading.Thread(target=accept)
    t.start()
    a = Auditor(settings(syslog=f"{LOCAL}:{server.getsockname()[1]}",
                         syslog_protocol="tls" if tls else "tcp",
                         syslog_ca=str(tmp_path / "c.pem") if tls else ""), tmp_path, "server")
    a.record(record("first"))
    a.record(record("second"))
    t.join(20)
    a.close()
    server.close()
    assert len(got) == 2
    check_message(got[0], "first")
    check_message(got[1], "second")


def test_a_dead_syslog_collector_blocks_nothing(tmp_path, caplog):
    port = free_port()   # nothing listens there
    caplog.set_level(logging.WARNING, logger="pacsd.audit")
    a = Auditor(settings(syslog=f"{LOCAL}:{port}", syslog_protocol="tcp"), tmp_path, "dicom1")
    started = time.monotonic()
    for i in range(3000):   # more than the sender keeps
        a.record(record(f"u{i}"))
    assert time.monotonic() - started < 2.0
    assert a.flush(10)   # the files are written all the same
    assert len(search(tmp_path / "audit", Search(limit=5000))) == 3000
    wait_for(lambda: "unreachable" in caplog.text, 10, "the one line saying so")
    assert caplog.text.count("unreachable") == 1
    assert a.syslog is not None and len(a.syslog._pending) <= 1000
    started = time.monotonic()
    a.close()
    assert time.monotonic() - started < 5.0


# --- the admin page ---------------------------------------------------------------------------

def test_the_admin_page_searches_the_trail(pacs, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(cond, message: str):
        return WebDriverWait(browser, 30, poll_frequency=0.05).until(cond, message)

    def rows() -> list[str]:
        return browser.execute_script(
            "return [...document.querySelectorAll('#audit tbody tr')].map(t => t.innerText)")
    browser.get(pacs.http_url + "/app/admin")
    wait(lambda d: "/app/login" in d.current_url, "the login page")
    browser.find_element(By.ID, "name").send_keys("boss")
    browser.find_element(By.ID, "password").send_keys(BOSS[1] + "\n")
    wait(lambda d: d.current_url.split("?")[0].endswith("/app/admin")
         and d.find_element(By.ID, "admin").is_displayed(), "the admin page")
    # Its own log-in is in the trail by the time the panel loads, or at the next search.
    browser.find_element(By.ID, "au-user").send_keys("boss")
    browser.execute_script("document.getElementById('au-action').value = 'login'")
    browser.find_element(By.CSS_SELECTOR, "#audit-search button").click()
    wait(lambda d: any("login" in r and "boss" in r and "ok" in r for r in rows()),
         "boss's login in the audit panel")
    browser.find_element(By.ID, "au-study").send_keys(pacs.study)
    browser.execute_script("document.getElementById('au-action').value = 'store'")
    browser.find_element(By.ID, "au-user").clear()
    browser.find_element(By.CSS_SELECTOR, "#audit-search button").click()
    wait(lambda d: any("PYNETDICOM" in r and "4 instance(s)" in r for r in rows()),
         "the C-STORE record in the audit panel")


def test_share_links_and_labels(pacs):
    """A share link made, opened (a log-in as its holder), used (views and the ZIP in the
    holder's name), revoked; labels changed. The token itself is never in the trail."""
    import hashlib
    url, study = pacs.http_url, pacs.study
    rsp = requests.post(f"{url}/api/studies/{study}/share", json={"hours": 2}, headers=H,
                        auth=BOSS, timeout=30)
    assert rsp.status_code == 201, rsp.text
    link = rsp.json()
    holder_name = f"share link {hashlib.sha256(link['token'].encode()).hexdigest()[:16]}"
    recs = found(pacs, "the share link made", action="share", study=study)
    assert recs[0]["user"] == "boss" and recs[0]["event"] == "110113"

    holder = requests.Session()
    assert holder.get(link["url"], timeout=30, allow_redirects=False).status_code == 303
    assert holder.get(f"{url}/dicom-web/studies/{study}/metadata", timeout=30).status_code == 200
    assert holder.get(f"{url}/api/studies/{study}/zip", timeout=30).status_code == 200
    recs = found(pacs, "the holder's log-in", action="login", user=holder_name)
    assert (recs[0]["outcome"], recs[0]["studies"]) == ("ok", [study])
    assert found(pacs, "the holder's view", action="view", user=holder_name)
    assert found(pacs, "the holder's download", action="download", user=holder_name)
    assert requests.post(f"{url}/api/shares/{link['id']}/revoke", headers=H, auth=BOSS,
                         timeout=30).status_code == 200
    assert any("revoked" in r["detail"] for r in found(pacs, "the revocation", action="share",
                                                        user="boss"))
    assert requests.post(f"{url}/api/studies/{study}/labels", json={"add": ["teaching"]},
                         headers=H, auth=BOSS, timeout=30).status_code == 200
    recs = found(pacs, "the labels", action="labels", study=study)
    assert recs[0]["detail"] == "add teaching"
    everything = "".join(
        p.read_text() for p in (pacs.cfg.data / "audit").glob("*.jsonl"))
    assert link["token"] not in everything
