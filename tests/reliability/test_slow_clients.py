"""Slow clients (issue 16, class 4): request bodies sent a byte a second, on every kind of route
(XML-RPC, STOW-RS, the JSON API), more of them than there are HTTP worker threads, beside a few
slow request heads. While they hold: `/testdbalive` answers 200 every time and fast, ordinary
requests are still served, each slow body is cut with 408 within its deadline ([http]
body_timeout, plus a second per body_min_rate bytes), and the real pacsd-watchdog, probing
every half second, never reads the flood as a hang."""

from __future__ import annotations

import math
import re
import socket
import threading
import time
import xmlrpc.client
from contextlib import ExitStack
from pathlib import Path

import psutil
import requests
from conftest import LOCAL, serve, wait_for, write_config
from reliability.report import record, scaled
from test_watchdog import Watchdog

THREADS = 16            # the default pool: the twenty bodies outnumber it
BODY_TIMEOUT = 4.0      # [http] body_timeout for the test (default 20 s)
FLOOD_S = 3 * BODY_TIMEOUT
ROUTES = [  # (path, content type): XML-RPC, STOW-RS, the JSON API
    ("/RPC2", "text/xml"),
    ("/dicom-web/studies", "multipart/related; type=\"application/dicom\"; boundary=pacsd"),
    ("/api/studies/1.2.3/send", "application/json"),
]


class SlowBody(threading.Thread):
    """Sends a request head at once, then its body a byte a second, and again on a new
    connection once the server cuts it, until `stop`. Records (seconds to the cut, status)."""

    def __init__(self, port: int, path: str, ctype: str, stop: threading.Event,
                 length: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.ctype, self.stop, self.length = port, path, ctype, stop, length
        self.cuts: list[tuple[float, int]] = []   # status 0: closed without an answer
        self.uncut = 0   # connections still open when the flood ended

    def run(self) -> None:
        while not self.stop.is_set():
            with socket.create_connection((LOCAL, self.port), timeout=10) as s:
                s.sendall(f"POST {self.path} HTTP/1.1\r\nHost: {LOCAL}:{self.port}\r\n"
                          f"Content-Type: {self.ctype}\r\nContent-Length: {self.length}\r\n"
                          f"\r\n".encode())
                t0 = time.monotonic()
                s.settimeout(0.05)
                answer = None
                for _ in range(self.length):
                    try:
                        answer = s.recv(4096)
                        break
                    except TimeoutError:
                        pass
                    except OSError:
                        answer = b""
                        break
                    try:
                        s.send(b"x")
                    except OSError:
                        answer = b""
                        break
                    if self.stop.wait(1.0):
                        self.uncut += 1
                        return
                m = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer or b"")
                self.cuts.append((time.monotonic() - t0, int(m.group(1)) if m else 0))


