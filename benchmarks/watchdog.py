#!/usr/bin/env python3
"""What pacsd-watchdog costs while the server is healthy, and how fast it acts on a frozen one.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/watchdog.py                  # interval 10 s, sampled 120 s
    .venv/bin/python benchmarks/watchdog.py --interval 1 --seconds 30

1. Idle cost: a `pacsd serve` and a `pacsd-watchdog` at --interval (default: the default
   setting, 10 s) and its INFO log; the watchdog process is sampled with psutil every --sample
   seconds for --seconds: CPU as a percentage of one core (cpu_times delta / wall time), peak
   RSS and peak USS (memory_full_info). It logs at INFO, as in production (DEBUG writes three
   lines a round).
2. Freeze to kill: a fresh `pacsd serve` and a watchdog with interval 1, failures 3, timeout 2,
   term_wait 2 (and the smallest grace; the setting must be > 0); once a round has passed,
   pacsd is frozen with SIGSTOP and the time until it is gone is printed, with the bound the
   settings imply ((failures + 1) x max(interval, timeout) + 0.5 s for the stack dump +
   term_wait: the probes of a round run in parallel).

127.0.0.1 only, ports 0, every loop bounded; every process is continued and stopped at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import LOCAL, REPO, terminate

from pacsd.config import WatchdogSettings


def watchdog_cmd(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "pacsd-watchdog"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "pacsd_watchdog", *args]


def write_config(folder: Path, watchdog: dict[str, object]) -> Path:
    data = folder / "data"
    lines = ["[server]", f'data = "{data}"', "[dicom]", "port = 0", f'bind = "{LOCAL}"',
             "[http]", "port = 0", f'bind = "{LOCAL}"', "[log]", f'file = "{folder / "pacsd.log"}"',
             "[watchdog]", f'log_file = "{folder / "watchdog.log"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in watchdog.items()]
    cfg = folder / "pacsd.toml"
    folder.mkdir(parents=True, exist_ok=True)
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


class Run:
    """One pacsd serve + one pacsd-watchdog on a config; stop() continues and ends both."""

    def __init__(self, folder: Path, watchdog: dict[str, object], log_level: str) -> None:
        self.folder = folder
        self.cfg = write_config(folder, watchdog)
        self.data = folder / "data"
        self.log = folder / "watchdog.log"
        self.procs: list[subprocess.Popen] = []
        self.pacsd = self._spawn([sys.executable, "-m", "pacsd", "serve", "--config",
                                  str(self.cfg)], folder / "serve.out")
        self.info = self._wait_ready(60)
        self.watchdog = self._spawn(watchdog_cmd("--config", str(self.cfg), "--log-level",
                                                 log_level), folder / "watchdog.out")

    def _spawn(self, cmd: list[str], out: Path) -> subprocess.Popen:
        with open(out, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=REPO)
        self.procs.append(proc)
        return proc

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pacsd.poll() is not None:
                raise SystemExit(f"pacsd exited {self.pacsd.returncode}; see {self.folder}")
            try:
                info = json.loads((self.data / "pacsd.json").read_text())
                if info["pid"] == self.pacsd.pid:
                    return info
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise SystemExit(f"pacsd was not ready within {timeout:.0f} s")

    def wait_log(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.watchdog.poll() is not None:
                raise SystemExit(f"pacsd-watchdog exited {self.watchdog.returncode}; see "
                                 f"{self.folder}")
            try:
                m = re.search(pattern, self.log.read_text(errors="replace"))
            except OSError:
                m = None
            if m:
                return m.group(0)
            time.sleep(0.05)
        raise SystemExit(f"/{pattern}/ not in {self.log} within {timeout:.0f} s")

    def stop(self) -> None:
        for proc in reversed(self.procs):   # the watchdog first: it must not act on the stop
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                terminate(proc)


def idle_cost(folder: Path, interval: float, seconds: float, every: float) -> None:
    run = Run(folder, {"interval": interval}, "INFO")
    try:
        run.wait_log(rf"watching pacsd pid {run.info['pid']}\b", 60)
        proc = psutil.Process(run.watchdog.pid)
        cpu0, t0 = proc.cpu_times(), time.monotonic()
        rss = uss = 0
        end = t0 + seconds
        while True:
            mem = proc.memory_full_info()
            rss, uss = max(rss, mem.rss), max(uss, mem.uss)
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(min(every, end - now))
        cpu1, wall = proc.cpu_times(), time.monotonic() - t0
        used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        alive = run.pacsd.poll() is None
        print(f"idle: interval {interval:g} s, sampled {wall:.0f} s "
              f"(~{wall / interval:.0f} rounds)")
        print(f"  CPU   {100 * used / wall:.3f} % of one core ({used:.2f} s CPU)")
        print(f"  RSS   {rss / 2**20:.1f} MiB max")
        print(f"  USS   {uss / 2**20:.1f} MiB max")
        print(f"  pacsd still running, same pid: {alive}")
    finally:
        run.stop()


def freeze_to_kill(folder: Path) -> None:
    w = {"interval": 1.0, "failures": 3, "timeout": 2.0, "grace": 0.01, "term_wait": 2.0}
    run = Run(folder, w, "DEBUG")
    pid = run.info["pid"]
    try:
        run.wait_log(rf"watching pacsd pid {pid}\b[\s\S]*probe echo ok in", 60)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        # The probes run in parallel, so a failing round lasts max(interval, timeout); the
        # round under way when it froze may pass; SIGUSR1 gets half a second for its dump.
        bound = ((w["failures"] + 1) * max(w["interval"], w["timeout"]) + 0.5
                 + w["term_wait"])
        try:
            run.pacsd.wait(bound + 60)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"pacsd pid {pid} still running {bound + 60:.0f} s after SIGSTOP")
        took = time.monotonic() - t0
        how = run.wait_log(rf"pacsd pid {pid} (stopped after SIGTERM|killed with SIGKILL)", 10)
        print(f"freeze to kill: {took:.1f} s (interval 1, failures 3, timeout 2, term_wait 2; "
              f"bound {bound:.1f} s); {how}")
    finally:
        run.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float,
                   default=WatchdogSettings().interval,
                   help="watchdog interval, idle phase (default: the setting's default)")
    p.add_argument("--seconds", type=float, default=120.0, help="how long to sample it")
    p.add_argument("--sample", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--workdir", type=Path, help="keep the data folders and logs here")
    args = p.parse_args()
    if args.workdir:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
        idle_cost(work / "idle", args.interval, args.seconds, args.sample)
        freeze_to_kill(work / "freeze")
        return
    with tempfile.TemporaryDirectory(prefix="pacsd-watchdog-bench-") as tmp:
        idle_cost(Path(tmp) / "idle", args.interval, args.seconds, args.sample)
        freeze_to_kill(Path(tmp) / "freeze")


if __name__ == "__main__":
    main()
