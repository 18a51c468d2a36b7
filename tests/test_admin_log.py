"""Issue 19, point 11: the admin page's "recent errors" shows what an administrator should act
on (a refused association, a failed send, a full disk, any error), not single web requests,
log-ins, the libraries' messages or the DEBUG lines that carry patient data; the same after a
restart, when they are read back from the log file. A real `pacsd serve`, real clients."""

from __future__ import annotations

import requests
from conftest import serve, store_files, wait_for, write_config
from data import ct_slice
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_retrieve import move

H = {"X-Requested-With": "test"}


def recent(url: str) -> list[dict]:
    r = requests.get(f"{url}/api/log", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def refused_echo(port: int, aet: str) -> bool:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSD")
        refused = assoc.is_rejected
        if assoc.is_established:
            assoc.release()
        return refused
    finally:
        ae.shutdown()


def test_recent_errors_are_what_an_administrator_acts_on(tmp_path):
    data, logfile = tmp_path / "data", tmp_path / "pacsd.log"
    cfg = write_config(tmp_path / "pacsd.toml", data,
                       log={"file": str(logfile), "level": "DEBUG"},
                       dicom={"allowed_calling_aets": ["PYNETDICOM"]})
    image = ct_slice(seed=19, patient=1, study=1, series=1, number=1, size=16)
    image.PatientName = "MUELLER^ANNA"
    path = tmp_path / "ct.dcm"
    image.save_as(path, enforce_file_format=True)
    with serve(cfg, data) as p:
        url = p.http_url
        # Acted on: a refused association, a C-MOVE to an unknown destination (a failed send).
        assert refused_echo(p.port, "INTRUDER")
        assert store_files(p.port, [path]) == [0]
        study = str(dcmread(path).StudyInstanceUID)
        assert move(p.port, "NOWHERE", "STUDY", StudyInstanceUID=study)[-1].Status == 0xA801
        # Not acted on: a failed log-in, a 4xx answer, a cross-site refusal, per-request DEBUG.
        assert requests.post(f"{url}/app/login", json={"name": "x", "password": "wrong-one"},
                             timeout=30).status_code == 401
        assert requests.delete(f"{url}/api/users/nobody", headers=H,
                               timeout=30).status_code == 404
        assert requests.delete(f"{url}/api/users/nobody", timeout=30,
                               headers={**H, "Origin": "http://evil.example"}).status_code == 403
        assert requests.get(f"{url}/api/nodes/nosuch/studies", timeout=30).status_code == 404
        wait_for(lambda: "MUELLER" in logfile.read_text(errors="replace"), 10,
                 "the patient's name in the DEBUG lines of the log file")
        live = recent(url)
        wait_for(lambda: "evil.example" in logfile.read_text(errors="replace"), 10,
                 "the guard's line in the log file")
    check(live)
    # Read back from the log file after a restart: the same rule.
    with serve(cfg, data, log_name="serve2.log") as p:
        check(recent(p.http_url))


def check(entries: list[dict]) -> None:
    text = "\n".join(f"{e['level']} {e['logger']}: {e['message']}" for e in entries)
    assert any("association from" in e["message"] and "INTRUDER" in e["message"]
               and e["logger"].startswith("pacsd.dimse") for e in entries), text
    assert any("unknown destination 'NOWHERE'" in e["message"] for e in entries), text
    assert all(e["level"] in ("WARNING", "ERROR", "CRITICAL") for e in entries), text
    for noise in ("MUELLER", "evil.example", "/api/users/nobody", "pynetdicom", "pydicom"):
        assert noise not in text, (noise, text)
    assert not [e for e in entries if e["logger"].startswith(("pacsd.web.app", "pacsd.web.guard",
                                                              "pacsd.web.ui", "pynetdicom"))]


def test_the_admin_page_s_own_changes_are_no_recent_errors(make_server):
    server = make_server(qr_clients=False)
    url = server.http_url
    assert requests.post(f"{url}/api/nodes", json={"name": "ws", "aet": "WS", "host": "127.0.0.1",
                                                   "port": 104},
                         headers=H, timeout=30).status_code == 201
    assert requests.delete(f"{url}/api/nodes/ws", headers=H, timeout=30).status_code == 200
    assert [e for e in recent(url) if "admin page" in e["message"]] == []
