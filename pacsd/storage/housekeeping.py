"""Housekeeping that must run on one node at a time: each task is done by whichever node holds
its lease in the index (Index.lease), so N nodes sharing an index and a storage volume do it
once, and when that node dies another takes over once the lease has expired.

The tasks:
- tmp-sweep: temporary files older than a day in STORAGE/.tmp (a node that died mid-write and
  never came back; a running node cleans its own folder at start-up);
- alive-marks: health-probe marks (pacsd_meta alive:NODE) of nodes silent for a week;
- outbox-prune: routing jobs done more than a week ago (the dead ones stay until someone acts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacsd.index import Index
from pacsd.index.models import Meta_, starts_with
from pacsd.index.outbox import RouteQueue
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

TMP_MAX_AGE_S = 24 * 3600
ALIVE_MAX_AGE_S = 7 * 24 * 3600
DONE_JOBS_KEPT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[], int]   # how many things it cleaned up


class Housekeeping:
    """A thread that, every `interval` seconds, runs each task whose lease this node holds
    (the lease lasts two intervals, so its holder keeps it while alive even when a round is
    late; a stop gives the leases back)."""

    def __init__(self, index: Index, store: Store, interval: float) -> None:
        self.index, self.store, self.interval = index, store, interval
        self.tasks = (Task("tmp-sweep", lambda: store.sweep(TMP_MAX_AGE_S)),
                       Task("alive-marks", self._forget_silent_nodes),
                       Task("outbox-prune", lambda: RouteQueue(index).prune(DONE_JOBS_KEPT_S)))
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)

    def start(self) -> Housekeeping:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for task in self.tasks:   # the next node need not wait for them to expire
            try:
                self.index.release(task.name)
            except Exception as e:  # noqa: BLE001 - they expire anyway
                log.debug("lease %s not released: %s", task.name, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def run_once(self) -> list[str]:
        """Run the tasks whose lease we hold or take; their names."""
        done = []
        for task in self.tasks:
            try:
                if not self.index.lease(task.name, self.interval * 2):
                    continue
                n = task.run()
                done.append(task.name)
                if n:
                    log.info("housekeeping %s: %d cleaned up", task.name, n)
            except Exception as e:  # noqa: BLE001 - a task fails alone, and again next round
                log.warning("housekeeping %s failed: %s", task.name, e)
        self.rounds += 1
        return done

    def _forget_silent_nodes(self) -> int:
        limit = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - ALIVE_MAX_AGE_S))
        return self.index.submit(lambda: Meta_.delete().where(
            starts_with(Meta_.key, "alive:") & (Meta_.value < limit)).execute())