class SlowHead(threading.Thread):
    """A request head a byte every 0.2 s, never finished."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop

    def run(self) -> None:
        head = f"GET /status HTTP/1.1\r\nHost: {LOCAL}\r\nX-Slow: ".encode() + b"a" * 4000
        with socket.create_connection((LOCAL, self.port), timeout=10) as s:
            for i in range(len(head)):
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    return
                if self.stop.wait(0.2):
                    return


def established(pid: int, port: int) -> int:
    """TCP connections the server process holds on `port`, ESTABLISHED."""
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr[1] == port and c.status == psutil.CONN_ESTABLISHED)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def test_slow_bodies_do_not_blind_the_server(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    watchdog = {"interval": 0.5, "timeout": 1.0, "failures": 2, "grace": 0.5, "term_wait": 1.0,
                "max_kills_per_hour": 10, "min_free_mb": 1,
                "log_file": str(tmp_path / "watchdog.log")}
    cfg = write_config(tmp_path / "pacsd.toml", data,
                       http={"threads": THREADS, "body_timeout": BODY_TIMEOUT},
                       log={"file": str(tmp_path / "pacsd.log")}, watchdog=watchdog)
    n = scaled(20)
    stop = threading.Event()
    with serve(cfg, data) as srv, ExitStack() as stack:
        port = int(srv.http_url.rsplit(":", 1)[1])
        pid = srv.proc.pid
        dog = Watchdog(cfg, tmp_path / "watchdog.log", tmp_path / "watchdog.out")
        stack.callback(dog.stop)
        offset = dog.wait(r"probe echo ok in", 20).end()   # a healthy round first

        # Some XML-RPC bodies small enough to be waited for before a worker takes them.
        bodies = [SlowBody(port, *ROUTES[i % len(ROUTES)], stop,
                           length=300 if i % 6 == 3 else 100_000) for i in range(n)]
        heads = [SlowHead(port, stop) for _ in range(3)]
        for t in bodies + heads:
            t.start()
        stack.callback(stop.set)
        flood_end = time.monotonic() + FLOOD_S
        # Every slow client is connected (every worker held) before the measurement begins.
        wait_for(lambda: established(pid, port) >= n + len(heads), 10,
                 "the server to accept the slow clients")

        latencies: list[float] = []
        normal: list[tuple[str, float]] = []
        for i in range(scaled(50)):
            t0 = time.monotonic()
            r = requests.get(srv.http_url + "/testdbalive", timeout=10)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200 and "succeeded" in r.text, (r.status_code, r.text)
            if i % 10 == 5:   # an ordinary request, through the held pool
                t0 = time.monotonic()
                r = requests.get(srv.http_url + "/status", timeout=3 * BODY_TIMEOUT)
                assert r.status_code == 200, r.text
                normal.append(("/status", time.monotonic() - t0))
            stop.wait(0.1)
        proxy = xmlrpc.client.ServerProxy(srv.http_url + "/RPC2")
        t0 = time.monotonic()
        assert proxy.Ping({}) == {"error": "0"}
        ping_s = time.monotonic() - t0
        while time.monotonic() < flood_end:   # the watchdog keeps probing through the flood
            assert srv.proc.poll() is None, "pacsd died under the flood"
            stop.wait(0.1)
        stop.set()
        for t in bodies + heads:
            t.join(5)
        text = dog.text()[offset:]
        rounds = len(re.findall(r"probe echo ok in", text))

    cuts = [c for b in bodies for c in b.cuts]
    health_p99_ms = round(p99(latencies) * 1000, 1)
    record("test_slow_bodies_do_not_blind_the_server", health_p99_ms=health_p99_ms,
           bad_inputs=len(cuts) + len(heads))
    print(f"\n[slow clients] {n} slow bodies, 3 slow heads: /testdbalive p99 {health_p99_ms} ms "
          f"over {len(latencies)} probes; {len(cuts)} bodies cut, slowest "
          f"{max((s for s, _ in cuts), default=0):.1f} s; ordinary requests {normal}; "
          f"Ping {ping_s:.3f} s; {rounds} healthy watchdog rounds")
    assert health_p99_ms < 1000, f"/testdbalive latencies: {latencies}"
    assert ping_s < 1.0
    # A request waits in the queue behind at most the slow bodies beyond the pool's size, each
    # cut within its deadline (which starts when a worker takes it).
    waits = math.ceil(n / THREADS)
    assert all(s < waits * BODY_TIMEOUT + 3 for _, s in normal), normal
    # Each body is cut with 408 within its deadline, after that wait for a worker.
    assert len(cuts) >= n, cuts
    assert {status for _, status in cuts} == {408}, cuts
    assert max(s for s, _ in cuts) < (waits + 1) * BODY_TIMEOUT + 3, cuts
    log = _read(tmp_path / "pacsd.log")
    assert len(re.findall(r"request body too slow .*: 408, connection closed", log)) >= n, log
    # The watchdog never read the flood as a hang.
    assert "killing" not in text and "round failed" not in text, text[-3000:]
    assert rounds >= 5, text[-3000:]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
