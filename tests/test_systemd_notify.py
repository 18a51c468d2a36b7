"""systemd's notify protocol (Type=notify, WatchdogSec) against a real `pacsd serve` subprocess.

The test plays the service manager: it binds the AF_UNIX datagram socket that NOTIFY_SOCKET
names and reads what pacsd sends there: READY=1 once both ports accept, WATCHDOG=1 only while
the health check passes (WATCHDOG_USEC=3 s: a check every second), STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from conftest import LOCAL, Process, associate, free_port, pacsd_cmd, serve, write_config
from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from pacsd import systemd

THREE_SECONDS = "3000000"   # WATCHDOG_USEC: pacsd checks and pings every second


class Manager:
    """The service manager's end of NOTIFY_SOCKET: every datagram, parsed, with its arrival."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.folder = ""
        if abstract:
            name = f"pacsd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:   # a short folder: AF_UNIX paths end at 108 bytes, pytest's tmp_path may not
            self.folder = tempfile.mkdtemp(prefix="pacsd-sd-", dir="/tmp")
            self.address = os.path.join(self.folder, "notify")
            self.sock.bind(self.address)
        self.seen: list[tuple[float, dict[str, str]]] = []

    def env(self, watchdog_usec: str | None = None) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **({"WATCHDOG_USEC": watchdog_usec}
                                                  if watchdog_usec else {})}

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next datagram as {KEY: VALUE}, or None if none came within `timeout`."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.seen.append((time.monotonic(), message))
        return message

    def wait(self, proc: subprocess.Popen, key: str, value: str = "", timeout: float = 30
             ) -> dict[str, str]:
        """The first datagram with KEY (whose value starts with `value`) within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(min(0.2, deadline - time.monotonic()))
            if message and message.get(key, "\0").startswith(value):
                return message
            if message is None and proc.poll() is not None:
                raise AssertionError(f"pacsd exited {proc.returncode} before {key}={value}")
        raise AssertionError(f"no {key}={value} within {timeout} s; got {self.seen[-10:]}")

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Every datagram arriving within the next `seconds`."""
        out, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                out.append(message)
        return out

    def close(self) -> None:
        self.sock.close()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def pings(messages: Iterable[dict[str, str]]) -> int:
    return sum(m.get("WATCHDOG") == "1" for m in messages)


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    yield m
    m.close()


@pytest.fixture
def pacsd(tmp_path: Path):
    """pacsd(manager, watchdog_usec) -> a ready `pacsd serve` reporting to `manager`."""
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data)
    with ExitStack() as stack:
        def start(m: Manager, watchdog_usec: str | None = None) -> Process:
            return stack.enter_context(serve(cfg, data, env=m.env(watchdog_usec)))
        yield start


def echo(port: int) -> int:
    with associate(port, [build_context(Verification)]) as assoc:
        return int(assoc.send_c_echo().Status)


# --- the tests --------------------------------------------------------------------------------

def test_ready_only_once_both_ports_accept(tmp_path: Path, manager: Manager):
    # Fixed ports and no waiting for pacsd.json first: READY=1 alone must mean "connect now".
    dicom_port, http_port = free_port(), free_port()
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, dicom={"port": dicom_port},
                       http={"port": http_port})
    with open(tmp_path / "serve.log", "ab") as out:
        proc = subprocess.Popen(pacsd_cmd("serve", "--config", str(cfg)), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **manager.env()})
    try:
        ready = manager.wait(proc, "READY", "1")
        # A C-ECHO, not a bare connect: that would hold an association slot until acse_timeout.
        assert echo(dicom_port) == 0
        r = requests.get(f"http://{LOCAL}:{http_port}/testdbalive", timeout=5)
        assert r.status_code == 200, r.text
        assert json.loads((data / "pacsd.json").read_text())["pid"] == proc.pid
        assert ready["STATUS"] == (f"serving: PACSD on DICOM port {dicom_port}, "
                                   f"HTTP port {http_port}"), ready
    finally:
        proc.terminate()
        proc.wait(30)
    assert pings(m for _, m in manager.seen) == 0, "WATCHDOG=1 without WATCHDOG_USEC"


def test_watchdog_pings_about_every_second(pacsd, manager: Manager):
    p = pacsd(manager, THREE_SECONDS)
    manager.wait(p.proc, "READY", "1")
    manager.wait(p.proc, "WATCHDOG", "1", timeout=5)
    got = manager.collect(4.5)
    assert 3 <= pings(got) <= 7, got
    assert all(not m.get("STATUS", "").startswith("unhealthy") for m in got), got


def test_wedged_index_stops_the_pings_until_released(pacsd, manager: Manager):
    p = pacsd(manager, THREE_SECONDS)
    manager.wait(p.proc, "WATCHDOG", "1", timeout=10)
    lock = sqlite3.connect(p.data / "index.sqlite3", isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")   # the write lock: the index writer now waits
        unhealthy = manager.wait(p.proc, "STATUS", "unhealthy: ", timeout=10)
        assert "index" in unhealthy["STATUS"], unhealthy
        got = manager.collect(3.0)   # three checks, each failing: not one ping
        assert pings(got) == 0, got
        assert "health check failed: the index" in p.output(), p.output()
        assert "not telling systemd we are alive" in p.output(), p.output()
    finally:
        lock.close()   # rolls back: the lock is gone
    manager.wait(p.proc, "WATCHDOG", "1", timeout=15)
    assert pings(manager.collect(2.5)) >= 1
    assert p.proc.poll() is None


def test_missing_storage_folder_stops_the_pings(pacsd, manager: Manager):
    p = pacsd(manager, THREE_SECONDS)
    manager.wait(p.proc, "WATCHDOG", "1", timeout=10)
    storage, aside = p.data / "storage", p.data / "storage.aside"
    storage.rename(aside)
    try:
        unhealthy = manager.wait(p.proc, "STATUS", "unhealthy: ", timeout=10)
        assert "storage folder" in unhealthy["STATUS"], unhealthy
        assert pings(manager.collect(2.5)) == 0
    finally:
        aside.rename(storage)
    manager.wait(p.proc, "WATCHDOG", "1", timeout=10)


def test_abstract_socket_gets_ready(pacsd):
    m = Manager(abstract=True)
    try:
        p = pacsd(m)
        assert m.wait(p.proc, "READY", "1")["STATUS"].startswith("serving: ")
    finally:
        m.close()


def test_sigterm_sends_stopping_and_exits_0(pacsd, manager: Manager):
    p = pacsd(manager, THREE_SECONDS)
    manager.wait(p.proc, "READY", "1")
    p.proc.send_signal(signal.SIGTERM)
    manager.wait(p.proc, "STOPPING", "1", timeout=10)
    assert p.proc.wait(30) == 0, p.output()


# --- the module alone -------------------------------------------------------------------------

def test_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", THREE_SECONDS)
    assert systemd.notify("READY=1") is False
    assert systemd.watchdog_interval() is None


def test_notify_and_interval_in_process(monkeypatch, manager: Manager):
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.setenv("WATCHDOG_USEC", THREE_SECONDS)
    assert systemd.notify("READY=1", "STATUS=héllo")
    assert manager.receive(2) == {"READY": "1", "STATUS": "héllo"}
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))   # the watchdog is not ours
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address + ".gone")   # never raises
    assert systemd.notify("WATCHDOG=1") is False
