"""pacsd-watchdog (issue 5) against real `pacsd serve` subprocesses on 127.0.0.1, ports 0.

A small supervisor (a thread, standing in for systemd's Restart=always) starts `pacsd serve`
again whenever it exits; the watchdog runs as its own process with short intervals and a DEBUG
log in tmp_path, and each test waits (bounded) for the log's stable phrases. The server is made
sick the ways the watchdog must notice: frozen (SIGSTOP), its index write-locked from here, its
DICOM side full of idle associations.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

import pytest
import requests
from conftest import LOCAL, dcmtk, pacsd_cmd, peer_env, terminate, write_config
from data import write_series

# Short settings: a round every 0.3 s, a kill after 2 failed rounds.
FAST = {"interval": 0.3, "timeout": 1.0, "failures": 2, "grace": 0.5, "term_wait": 1.0,
        "max_kills_per_hour": 10, "min_free_mb": 1}
SLACK = 6.0   # the watchdog's own start-up, psutil checks, a loaded 2-core CI machine


def kill_bound(w: dict) -> float:
    """The longest a frozen server may live: failed rounds (three probes each timing out),
    then SIGTERM and the wait before SIGKILL."""
    return w["failures"] * (w["interval"] + 3 * w["timeout"]) + w["term_wait"] + SLACK


def watchdog_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "pacsd-watchdog"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "pacsd_watchdog", *args]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


# --- the supervisor ---------------------------------------------------------------------------

class Supervisor:
    """Runs `pacsd serve` and starts it again each time it exits (at most `max_starts` starts,
    none after `max_seconds` or stop()); records when each pid was seen gone."""

    def __init__(self, config: Path, data: Path, log: Path, max_starts: int = 4,
                 max_seconds: float = 90) -> None:
        self.config, self.data, self.log = config, data, log
        self.max_starts, self.deadline = max_starts, time.monotonic() + max_seconds
        self.procs: list[subprocess.Popen] = []
        self.exits: dict[int, float] = {}   # pid -> time.time() when it was seen gone
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    @property
    def restarts(self) -> int:
        return max(0, len(self.procs) - 1)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _run(self) -> None:
        while len(self.procs) < self.max_starts and time.monotonic() < self.deadline:
            with self._lock:
                if self._stop.is_set():
                    return
                with open(self.log, "ab") as out:
                    proc = subprocess.Popen(pacsd_cmd("serve", "--config", str(self.config)),
                                            stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
                self.procs.append(proc)
            while proc.poll() is None:
                time.sleep(0.02)
            self.exits[proc.pid] = time.time()
            if self._stop.wait(0.1):   # no hot loop if pacsd cannot start at all
                return

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def wait_ready(self, not_pid: int = 0, timeout: float = 30) -> dict:
        """pacsd.json of a running pacsd that this supervisor started (other than not_pid)."""
        import json
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                running = [p.pid for p in self.procs if p.poll() is None]
            try:
                info = json.loads((self.data / "pacsd.json").read_text())
                if info["pid"] in running and info["pid"] != not_pid:
                    return info
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"no pacsd (other than {not_pid}) ready after {timeout} s; "
                             f"started {self.pids}\n{self.output()}")

    def wait_exit(self, pid: int, timeout: float) -> float:
        """When `pid` was seen gone (time.time()); fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pid in self.exits:
                return self.exits[pid]
            time.sleep(0.02)
        raise AssertionError(f"pacsd pid {pid} still running after {timeout:.1f} s")

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self._stop.set()
        with self._lock:   # no new start can slip in from here on
            for p in self.procs:
                if p.poll() is None:
                    cont(p.pid)
                    terminate(p, 10)
        self._thread.join(15)


# --- the watchdog -----------------------------------------------------------------------------

