"""How long the index writer's commits take: a histogram with fixed buckets, kept in memory
since start, for /metrics (Prometheus' histogram: cumulative bucket counts, sum, count)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Seconds. A group commit on a local SSD takes a few ms; a slow disk or a busy PostgreSQL tens
# to hundreds; beyond 5 s the C-STOREs waiting on it risk their peers' DIMSE timeouts.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Histogram:
    """A copy taken at one moment: counts[i] are observations <= bounds[i] (cumulative);
    `count` includes those above the last bound (+Inf)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    total: float


class CommitTimes:
    """Observed by the writer thread, read by a scrape: one lock, no allocation per commit."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * len(bounds)   # per bucket, not cumulative
        self._count = 0
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._count += 1
            self._total += seconds
            for i, bound in enumerate(self.bounds):
                if seconds <= bound:
                    self._counts[i] += 1
                    break

    def snapshot(self) -> Histogram:
        with self._lock:
            running, cumulative = 0, []
            for n in self._counts:
                running += n
                cumulative.append(running)
            return Histogram(self.bounds, tuple(cumulative), self._count, self._total)
