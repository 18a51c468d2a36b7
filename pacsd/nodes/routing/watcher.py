"""The stable watcher: notices studies that have received nothing for `[hooks]
study_stable_after` seconds (the index's study activity, pacsd.index.outbox), queues their
`when = "stable"` routes, calls the on_study_stable hooks and warms the study's DICOMweb
metadata (`[storage] warm_metadata`), and links it to the worklist steps it was made for.

One node at a time watches, under the lease "study-stable"; taking a study stable and queuing
its jobs is one transaction (RouteQueue.take_stable), so a study turns stable once.
"""

from __future__ import annotations

import logging
import threading

from pacsd.config import Config, Route
from pacsd.index import Index
from pacsd.index.outbox import RouteQueue
from pacsd.nodes.routing.rules import matches, study_view
from pacsd.plugins.hooks import Hooks
from pacsd.query.routing import instances_to_send
from pacsd.storage import metadata
from pacsd.storage.store import Store

log = logging.getLogger(__name__)


class StableWatcher:
    """The thread "study-stable". `stop` ends it; `wake` is set when jobs were queued (the
    sender's cue)."""

    def __init__(self, cfg: Config, index: Index, store: Store, outbox: RouteQueue,
                 routes: list[Route], hooks: Hooks | None, stop: threading.Event,
                 wake: threading.Event) -> None:
        self.cfg, self.index, self.store, self.outbox = cfg, index, store, outbox
        self.routes, self.hooks = routes, hooks
        self._stop, self._wake = stop, wake
        self.thread = threading.Thread(target=self._loop, name="study-stable", daemon=True)

    def _loop(self) -> None:
        quiet = self.cfg.hooks_study_stable_after
        every = min(max(quiet / 4, 0.2), 30.0)
        lease = max(every * 4, 10.0)
        while not self._stop.wait(every):
            try:
                if self.index.lease("study-stable", lease):
                    self.stable_once()
            except Exception as e:  # noqa: BLE001 - tried again next round
                log.warning("routing: looking for stable studies failed: %s", e)

    def stable_once(self) -> int:
        """Turn the quiet studies stable; how many."""
        quiet = self.cfg.hooks_study_stable_after
        n = 0
        for uid in self.outbox.stable_studies(quiet):
            values, callers, event = study_view(self.store, uid)
            jobs = [(r.name, r.to) for r in self.routes if matches(r, values, callers)]
            if not self.outbox.take_stable(uid, quiet, jobs):
                continue
            n += 1
            if jobs:
                log.info("study %s is stable: queued for %s", uid,
                         ", ".join(f"{d} (route {r})" for r, d in jobs))
                self._wake.set()
            if self.cfg.worklist.enabled:
                self._link(uid)
            if self.cfg.storage.warm_metadata:   # before the hooks: "available" means fast
                self._warm(uid)
            if self.hooks and event:
                self.hooks.notify("on_study_stable", event)
        return n

    def _link(self, uid: str) -> None:
        """The worklist steps this study was made for are done (pacsd.index.worklist)."""
        try:
            n = self.index.link_study(uid)
            if n:
                log.info("study %s arrived: linked to %d scheduled step(s) of the worklist",
                         uid, n)
        except Exception as e:  # noqa: BLE001 - housekeeping's worklist-link tries again
            log.warning("study %s: linking it to its worklist order failed: %s", uid, e)

    def _warm(self, uid: str) -> None:
        """The study's DICOMweb metadata into the cache (pacsd.storage.metadata), now that it
        is complete: its first WADO-RS metadata request then reads no header."""
        try:
            stored = [(i.path, i.transfer_syntax_uid) for i in instances_to_send(uid)]
            n = metadata.warm(self.store, stored)
            log.debug("study %s: metadata of %d instance(s) cached", uid, n)
        except Exception as e:  # noqa: BLE001 - the cache is only an aid; first use builds it
            log.debug("study %s: metadata not cached: %s", uid, e)
