#!/usr/bin/env python3
"""How long a hung pacsd lives, and how long until a fresh one answers, with the DEFAULT
watchdog settings and a restart supervisor that behaves as the systemd unit says.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/hang.py                      # both variants, ~6 minutes
    .venv/bin/python benchmarks/hang.py --variants stop

There is no systemd as PID 1 here: the restart supervisor is EMULATED. It reads `Restart=` and
`RestartSec=` from systemd/pacsd.service and, when `pacsd serve` exits (always, or on failure,
as Restart= says), starts it again RestartSec seconds later, as systemd would. The output says
so. The watchdog is the real `pacsd-watchdog` with the defaults of [watchdog] (only its log file
set; DEBUG, so that its rounds can be seen: it acts the same at any log level).

Variants (each on a fresh data folder; each first waits out the default start-up grace, during
which the watchdog never kills):
  stop     pacsd frozen with SIGSTOP just after a healthy round (the worst phase: the hang
           has the longest to wait for the next round).
  noterm   a real pacsd that ignores SIGTERM (its signal.signal made to install SIG_IGN for
           it, through a wrapper: the server is not edited), made sick by holding a write lock
           on its index from here, just after a healthy round; the lock is released once the
           process is gone, so that the restarted one can start.
Figures: seconds from the hang to the process gone (SIGKILL), and to a new pacsd answering
/testdbalive with 200. 127.0.0.1 only, ports 0, every wait bounded; all processes stopped at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import LOCAL, REPO, terminate

from pacsd.config import WatchdogSettings

UNIT = REPO / "systemd" / "pacsd.service"
IGNORE_SIGTERM = ("import runpy, signal, sys; _set = signal.signal; "
                  "signal.signal = lambda n, h: _set(n, signal.SIG_IGN if n == signal.SIGTERM "
                  "else h); sys.argv = ['pacsd', 'serve', '--config', sys.argv[-1]]; "
                  "runpy.run_module('pacsd', run_name='__main__')")


def unit_restart(path: Path) -> tuple[str, float]:
    """Restart= and RestartSec= of the unit file (systemd's defaults when absent)."""
    restart, sec = "no", 0.1
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(Restart|RestartSec)\s*=\s*(\S+)", line)
        if m and m.group(1) == "Restart":
            restart = m.group(2)
        elif m:
            sec = float(m.group(2).rstrip("s"))
    return restart, sec


class EmulatedSystemd:
    """Starts `cmd` and, as Restart= says, starts it again RestartSec after it exits."""

    def __init__(self, cmd: list[str], log: Path, restart: str, restart_sec: float,
                 max_seconds: float) -> None:
        self.cmd, self.log, self.restart, self.restart_sec = cmd, log, restart, restart_sec
        self.deadline = time.monotonic() + max_seconds
        self.procs: list[subprocess.Popen] = []
        self.exits: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _restarts_after(self, code: int) -> bool:
        return (self.restart == "always"
                or (self.restart == "on-failure" and code != 0)
                or (self.restart == "on-abnormal" and code < 0))

    def _run(self) -> None:
        while time.monotonic() < self.deadline:
            with self._lock:
                if self._stop.is_set():
                    return
                with open(self.log, "ab") as out:
                    proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=REPO)
                self.procs.append(proc)
            while proc.poll() is None and not self._stop.is_set():
                time.sleep(0.02)
            self.exits[proc.pid] = time.monotonic()
            if self._stop.is_set() or not self._restarts_after(proc.returncode):
                return
            if self._stop.wait(self.restart_sec):
                return

    def start(self) -> "EmulatedSystemd":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.kill(p.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                    terminate(p, 10)
        self._thread.join(15)


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"{what}: not within {timeout:.0f} s")


def runinfo(data: Path) -> dict | None:
    try:
        return json.loads((data / "pacsd.json").read_text())
    except (OSError, ValueError):
        return None


def answers(info: dict) -> bool:
    try:
        url = f"http://{LOCAL}:{info['http_port']}/testdbalive"
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (OSError, KeyError):
        return False