class Watchdog:
    """A `pacsd-watchdog --log-level DEBUG` subprocess and its log file."""

    def __init__(self, config: Path, log: Path, out: Path) -> None:
        self.log, self.out = log, out
        with open(out, "ab") as f:
            self.proc = subprocess.Popen(
                watchdog_cmd("--config", str(config), "--log-level", "DEBUG"),
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self) -> str:
        try:
            out = self.out.read_text(errors="replace")[-3000:]
        except OSError:
            out = ""
        return f"--- watchdog log ---\n{self.text()[-6000:]}\n--- its output ---\n{out}"

    def wait(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first match of `pattern` in the log from character `start` on, waiting for it
        at most `timeout` seconds (and failing early if the watchdog exited)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text(), start)
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"the watchdog exited {self.proc.returncode} before "
                                     f"logging /{pattern}/\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"/{pattern}/ not logged within {timeout:.1f} s\n"
                                     f"{self.tail()}")
            time.sleep(0.05)

    def find(self, pattern: str, start: int = 0) -> list[re.Match]:
        return list(re.finditer(pattern, self.text()[start:]))

    def stop(self) -> int:
        return terminate(self.proc, 10)


def log_time(line_match: re.Match, text: str) -> float:
    """The epoch seconds of the log line holding the match (the log has whole seconds)."""
    start = text.rfind("\n", 0, line_match.start()) + 1
    stamp = text[start:start + 19]
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


@pytest.fixture
def pacs(tmp_path: Path):
    """pacs(watchdog={...}, dicom={...}) -> (Supervisor, Watchdog, pacsd.json of the first
    server); the watchdog is stopped first afterwards, then every pacsd (continued first)."""
    started: list[tuple[Supervisor, Watchdog]] = []

    def start(watchdog: dict, **sections) -> tuple[Supervisor, Watchdog, dict]:
        data = tmp_path / "pacsd"
        w = {**watchdog, "log_file": str(tmp_path / "watchdog.log")}
        cfg = write_config(tmp_path / "pacsd.toml", data, watchdog=w, **sections)
        sup = Supervisor(cfg, data, tmp_path / "serve.log").start()
        try:
            info = sup.wait_ready()
        except BaseException:
            sup.stop()
            raise
        dog = Watchdog(cfg, tmp_path / "watchdog.log", tmp_path / "watchdog.out")
        started.append((sup, dog))
        return sup, dog, info

    yield start
    for sup, dog in started:
        for p in sup.procs:
            if p.poll() is None:
                cont(p.pid)
        dog.stop()
        sup.stop()


def healthy_round(dog: Watchdog, pid: int, start: int = 0, timeout: float = 20) -> int:
    """Wait for `watching pacsd pid <pid>` and then a C-ECHO probe that passed (the last of a
    round); the log offset after it."""
    m = dog.wait(rf"watching pacsd pid {pid}\b", timeout, start)
    return dog.wait(r"probe echo ok in", timeout, m.end()).end()


def freeze(pid: int) -> float:
    os.kill(pid, signal.SIGSTOP)
    return time.time()


def report(capsys, record_property, name: str, value: float) -> None:
    record_property(name, round(value, 2))
    with capsys.disabled():
        print(f"\n[watchdog figure] {name}: {value:.2f} s", flush=True)


# --- the tests --------------------------------------------------------------------------------

