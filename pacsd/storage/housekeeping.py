"""Housekeeping that must run on one node at a time: each task is done by whichever node holds
its lease in the index (Index.lease), so N nodes sharing an index and a storage volume do it
once, and when that node dies another takes over once the lease has expired.

The tasks:
- tmp-sweep: temporary files older than a day in STORAGE/.tmp (a node that died mid-write and
  never came back; a running node cleans its own folder at start-up);
- alive-marks: health-probe marks (pacsd_meta alive:NODE) of nodes silent for a week;
- outbox-prune: routing jobs done more than a week ago (the dead ones stay until someone acts);
- trash-expire: deletions older than [storage] trash_days, out of the recycle bin;
- retention: the enabled [[retention]] rules, studies into the recycle bin;
- trash-room: the oldest deletions out of the bin while the storage volume is near its floor
  (checked every ROOM_CHECK_S, not only once a round: a busy day fills a disk in hours);
- worklist-expire: scheduled steps still not done [worklist] expire_after_days after their
  date and time become EXPIRED (modalities no longer see them);
- worklist-link: open steps whose study has arrived whole (by its Study Instance UID or its
  accession number) are linked to it; the stable watcher does it as each study turns stable,
  this catches the steps made after their study;
- worklist-prune: steps ended more than [worklist] keep_days ago, and their performed steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacsd.config import WorklistSettings
from pacsd.index import Index
from pacsd.index.models import Meta_, starts_with
from pacsd.index.outbox import RouteQueue
from pacsd.storage.retention import Retainer
from pacsd.storage.store import Store
from pacsd.storage.trash import Bin

log = logging.getLogger(__name__)

TMP_MAX_AGE_S = 24 * 3600
ALIVE_MAX_AGE_S = 7 * 24 * 3600
DONE_JOBS_KEPT_S = 7 * 24 * 3600
# Share links expired or revoked are kept this long (the pages list them as such), then go.
ENDED_SHARES_KEPT_S = 30 * 24 * 3600
ROOM_CHECK_S = 30.0


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[], int]   # how many things it cleaned up


class Housekeeping:
    """A thread that, every `interval` seconds, runs each task whose lease this node holds
    (the lease lasts two intervals, so its holder keeps it while alive even when a round is
    late; a stop gives the leases back)."""

    def __init__(self, index: Index, store: Store, interval: float,
                 bin: Bin | None = None, retainer: Retainer | None = None,
                 worklist: WorklistSettings | None = None, stable_after: float = 60.0) -> None:
        self.index, self.store, self.interval = index, store, interval
        tasks = [Task("tmp-sweep", lambda: store.sweep(TMP_MAX_AGE_S)),
                 Task("alive-marks", self._forget_silent_nodes),
                 Task("outbox-prune", lambda: RouteQueue(index).prune(DONE_JOBS_KEPT_S)),
                 Task("shares-prune",
                      lambda: index.forget_shares(time.time() - ENDED_SHARES_KEPT_S))]
        if bin is not None:
            tasks.append(Task("trash-expire", bin.expire))
        if retainer is not None and retainer.rules:
            tasks.append(Task("retention", retainer.run))
        if worklist is not None:
            tasks += worklist_tasks(index, worklist, stable_after)
        self.tasks = tuple(tasks)
        self.room = Task("trash-room", bin.make_room) if bin is not None else None
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)

    def start(self) -> Housekeeping:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        # Leases given back: the next node need not wait for them to expire.
        for task in (*self.tasks, *((self.room,) if self.room else ())):
            try:
                self.index.release(task.name)
            except Exception as e:  # noqa: BLE001 - they expire anyway
                # The index is unreachable: the others would each wait out the writer's
                # retries too, and stopping must not take that long.
                log.debug("lease %s and the next not released: %s", task.name, e)
                break

    def _loop(self) -> None:
        next_round = time.monotonic() + self.interval
        while not self._stop.wait(min(ROOM_CHECK_S, max(0.0, next_round - time.monotonic()))):
            if time.monotonic() >= next_round:
                next_round = time.monotonic() + self.interval
                self.run_once()
            elif self.room is not None:
                self._run(self.room, max(self.interval, ROOM_CHECK_S) * 2)

    def run_once(self) -> list[str]:
        """Run the tasks whose lease we hold or take; their names."""
        done = []
        for task in (*self.tasks, *((self.room,) if self.room else ())):
            if self._run(task, self.interval * 2):
                done.append(task.name)
        self.rounds += 1
        return done

    def _run(self, task: Task, lease_s: float) -> bool:
        """Run one task if its lease is ours; whether it ran."""
        try:
            if not self.index.lease(task.name, lease_s):
                return False
            n = task.run()
            if n:
                log.info("housekeeping %s: %d cleaned up", task.name, n)
            return True
        except Exception as e:  # noqa: BLE001 - a task fails alone, and again next round
            log.warning("housekeeping %s failed: %s", task.name, e)
            return False

    def _forget_silent_nodes(self) -> int:
        limit = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - ALIVE_MAX_AGE_S))
        return self.index.submit(lambda: Meta_.delete().where(
            starts_with(Meta_.key, "alive:") & (Meta_.value < limit)).execute())


def worklist_tasks(index: Index, settings: WorklistSettings, stable_after: float) -> list[Task]:
    """The worklist's chores (module text), as [worklist] asks for them."""
    def expire() -> int:
        cutoff = time.localtime(time.time() - settings.expire_after_days * 86400)
        return index.expire_steps(time.strftime("%Y%m%d", cutoff),
                                  time.strftime("%H%M%S", cutoff))

    tasks = [Task("worklist-link",
                  lambda: len(index.link_arrived(time.time() - stable_after)))]
    if settings.expire_after_days > 0:
        tasks.append(Task("worklist-expire", expire))
    if settings.keep_days > 0:
        tasks.append(Task("worklist-prune",
                          lambda: index.forget_steps(time.time() - settings.keep_days * 86400)))
    return tasks
