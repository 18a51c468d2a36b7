"""Password guessing against a real server with users: the throttle cannot be dodged with a
made-up X-Forwarded-For, HTTP Basic is throttled like the login form, and an unknown user name
answers no faster than a known one (the timing does not tell which names exist)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))

from conftest import serve, write_config  # noqa: E402
from pacsd.web.auth import ITERATIONS, check_password, hash_password  # noqa: E402
from report import record  # noqa: E402

BOSS = {"name": "boss", "password_hash": hash_password("boss-password"), "admin": True}
CAROL = {"name": "carol", "password_hash": hash_password("carol-password")}


def start(tmp_path: Path, **http):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "pacsd.toml", data, users=[BOSS, CAROL], http=http,
                       log={"file": str(tmp_path / "pacsd.log"), "level": "INFO"})
    return serve(cfg, data)


def login(url: str, name: str, password: str, **headers: str) -> int:
    return requests.post(url + "/app/login", json={"name": name, "password": password},
                         headers={"X-Requested-With": "pacsd", **headers}, timeout=30).status_code


def test_spoofed_forwarded_for_is_still_throttled(tmp_path):
    with start(tmp_path) as pacs:
        url = pacs.http_url
        codes = [login(url, "boss", f"guess{i}", **{"X-Forwarded-For": f"198.51.100.{i}"})
                 for i in range(11)]
        assert codes == [401] * 10 + [429], codes
        # The right password waits too, whatever address it claims.
        assert login(url, "boss", "boss-password", **{"X-Forwarded-For": "203.0.113.9"}) == 429
    log = (tmp_path / "pacsd.log").read_text()
    assert "failed login for 'boss' from 127.0.0.1" in log
    assert "198.51.100" not in log
    record("test_spoofed_forwarded_for_is_still_throttled", bad_inputs=12)


def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_counts(tmp_path):
    """With [http] trusted_proxies, the proxy's own entry is believed; what the client put in
    front of it is not."""
    with start(tmp_path, trusted_proxies=["127.0.0.0/8"]) as pacs:
        url = pacs.http_url
        codes = [login(url, "boss", f"guess{i}",
                       **{"X-Forwarded-For": f"10.9.9.{i}, 203.0.113.7, 127.0.0.1"})
                 for i in range(11)]
        assert codes == [401] * 10 + [429], codes
        # Another client behind the same proxy is not blocked by that one...
        assert login(url, "boss", "boss-password",
                     **{"X-Forwarded-For": "203.0.113.8"}) == 200
        # ...but guesses at one name from many addresses are (30 a quarter hour).
        codes = [login(url, "boss", f"again{i}", **{"X-Forwarded-For": f"192.0.2.{i}"})
                 for i in range(31)]
        assert codes == [401] * 30 + [429], codes
    log = (tmp_path / "pacsd.log").read_text()
    assert "failed login for 'boss' from 203.0.113.7" in log
    record("test_behind_a_trusted_proxy_the_rightmost_untrusted_address_counts",
           bad_inputs=42)


def test_http_basic_guessing_is_throttled(tmp_path):
    with start(tmp_path) as pacs:
        url = pacs.http_url + "/dicom-web/studies"
        codes = [requests.get(url, auth=("boss", f"guess{i}"), timeout=30).status_code
                 for i in range(11)]
        assert codes == [401] * 10 + [429], codes
        r = requests.get(url, auth=("boss", "boss-password"), timeout=30)
        assert r.status_code == 429 and r.headers["Retry-After"] == "900"
        # The login form shares the throttle.
        assert login(pacs.http_url, "boss", "boss-password") == 429
        # XML-RPC (OsiriX) is HTTP Basic too.
        r = requests.post(pacs.http_url + "/RPC2", auth=("boss", "x"), timeout=30,
                          headers={"Content-Type": "text/xml"}, data=b"<methodCall/>")
        assert r.status_code == 429
    log = (tmp_path / "pacsd.log").read_text()
    assert "too many failed logins from 127.0.0.1" in log
    record("test_http_basic_guessing_is_throttled", bad_inputs=14)


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def test_unknown_names_take_as_long_as_known_ones(tmp_path):
    """Median time of a login as an unknown name vs a known name with a wrong password, both
    compared with the cost of one password check (PBKDF2, ITERATIONS rounds) measured here.
    Each try comes from another address through a trusted proxy, so the throttle stays out of
    the way; tries alternate, so a load spike hits both sides alike."""
    hashed = hash_password("x")
    # The least of a few: load only ever adds to the cost, the server's medians include it.
    hash_ms = min(_median_ms(lambda: check_password("y", hashed), 1) for _ in range(5))
    n = 15
    with start(tmp_path, trusted_proxies=["127.0.0.1"]) as pacs:
        url = pacs.http_url
        counter = iter(range(10_000))

        def attempt(name: str, basic: bool) -> None:
            i = next(counter)
            address = f"10.0.{i // 250}.{i % 250}"
            if basic:
                r = requests.get(url + "/dicom-web/studies", auth=(name, "wrong-password"),
                                 headers={"X-Forwarded-For": address}, timeout=30)
                assert r.status_code == 401
            else:
                assert login(url, name, "wrong-password", **{"X-Forwarded-For": address}) == 401

        # Each known name once per side: 1 + n failures stay under the per-name limit (30).
        for basic, user in ((False, "boss"), (True, "carol")):
            attempt(user, basic)   # warm up (connections, the dummy hash)
            attempt("nobody-warm", basic)
            known, unknown = [], []
            for i in range(n):
                for name, into in ((user, known), (f"nobody{i}-{basic}", unknown)):
                    t0 = time.perf_counter()
                    attempt(name, basic)
                    into.append((time.perf_counter() - t0) * 1000)
            known_ms, unknown_ms = statistics.median(known), statistics.median(unknown)
            what = "HTTP Basic" if basic else "login form"
            print(f"{what}: known {known_ms:.1f} ms, unknown {unknown_ms:.1f} ms, "
                  f"one PBKDF2 ({ITERATIONS} rounds) {hash_ms:.1f} ms")
            assert unknown_ms >= 0.5 * known_ms, (what, known_ms, unknown_ms)
            assert unknown_ms >= 0.5 * hash_ms, (what, unknown_ms, hash_ms)
            assert unknown_ms <= 2.0 * known_ms + 50, (what, known_ms, unknown_ms)
    record("test_unknown_names_take_as_long_as_known_ones", bad_inputs=4 * n)