def test_frozen_server_is_killed_and_restarted(pacs, capsys, record_property):
    sup, dog, info = pacs(FAST)
    pid = info["pid"]
    offset = healthy_round(dog, pid)
    while time.time() < info["started"] + FAST["grace"]:
        time.sleep(0.05)
    t0 = freeze(pid)
    gone = sup.wait_exit(pid, kill_bound(FAST))
    report(capsys, record_property, "freeze_to_kill_s", gone - t0)
    m = dog.wait(rf"killing pacsd pid {pid}: ", 5, offset)
    text = dog.text()
    n = FAST["failures"]
    counted = re.findall(rf"round failed \((\d+)/{n}\): ", text[offset:m.start()])
    assert counted == [str(k) for k in range(1, n + 1)], dog.tail()
    dog.wait(rf"pacsd pid {pid} (stopped after SIGTERM|killed with SIGKILL)", 5, m.end())

    restarted = sup.wait_ready(not_pid=pid)
    new = restarted["pid"]
    assert new != pid and sup.restarts == 1
    dog.wait(rf"watching pacsd pid {new}\b", 20, m.end())
    dog.wait(r"pacsd is healthy again", 20, m.end())
    assert alive(new) and sup.restarts == 1, "the healthy new server was killed too"
    # The kill shows in the new server's /metrics (the watchdog's counts in the data folder).
    from prometheus_client.parser import text_string_to_metric_families
    page = requests.get(f"http://{LOCAL}:{restarted['http_port']}/metrics", timeout=10)
    kills = [s.value for f in text_string_to_metric_families(page.text) for s in f.samples
             if s.name == "pacsd_watchdog_kills_total"]
    assert kills == [1.0], page.text


