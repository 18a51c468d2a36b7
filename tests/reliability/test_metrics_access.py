"""/metrics against callers who should not read it: only this machine (loopback) and logged-in
administrators may. Behind a trusted reverse proxy (here on 127.0.0.1) the client's own address
counts, so remote callers are simulated with X-Forwarded-For (203.0.113.x, TEST-NET-3: never
contacted). Every refusal answers without a figure; junk in the request changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))

from pacsd.web.auth import hash_password  # noqa: E402
from report import record  # noqa: E402

BOSS = {"name": "boss", "password_hash": hash_password("boss-password"), "admin": True}
READER = {"name": "reader", "password_hash": hash_password("reader-password")}
REMOTE = {"X-Forwarded-For": "203.0.113.9"}


def get(url: str, **kw) -> requests.Response:
    return requests.get(f"{url}/metrics", timeout=10, **kw)


def up(r: requests.Response) -> float:
    assert r.status_code == 200, (r.status_code, r.text)
    return next(s.value for f in text_string_to_metric_families(r.text) for s in f.samples
                if s.name == "pacsd_up")


def test_only_this_machine_and_administrators_read_metrics(make_server):
    server = make_server(users=[BOSS, READER], http={"trusted_proxies": ["127.0.0.1"]})
    url = server.http_url
    refused = [
        (get(url, headers=REMOTE), 401),                                           # nobody
        (get(url, headers=REMOTE, auth=("reader", "reader-password")), 403),       # not admin
        (get(url, headers=REMOTE, auth=("boss", "wrong-password")), 401),          # wrong one
        # A remote client claiming to be this machine: the proxy appends what it saw.
        (get(url, headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.9"}), 401),
        (get(url, headers={"X-Forwarded-For": "::1, 203.0.113.10",
                           "Cookie": "pacsd_session=forged.0.0.0"}), 401),
    ]
    for r, code in refused:
        assert r.status_code == code, (r.status_code, r.text)
        assert "pacsd_" not in r.text
    # Changing methods are not routes here, whoever asks.
    r = requests.post(f"{url}/metrics", headers={"X-Requested-With": "x"}, timeout=10)
    assert r.status_code in (403, 405) and "pacsd_" not in r.text
    # Allowed: an administrator from afar, and this machine (junk in the query changes nothing).
    assert up(get(url, headers=REMOTE, auth=("boss", "boss-password"))) == 1
    assert up(get(url, params={"name[]": "x" * 2000, "format": "protobuf"})) == 1
    assert up(get(url)) == 1
    record("test_only_this_machine_and_administrators_read_metrics", bad_inputs=len(refused) + 1)


def test_without_a_trusted_proxy_forwarded_headers_do_not_open_it(make_server):
    """X-Forwarded-For from a caller that is not a trusted proxy is not believed either way:
    the loopback connection itself is what counts (open), and no header makes a remote caller
    look local (the other test)."""
    server = make_server(users=[BOSS, READER])
    assert up(get(server.http_url, headers=REMOTE)) == 1
