"""Auto-routing: the [[routes]] rules, and the threads that empty the outbox.

A rule matches on the calling AE title and on any attribute of the data set (a keyword or a
tag, DICOM wildcards `*` and `?`, a list meaning any of them). `when = "stored"` rules are
checked for each instance as it is stored (Archive.put asks `for_instance`) and their jobs are
queued with the instance's row; `when = "stable"` rules are checked once the study has received
nothing for `[hooks] study_stable_after` seconds, against the study as a whole (any of its
series' modalities, any of its callers), and queue the whole study.

The Router runs two threads on each node:
- the sender (`sender`) claims due jobs per destination, sends them (pacsd.nodes.remote.send)
  and marks them done, or failed: retried with back-off, then dead;
- the stable watcher (`watcher`; one node at a time, under the lease "study-stable") turns
  quiet studies stable: it queues their `stable` routes and calls the on_study_stable hooks.
Which instances a rule takes is `rules`; what the router reads of the index is
pacsd.query.routing.
"""

from __future__ import annotations

import logging
import threading

from pydicom.dataset import Dataset

from pacsd.accounts import Accounts
from pacsd.config import Config
from pacsd.index import Index
from pacsd.index.outbox import RouteQueue
from pacsd.nodes.routing import rules
from pacsd.nodes.routing.rules import matches
from pacsd.nodes.routing.sender import Sender
from pacsd.nodes.routing.watcher import StableWatcher
from pacsd.plugins.hooks import Hooks
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

__all__ = ["Router", "matches"]


class Router:
    def __init__(self, cfg: Config, index: Index, store: Store, accounts: Accounts,
                 hooks: Hooks | None = None) -> None:
        self.cfg, self.index, self.store = cfg, index, store
        self.accounts, self.hooks = accounts, hooks
        self.outbox = RouteQueue(index)
        self.stored_routes = [r for r in cfg.routes if r.when == "stored"]
        self.stable_routes = [r for r in cfg.routes if r.when == "stable"]
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.sender = Sender(cfg, store, accounts, self.outbox, self._stop, self._wake)
        self.watcher = StableWatcher(cfg, index, store, self.outbox, self.stable_routes, hooks,
                                     self._stop, self._wake)
        self._threads = [self.sender.thread, self.watcher.thread]
        for route in cfg.routes:
            if accounts.node(route.to) is None:
                log.warning("route %s: destination %r is not a known node (yet): add it "
                            "([[nodes]] or the admin page); until then its jobs fail and, after "
                            "[routing] max_attempts tries, go to the dead-letter list",
                            route.name, route.to)

    def start(self) -> Router:
        released = self.outbox.release_mine()
        if released:
            log.info("routing: %d job(s) this node had claimed before a restart are queued "
                     "again", released)
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop within about one image's time: sends under way stop after the image they are
        sending; what they had not sent, and what was claimed but not started, is given back
        to the queue (another node, or this one at its next start, sends it)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)
        self.sender.join_sends()
        try:
            self.outbox.release_mine()
        except Exception as e:  # noqa: BLE001 - claims expire anyway
            log.warning("routing: claims not given back at stop: %s", e)

    def for_instance(self, header: Dataset, calling_aet: str) -> list[tuple[str, str]]:
        """(route, destination) of every `stored` rule this instance matches."""
        if not self.stored_routes:
            return []
        out = rules.for_instance(self.stored_routes, header, calling_aet)
        if out:
            self._wake.set()
        return out

    def wake(self) -> None:
        """Something was queued elsewhere (a DICOM worker's `stored` routes): send it now."""
        self._wake.set()

    def stable_once(self) -> int:
        """Turn the quiet studies stable; how many."""
        return self.watcher.stable_once()

    def dispatch(self) -> int:
        """Claim and start what is due; how many associations were started."""
        return self.sender.dispatch()