def test_wedged_index_is_killed(pacs, capsys, record_property):
    sup, dog, info = pacs(FAST)
    pid, url = info["pid"], f"http://{LOCAL}:{info['http_port']}"
    offset = healthy_round(dog, pid)
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    lock = sqlite3.connect(sup.data / "index.sqlite3", isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")   # the write lock; readers still read (WAL)
        t = time.monotonic()
        r = requests.get(f"{url}/testdbalive", timeout=10)
        assert r.status_code == 503 and time.monotonic() - t < 2.5, (r.status_code, r.text)
        # Only the index is wedged: the other two probes still pass.
        assert xmlrpc.client.ServerProxy(f"{url}/RPC2").Ping({}) == {"error": "0"}
        ae = AE(ae_title="WDTEST")
        ae.add_requested_context(Verification)
        assoc = ae.associate(LOCAL, info["dicom_port"], ae_title=info["aet"])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        ae.shutdown()

        t0 = time.time()
        m = dog.wait(rf"killing pacsd pid {pid}: ", kill_bound(FAST), offset)
        sup.wait_exit(pid, FAST["term_wait"] + SLACK)
        report(capsys, record_property, "wedged_index_to_kill_s", time.time() - t0)
    finally:
        lock.close()   # releases the lock: the restarted server needs its index
    failed = [f.group(1) for f in dog.find(r"round failed \(\d+/\d+\): (\w+)", offset)]
    assert failed and set(failed) == {"http"}, dog.tail()
    # The SIGUSR1 before SIGTERM: a server that still runs dumps its threads' stacks.
    assert "most recent call first" in sup.output(), sup.output()
    new = sup.wait_ready(not_pid=pid)["pid"]
    dog.wait(rf"watching pacsd pid {new}\b", 20, m.end())
    dog.wait(r"pacsd is healthy again", 20, m.end())


def test_dicom_side_full_is_killed(pacs):
    sup, dog, info = pacs(FAST, dicom={"max_associations": 2, "network_timeout": 120,
                                       "acse_timeout": 60})
    pid, url = info["pid"], f"http://{LOCAL}:{info['http_port']}"
    offset = healthy_round(dog, pid)
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 120
    held = []
    try:
        for _ in range(2):
            # The watchdog's own C-ECHO may hold a slot for a moment: retry briefly.
            for _attempt in range(20):
                assoc = ae.associate(LOCAL, info["dicom_port"], ae_title=info["aet"])
                if assoc.is_established:
                    held.append(assoc)
                    break
                time.sleep(0.1)
        assert len(held) == 2, "could not fill the server's two association slots"
        third = ae.associate(LOCAL, info["dicom_port"], ae_title=info["aet"])
        assert third.is_rejected, "a third association was not refused"
        r = requests.get(f"{url}/testdbalive", timeout=5)
        assert r.status_code == 200 and "succeeded" in r.text

        m = dog.wait(rf"killing pacsd pid {pid}: ", kill_bound(FAST), offset)
        sup.wait_exit(pid, FAST["term_wait"] + SLACK)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        ae.shutdown()
    failed = [f.group(1) for f in dog.find(r"round failed \(\d+/\d+\): (\w+)", offset)]
    assert "echo" in failed and "http" not in failed and "xmlrpc" not in failed, dog.tail()
    new = sup.wait_ready(not_pid=pid)["pid"]
    dog.wait(rf"watching pacsd pid {new}\b", 20, m.end())


def test_busy_server_is_not_killed(pacs, tmp_path: Path):
    storescu = dcmtk("storescu")
    files = write_series(tmp_path / "files", images=300, size=256)
    sup, dog, info = pacs(FAST, storage={"overwrite": True})
    pid = info["pid"]
    offset = healthy_round(dog, pid)

    def storm(stop_at: float, out: list[int]) -> None:
        while time.monotonic() < stop_at:
            proc = subprocess.run([storescu, "-aec", info["aet"], LOCAL, str(info["dicom_port"]),
                                   *map(str, files)], capture_output=True, timeout=60, check=False,
                                  env=peer_env())
            out.append(proc.returncode)

    stop_at = time.monotonic() + 10
    codes: list[list[int]] = [[], []]
    threads = [threading.Thread(target=storm, args=(stop_at, c)) for c in codes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    text = dog.text()[offset:]
    assert all(codes) and {c for cs in codes for c in cs} == {0}, codes
    rounds = len(re.findall(r"probe echo ok in", text))
    assert rounds >= 5, f"only {rounds} healthy rounds during the storm\n{dog.tail()}"
    assert "killing" not in text, dog.tail()
    assert sup.pids == [pid] and alive(pid)


def test_no_kill_during_the_grace_period(pacs):
    # A grace long enough that a loaded machine (a watchdog a few seconds to start) still
    # freezes the server well inside it: what is asserted does not depend on it.
    w = {**FAST, "grace": 8.0, "failures": 1, "timeout": 0.5}
    sup, dog, info = pacs(w)
    pid, started = info["pid"], info["started"]
    dog.wait(rf"watching pacsd pid {pid}\b", 10)
    t0 = freeze(pid)
    assert t0 < started + w["grace"] - 1.5, "the watchdog took too long to start for this test"
    # Every probe times out well before the grace has passed: no kill yet ...
    while time.time() < started + w["grace"] - 0.1:
        assert alive(pid) and "killing" not in dog.text(), dog.tail()
        time.sleep(0.05)
    # ... and killed once it has.
    gone = sup.wait_exit(pid, kill_bound(w))
    text = dog.text()
    m = re.search(rf"killing pacsd pid {pid}: ", text)
    assert m, dog.tail()
    assert "round failed during the grace period" in text[:m.start()], dog.tail()
    assert log_time(m, text) >= int(started + w["grace"]), dog.tail()
    assert gone - started >= w["grace"]


def test_kill_rate_limit(pacs, tmp_path: Path):
    events = tmp_path / "events.txt"
    w = {**FAST, "timeout": 0.5, "max_kills_per_hour": 1,
         "on_kill": f'echo "$PACSD_WATCHDOG_EVENT $PACSD_WATCHDOG_PID" >> "{events}"'}
    sup, dog, info = pacs(w)
    first = info["pid"]
    offset = healthy_round(dog, first)
    freeze(first)
    sup.wait_exit(first, kill_bound(w))
    second = sup.wait_ready(not_pid=first)["pid"]
    offset = healthy_round(dog, second, offset)

    freeze(second)
    m = dog.wait(rf"NOT killing pacsd pid {second}: 1 kill\(s\) in the last hour", kill_bound(w),
                 offset)
    assert "CRITICAL" in dog.text()[m.start() - 60:m.start()], dog.tail()
    until = time.monotonic() + 3   # it stays frozen and alive: alert only
    while time.monotonic() < until:
        assert alive(second) and sup.pids == [first, second], dog.tail()
        time.sleep(0.1)
    assert not re.search(rf"(?<!NOT )killing pacsd pid {second}:", dog.text()), dog.tail()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and f"alert {second}" not in _read(events):
        time.sleep(0.05)
    lines = _read(events).splitlines()
    assert f"kill {first}" in lines and f"alert {second}" in lines, lines


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("why", ["disk nearly full", "storage folder missing"])
def test_no_kill_when_restarting_cannot_help(pacs, tmp_path: Path, why: str):
    import shutil
    events = tmp_path / "events.txt"
    w = {**FAST, "timeout": 0.5,
         "on_kill": f'echo "$PACSD_WATCHDOG_EVENT $PACSD_WATCHDOG_PID" >> "{events}"'}
    if why == "disk nearly full":
        w["min_free_mb"] = 10**9   # a petabyte
    sup, dog, info = pacs(w)
    pid = info["pid"]
    offset = healthy_round(dog, pid)
    if why == "storage folder missing":
        shutil.rmtree(sup.data / "storage")
    freeze(pid)
    dog.wait(rf"NOT killing pacsd pid {pid}: restarting cannot help: ", kill_bound(w), offset)
    until = time.monotonic() + 2
    while time.monotonic() < until:
        assert alive(pid) and sup.pids == [pid], dog.tail()
        time.sleep(0.1)
    assert not re.search(rf"(?<!NOT )killing pacsd pid {pid}:", dog.text()), dog.tail()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and f"refused {pid}" not in _read(events):
        time.sleep(0.05)
    assert f"refused {pid}" in _read(events).splitlines(), _read(events)
    # Counted for /metrics (pacsd_watchdog_refusals_total), before on_kill ran.
    from pacsd_watchdog.kill import read_counts
    counts = read_counts(sup.data / "watchdog-counts.json")
    assert counts.get("refused", 0) >= 1 and counts.get("kill", 0) == 0, counts


def test_on_kill_runs_after_a_kill(pacs, tmp_path: Path):
    events = tmp_path / "events.txt"
    w = {**FAST, "timeout": 0.5, "failures": 1,
         "on_kill": f'echo "$PACSD_WATCHDOG_EVENT|$PACSD_WATCHDOG_PID|$PACSD_WATCHDOG_REASON"'
                    f' >> "{events}"'}
    sup, dog, info = pacs(w)
    pid = info["pid"]
    healthy_round(dog, pid)
    freeze(pid)
    sup.wait_exit(pid, kill_bound(w))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _read(events).strip():
        time.sleep(0.05)
    lines = _read(events).splitlines()
    assert len(lines) == 1, lines
    event, event_pid, reason = lines[0].split("|", 2)
    assert (event, event_pid) == ("kill", str(pid)) and reason.strip(), lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_watchdog_exits_on_signal(pacs, sig):
    # The default interval: it must not sleep out the 15 s between rounds first.
    sup, dog, info = pacs({"grace": 0.5, "timeout": 2.0})
    healthy_round(dog, info["pid"])
    t = time.monotonic()
    dog.proc.send_signal(sig)
    try:
        code = dog.proc.wait(5)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the watchdog still ran 5 s after {sig.name}\n{dog.tail()}")
    assert code == 0, dog.tail()
    assert time.monotonic() - t < 3
    assert alive(info["pid"]) and sup.pids == [info["pid"]]


def test_roundtrip_probe_on_a_healthy_server(pacs):
    # The C-STORE + C-FIND round trip runs beside the C-ECHO: both must pass on a healthy
    # server, from the first round on (and the stored instance must be found each time).
    w = {**FAST, "roundtrip": True, "timeout": 2.0}
    sup, dog, info = pacs(w)
    pid = info["pid"]
    m = dog.wait(rf"watching pacsd pid {pid}\b", 20)
    for _ in range(3):
        m = dog.wait(r"probe roundtrip ok in", 10, m.end())
    text = dog.text()
    assert "round failed" not in text and "probe roundtrip failed" not in text, dog.tail()
    assert alive(pid) and sup.pids == [pid]
