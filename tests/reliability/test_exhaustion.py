"""Resource exhaustion: peers that connect and say nothing (or say it very slowly) must not stop
real clients from being served, over plain DICOM, DICOM TLS and HTTP."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import (LOCAL, dcmtk, pacsd_cmd, run_peer, serve, store_files, terminate,
                      write_config)
from data import sample
from reliability.report import PeakMemory, record, scaled

MAX_ASSOCIATIONS = 4
# Also how long a silent connection is kept: long enough to open all of them first, at any scale.
ACSE_TIMEOUT = float(scaled(3))


def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{message} (after {timeout} s)")


def established(pid: int, port: int) -> int:
    """TCP connections the server holds on `port`, ESTABLISHED: its own process's and its
    DICOM workers' (pacsd.daemon.workers), each connection once."""
    server = psutil.Process(pid)
    seen = set()
    for proc in (server, *server.children(recursive=True)):
        try:
            seen |= {(c.laddr, c.raddr) for c in proc.net_connections("tcp")
                     if c.laddr and c.laddr[1] == port and c.status == psutil.CONN_ESTABLISHED}
        except psutil.NoSuchProcess:
            pass
    return len(seen)


def idle_sockets(stack: ExitStack, port: int, n: int, payload: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = stack.enter_context(socket.create_connection((LOCAL, port), timeout=10))
        if payload:
            s.sendall(payload)
        socks.append(s)
    return socks


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(4096) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def echo(port: int, tls: tuple[ssl.SSLContext, str] | None = None) -> tuple[bool, float]:
    """(Success?, seconds) of a pynetdicom C-ECHO."""
    ae = AE(ae_title="RELIABILITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    t0 = time.monotonic()
    try:
        assoc = ae.associate(LOCAL, port, ae_title="PACSD", tls_args=tls)
        if not assoc.is_established:
            return False, time.monotonic() - t0
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and int(status.Status) == 0, time.monotonic() - t0
    finally:
        ae.shutdown()


def echoscu(port: int, *tls: str, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = run_peer([dcmtk("echoscu"), *tls, "-to", "10", "-ta", "10", "-aec", "PACSD", LOCAL,
                     str(port)], timeout=30, check=check)
    return proc, time.monotonic() - t0


# --- idle DICOM connections -------------------------------------------------------------------

def test_idle_connections_do_not_use_up_associations(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, dicom={
        "max_associations": MAX_ASSOCIATIONS, "acse_timeout": ACSE_TIMEOUT})
    n = scaled(2 * MAX_ASSOCIATIONS)
    with serve(cfg, data) as srv, ExitStack() as stack, PeakMemory(srv.proc.pid) as mem:
        idle = idle_sockets(stack, srv.port, n)
        wait_for(lambda: established(srv.proc.pid, srv.port) >= n, 10,
                 "the server did not accept the idle connections")
        ok, seconds = echo(srv.port)
        assert ok and seconds < 2, f"pynetdicom C-ECHO: ok={ok} in {seconds:.2f} s"
        _, dcmtk_seconds = echoscu(srv.port)
        assert dcmtk_seconds < 2, f"echoscu took {dcmtk_seconds:.2f} s"
        assert store_files(srv.port, [sample("CT_small.dcm")]) == [0]
        # Half an association request is no better than none: bytes that never complete a PDU.
        stuck = idle_sockets(stack, srv.port, scaled(MAX_ASSOCIATIONS), payload=b"\x01\x00")
        wait_for(lambda: all(closed_by_peer(s) for s in idle), ACSE_TIMEOUT + 10,
                 "pacsd did not close the idle connections")
        ok, seconds = echo(srv.port)
        assert ok and seconds < 2, f"C-ECHO after the idle connections: ok={ok} {seconds:.2f} s"
        assert srv.proc.poll() is None
        del stuck
    record("test_idle_connections_do_not_use_up_associations", associations=n + 4,
           bad_inputs=n + scaled(MAX_ASSOCIATIONS), peak_rss_mb=mem.mb)


# --- DICOM TLS --------------------------------------------------------------------------------

def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, made now; plus
    a client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=pacsd test {ca}", "-keyout", d / f"{ca}.key", "-out", d / f"{ca}.pem")
        out[ca] = d / f"{ca}.pem"
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1"),
                          ("client", "ca", "extendedKeyUsage=clientAuth"),
                          ("stranger", "other-ca", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")
        openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / f"{ca}.pem",
                "-CAkey", d / f"{ca}.key", "-CAcreateserial", "-days", "2",
                "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem")
        out[name], out[name + "_key"] = d / f"{name}.pem", d / f"{name}.key"
    return out


def client_tls(pki: dict[str, Path], cert: str | None = None) -> tuple[ssl.SSLContext, str]:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        ctx.load_cert_chain(pki[cert], pki[cert + "_key"])
    return ctx, LOCAL


def tls_config(tmp_path: Path, pki: dict[str, Path], **dicom) -> tuple[Path, Path]:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, dicom={
        "tls_cert": str(pki["server"]), "tls_key": str(pki["server_key"]),
        "acse_timeout": ACSE_TIMEOUT, "max_associations": MAX_ASSOCIATIONS, **dicom})
    return cfg, data


def test_dicom_tls_and_stalled_handshakes(tmp_path: Path, pki) -> None:
    cfg, data = tls_config(tmp_path, pki)
    stalled = scaled(2 * MAX_ASSOCIATIONS)
    with serve(cfg, data) as srv, ExitStack() as stack, PeakMemory(srv.proc.pid) as mem:
        ok, seconds = echo(srv.port, client_tls(pki))
        assert ok, "C-ECHO over TLS (pynetdicom) failed"
        echoscu(srv.port, "+tls", str(pki["client_key"]), str(pki["client"]),
                "+cf", str(pki["ca"]))
        # A plain client is refused cleanly, quickly, and the server goes on.
        ok, seconds = echo(srv.port)
        assert not ok and seconds < 5, f"plain C-ECHO to a TLS listener: ok={ok} {seconds:.2f} s"
        proc, _ = echoscu(srv.port, check=False)
        assert proc.returncode != 0
        # Clients that never finish their handshake: silent, or half a ClientHello.
        silent = idle_sockets(stack, srv.port, stalled)
        half_hello = idle_sockets(stack, srv.port, stalled, payload=b"\x16\x03\x01\x02\x00\x01")
        wait_for(lambda: established(srv.proc.pid, srv.port) >= 2 * stalled, 10,
                 "the server did not accept the stalled connections")
        ok, seconds = echo(srv.port, client_tls(pki))
        assert ok and seconds < 2, f"TLS C-ECHO beside stalled handshakes: ok={ok} {seconds:.2f} s"
        _, dcmtk_seconds = echoscu(srv.port, "+tls", str(pki["client_key"]), str(pki["client"]),
                                   "+cf", str(pki["ca"]))
        assert dcmtk_seconds < 2, f"echoscu +tls took {dcmtk_seconds:.2f} s"
        wait_for(lambda: all(closed_by_peer(s) for s in silent + half_hello), ACSE_TIMEOUT + 10,
                 "pacsd did not close the stalled handshakes")
        assert echo(srv.port, client_tls(pki))[0]
    record("test_dicom_tls_and_stalled_handshakes", associations=6,
           bad_inputs=2 * stalled + 2, peak_rss_mb=mem.mb)


def test_dicom_tls_client_certificates(tmp_path: Path, pki) -> None:
    cfg, data = tls_config(tmp_path, pki, tls_ca=str(pki["ca"]))
    with serve(cfg, data) as srv, PeakMemory(srv.proc.pid) as mem:
        assert echo(srv.port, client_tls(pki, "client"))[0], "a certificate from our CA"
        echoscu(srv.port, "+tls", str(pki["client_key"]), str(pki["client"]),
                "+cf", str(pki["ca"]))
        assert not echo(srv.port, client_tls(pki))[0], "no client certificate: refused"
        assert not echo(srv.port, client_tls(pki, "stranger"))[0], "another CA's: refused"
        proc, _ = echoscu(srv.port, "+tls", str(pki["stranger_key"]), str(pki["stranger"]),
                          "+cf", str(pki["ca"]), check=False)
        assert proc.returncode != 0, "echoscu with another CA's certificate was accepted"
        assert echo(srv.port, client_tls(pki, "client"))[0], "still serving"
    record("test_dicom_tls_client_certificates", associations=6, bad_inputs=3,
           peak_rss_mb=mem.mb)


def test_own_probes_speak_tls(tmp_path: Path, pki) -> None:
    """`pacsd status` and the watchdog's C-ECHO reach a TLS listener that requires client
    certificates (with plain TCP the watchdog would kill a healthy server)."""
    cfg, data = tls_config(tmp_path, pki, tls_ca=str(pki["ca"]))
    wlog = tmp_path / "watchdog.log"
    with open(cfg, "a") as f:
        f.write(f'[watchdog]\ninterval = 0.3\ngrace = 0\nfailures = 2\nlog_file = "{wlog}"\n')
    with serve(cfg, data) as srv:
        status = subprocess.run(pacsd_cmd("status", "--config", str(cfg)), capture_output=True,
                                text=True, timeout=60, check=False)
        assert status.returncode == 0 and "echo" in status.stdout and "ok" in status.stdout, \
            status.stdout + status.stderr
        dog = subprocess.Popen([sys.executable, "-m", "pacsd_watchdog", "--config", str(cfg),
                                "--log-level", "DEBUG"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: wlog.exists() and wlog.read_text().count("probe echo ok") >= 5, 20,
                     "the watchdog's C-ECHO over TLS did not succeed five times")
            assert "round failed" not in wlog.read_text() and srv.proc.poll() is None
        finally:
            terminate(dog)


# --- slow HTTP clients ------------------------------------------------------------------------

HTTP_THREADS = 4


def test_slowloris_does_not_delay_testdbalive(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, http={"threads": HTTP_THREADS})
    n = scaled(2 * HTTP_THREADS)
    request = b"GET /testdbalive HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
    stop = threading.Event()
    with serve(cfg, data) as srv, ExitStack() as stack, PeakMemory(srv.proc.pid) as mem:
        port = int(srv.http_url.rsplit(":", 1)[1])
        slow = idle_sockets(stack, port, n)

        def dribble() -> None:   # one byte per connection every 0.1 s, never the blank line
            for i in range(len(request)):
                for s in slow:
                    try:
                        s.send(request[i:i + 1])
                    except OSError:
                        pass
                if stop.wait(0.1):
                    return
        t = threading.Thread(target=dribble, daemon=True)
        t.start()
        try:
            wait_for(lambda: established(srv.proc.pid, port) >= n, 10,
                     "the server did not accept the slow connections")
            latencies = []
            deadline = time.monotonic() + scaled(3)
            while time.monotonic() < deadline and len(latencies) < scaled(30):
                t0 = time.monotonic()
                r = requests.get(srv.http_url + "/testdbalive", timeout=10)
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
                stop.wait(0.1)
            assert t.is_alive(), "the slow clients stopped before the measurement ended"
        finally:
            stop.set()
            t.join(5)
    assert max(latencies) < 1.5, f"/testdbalive latencies beside {n} slow clients: {latencies}"
    record("test_slowloris_does_not_delay_testdbalive", bad_inputs=n, peak_rss_mb=mem.mb)
