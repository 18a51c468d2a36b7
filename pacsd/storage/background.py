"""A background job of the server that one node of several runs at a time: every `TICK`
seconds, if this node holds (or takes) the job's lease in the index, one round of `run_once`
for about `WORK` seconds. The scrubber and the compressor are such jobs."""

from __future__ import annotations

import logging
import threading
from typing import Self

from pacsd.index import Index

log = logging.getLogger(__name__)


class LeasedJob:
    TICK = 5.0
    WORK = 5.0
    LEASE = "job"     # the lease's name, and the thread's

    def __init__(self, index: Index) -> None:
        self.index = index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.LEASE, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        try:
            self.index.release(self.LEASE)   # the next node need not wait for it to expire
        except Exception as e:  # noqa: BLE001 - it expires anyway
            log.debug("lease %s not released: %s", self.LEASE, e)

    def _loop(self) -> None:
        while not self._stop.wait(self.TICK):
            try:
                if self.index.lease(self.LEASE, self.TICK * 6):
                    self.run_once(self.WORK)
            except Exception as e:  # noqa: BLE001 - the next tick tries again
                log.warning("%s round failed: %s", self.LEASE, e)

    def run_once(self, seconds: float) -> object:
        raise NotImplementedError
