"""The web side's server and its health endpoints, over real HTTP."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from pacsd import config
from pacsd.errors import ConfigError
from pacsd.web.auth import hash_password

from conftest import LOCAL, store_files, write_config
from data import write_series


def test_testdbalive_and_status(server, tmp_path):
    store_files(server.dicom_port, write_series(tmp_path / "in", images=3, size=8))
    r = requests.get(server.http_url + "/testdbalive", timeout=5)
    assert (r.status_code, r.text) == (200, "Test DB Alive succeeded")
    assert r.elapsed.total_seconds() < 1
    s = requests.get(server.http_url + "/status", timeout=5).json()
    assert s["index"]["instances"] == 3 and s["aet"] == "PACSD"
    assert s["disk_free_bytes"] > 0 and s["uptime_s"] >= 0 and "associations" in s
    assert (s["dicom_workers"], s["dicom_worker_restarts"]) == (0, 0)   # in-process here


def test_testdbalive_fails_when_the_index_writer_is_wedged(server):
    gate = threading.Event()
    # Wedge the one writer thread with a long transaction of our own.
    t = threading.Thread(target=lambda: server.index.submit(lambda: gate.wait(20), timeout=30))
    t.start()
    try:
        t0 = time.monotonic()
        r = requests.get(server.http_url + "/testdbalive", timeout=10)
        assert r.status_code == 503 and time.monotonic() - t0 < 3
        # Other requests are still served meanwhile.
        assert requests.get(server.http_url + "/status", timeout=5).status_code == 200
    finally:
        gate.set()
        t.join(30)
    assert requests.get(server.http_url + "/testdbalive", timeout=5).status_code == 200


def test_a_slow_client_does_not_block_others(server):
    # A client that sends half a request line and then nothing.
    slow = socket.create_connection((LOCAL, int(server.http_url.rsplit(":", 1)[1])))
    try:
        slow.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        r = requests.get(server.http_url + "/testdbalive", timeout=5)
        assert r.status_code == 200 and time.monotonic() - t0 < 1
    finally:
        slow.close()


def test_users_basic_auth_and_open_health_on_loopback(make_server):
    hashed = hash_password("s3cret", iterations=1000)
    server = make_server(users=[{"name": "ann", "password_hash": hashed, "admin": True}])
    url = server.http_url
    assert requests.get(url + "/testdbalive", timeout=5).status_code == 200
    r = requests.get(url + "/nothing-here", timeout=5)
    assert r.status_code == 401 and "Basic" in r.headers["WWW-Authenticate"]
    assert requests.get(url + "/nothing-here", auth=("ann", "wrong"), timeout=5).status_code == 401
    assert requests.get(url + "/nothing-here", auth=("ann", "s3cret"), timeout=5).status_code == 404


def test_http_beyond_loopback_needs_users(tmp_path):
    # Issue 19: checked when the server starts (users added on the admin page count too, and
    # they are in the index), no longer by config.load.
    from pacsd.daemon.server import Server
    f = write_config(tmp_path / "c.toml", tmp_path / "d", http={"bind": "0.0.0.0"})
    with pytest.raises(ConfigError, match="users"):
        Server(config.load(f, env={})).start()


def test_http_port_in_use_exits_69(tmp_path):
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        s.listen()
        f = write_config(tmp_path / "c.toml", tmp_path / "d", http={"port": s.getsockname()[1]})
        r = subprocess.run([sys.executable, "-m", "pacsd", "serve", "--config", str(f)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 69 and "HTTP" in r.stderr.strip().splitlines()[-1]


def test_https_when_a_certificate_is_configured(make_server, tmp_path):
    import subprocess
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    server = make_server(http={"cert": str(cert), "key": str(key)})
    assert server.http_url.startswith("https://")
    r = requests.get(server.http_url + "/testdbalive", verify=str(cert), timeout=5)
    assert (r.status_code, r.text) == (200, "Test DB Alive succeeded")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.http_url.replace("https", "http") + "/testdbalive", timeout=5)


def test_request_bodies_over_the_cap_are_refused(make_server):
    server = make_server(http={"max_body_mb": 1})
    r = requests.post(server.http_url + "/status", data=b"x" * (2 << 20), timeout=10)
    assert r.status_code == 413
    assert requests.get(server.http_url + "/testdbalive", timeout=5).status_code == 200


def test_cert_without_key_is_a_config_error(tmp_path):
    f = write_config(tmp_path / "c.toml", tmp_path / "d", http={"cert": "/x.pem"})
    with pytest.raises(ConfigError, match="cert and key"):
        config.load(f, env={})