def variant(name: str, folder: Path, restart: str, restart_sec: float) -> dict:
    grace = WatchdogSettings().grace
    folder.mkdir(parents=True)
    data = folder / "data"
    cfg = folder / "pacsd.toml"
    wlog = folder / "watchdog.log"
    cfg.write_text("\n".join([
        "[server]", f'data = "{data}"', "[dicom]", "port = 0", f'bind = "{LOCAL}"',
        "[http]", "port = 0", f'bind = "{LOCAL}"', "[log]", f'file = "{folder / "pacsd.log"}"',
        "[watchdog]", f'log_file = "{wlog}"']) + "\n")
    if name == "noterm":
        cmd = [sys.executable, "-c", IGNORE_SIGTERM, "pacsd", "serve", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "pacsd", "serve", "--config", str(cfg)]
    sup = EmulatedSystemd(cmd, folder / "serve.out", restart, restart_sec, grace + 400).start()
    watchdog = None
    lock = None
    try:
        first = wait(lambda: (i := runinfo(data)) and sup.procs and
                     i["pid"] == sup.procs[0].pid and answers(i) and i, 60, "pacsd ready")
        pid = first["pid"]
        with open(folder / "watchdog.out", "ab") as out:
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "pacsd_watchdog", "--config", str(cfg), "--log-level",
                 "DEBUG"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO)
        left = first["started"] + grace - time.time()
        print(f"  [{name}] pacsd pid {pid} up; waiting out the default grace ({left:.0f} s "
              f"left of {grace:g} s)", flush=True)
        time.sleep(max(0.0, left) + 0.1)
        # Just after a round passed: the worst phase.
        seen = len(re.findall(r"probe echo ok in", wlog.read_text(errors="replace")))
        wait(lambda: len(re.findall(r"probe echo ok in", wlog.read_text(errors="replace")))
             > seen, 60, "a healthy watchdog round")
        if name == "stop":
            os.kill(pid, signal.SIGSTOP)
        else:
            lock = sqlite3.connect(data / "index.sqlite3", isolation_level=None, timeout=5)
            lock.execute("BEGIN IMMEDIATE")
        t0 = time.monotonic()
        wait(lambda: pid in sup.exits, 180, f"pacsd pid {pid} gone after the hang")
        gone = sup.exits[pid] - t0
        if lock is not None:
            lock.close()
            lock = None
        again = wait(lambda: (i := runinfo(data)) and i["pid"] != pid and answers(i) and i,
                     120, "a new pacsd answering /testdbalive")
        back = time.monotonic() - t0
        text = wlog.read_text(errors="replace")
        how = re.search(rf"pacsd pid {pid} (stopped after SIGTERM|killed with SIGKILL[^\n]*)",
                        text)
        return {"variant": name, "hang_to_kill_s": round(gone, 1), "hang_to_back_s":
                round(back, 1), "how": how.group(0) if how else "?", "new_pid": again["pid"]}
    finally:
        if lock is not None:
            lock.close()
        if watchdog is not None:
            terminate(watchdog, 10)
        sup.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["stop", "noterm"],
                   choices=["stop", "noterm"])
    p.add_argument("--workdir", type=Path, help="keep the data folders and logs here")
    args = p.parse_args()
    restart, restart_sec = unit_restart(UNIT)
    defaults = WatchdogSettings()
    w = {k: getattr(defaults, k) for k in
         ("interval", "failures", "timeout", "term_wait", "react_wait", "grace")}
    print(f"watchdog defaults: {w}")
    print(f"restart supervisor: EMULATED (no systemd as PID 1 here), from {UNIT.name}: "
          f"Restart={restart}, RestartSec={restart_sec:g}")
    worst = w["failures"] * max(w["interval"], w["timeout"]) + w["timeout"]
    print(f"worst case by the arithmetic: stopped {worst:g} s; no sign of stopping after SIGTERM "
          f"{worst + 0.5 + w['react_wait']:g} s; stopping slowly {worst + 0.5 + w['term_wait']:g}"
          f" s; + RestartSec {restart_sec:g} s + the start-up until /testdbalive answers")
    results = []
    with tempfile.TemporaryDirectory(prefix="pacsd-hang-bench-") as tmp:
        work = args.workdir or Path(tmp)
        for name in args.variants:
            r = variant(name, work / name, restart, restart_sec)
            results.append(r)
            print(f"  [{name}] hang -> SIGKILL {r['hang_to_kill_s']} s; hang -> new pacsd "
                  f"answering /testdbalive {r['hang_to_back_s']} s (emulated systemd); "
                  f"{r['how']}", flush=True)
    for r in results:
        ok = r["hang_to_kill_s"] <= 60 and r["hang_to_back_s"] <= 90
        print(f"{r['variant']:7s} kill {r['hang_to_kill_s']:5.1f} s (bound 60)  back "
              f"{r['hang_to_back_s']:5.1f} s (bound 90)  {'OK' if ok else 'OVER'}")


if __name__ == "__main__":
    main()
