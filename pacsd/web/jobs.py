"""Background work started from the pages (send a study, retrieve from a node), with progress.

A job runs on a small pool of threads so that a page asking for ten retrieves does not open
ten associations at once; the page polls /api/jobs/<id>. Jobs live in memory: they are short,
and what they move is durable on arrival (the C-STORE path), so a restart loses only the
progress bar. The last `KEEP` jobs are remembered.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

KEEP = 100


@dataclass
class Job:
    id: str
    kind: str
    title: str
    state: str = "queued"          # queued -> running -> done | failed
    total: int | None = None
    done: int = 0
    failed: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def progress(self, done: int, failed: int, total: int | None) -> None:
        self.done, self.failed, self.total = done, failed, total

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Jobs:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, title: str, work: Callable[[Job], str]) -> Job:
        """Queue `work(job)`; it reports progress on the job and returns the closing message.
        An exception fails the job with its message."""
        job = Job(id=f"{int(time.time())}-{next(self._ids)}", kind=kind, title=title)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP:
                self._jobs.popitem(last=False)

        def run() -> None:
            job.state = "running"
            try:
                job.message = work(job)
                job.state = "failed" if job.failed and not job.done else "done"
            except Exception as e:  # noqa: BLE001 - shown on the page and logged
                job.state, job.message = "failed", str(e)
                log.warning("%s failed: %s", title, e)
            job.ended = time.time()
        self._pool.submit(run)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def recent(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())[::-1]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
