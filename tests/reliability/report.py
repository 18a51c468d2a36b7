"""What the reliability tests count, and how big they run.

The tests run quick in CI (scale 1). `benchmarks/soak.py` runs them again and again, bigger
(PACSD_SOAK_SCALE), and sums the figures each test records into PACSD_RELIABILITY_REPORT
(one JSON object per line): associations, stored, kills, bad_inputs, lost, peak_rss_mb, and
the attack figures bomb_peak_rss_mb, health_p99_ms and hang_to_kill_s (worst of the run)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil

SCALE = float(os.environ.get("PACSD_SOAK_SCALE", "1"))
FIGURES = ("associations", "stored", "kills", "bad_inputs", "lost", "peak_rss_mb",
           # the attacks of round 2: the server's peak RSS while bombs are ingested and rendered,
           # the health probe's p99 while slow bodies hold the workers, and the seconds from a
           # server hang (SIGSTOP) to its SIGKILL by the watchdog (defaults).
           "bomb_peak_rss_mb", "health_p99_ms", "hang_to_kill_s")


def scaled(n: float) -> int:
    """`n` at CI size, times the soak scale."""
    return max(1, round(n * SCALE))


def record(test: str, **figures: float) -> None:
    """Add one test's figures to the soak report (nothing outside a soak run)."""
    unknown = set(figures) - set(FIGURES)
    assert not unknown, f"unknown figures {unknown}"
    path = os.environ.get("PACSD_RELIABILITY_REPORT")
    if path:
        with open(Path(path), "a") as f:
            f.write(json.dumps({"test": test, "time": time.time(), **figures}) + "\n")


class PeakMemory:
    """The highest RSS of a process (the server), sampled every 0.1 s while in the block."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
