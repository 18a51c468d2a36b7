"""The sender: empties the outbox (pacsd.index.outbox).

It claims due jobs per destination, at most `[routing] concurrency` associations at once to
each, each in a thread of its own (a destination that stops reading holds only its own; every
send is bounded by the network timeout, pacsd.nodes.remote.send_deadline), sends them
(pacsd.nodes.remote.send: stored bytes as they are, or transcoded for a destination that wants
another syntax), and marks them done, or failed: retried with back-off, then dead.
"""

from __future__ import annotations

import logging
import threading
import time

from pacsd.accounts import Accounts
from pacsd.config import Config
from pacsd.index.outbox import Job, RouteQueue
from pacsd.nodes import remote
from pacsd.query import routing as reads
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

POLL_S = 1.0   # the sender looks for due jobs at least this often (and at once when woken)
STOP_WAIT_S = 15.0   # at stop, how long sends under way may take to finish their image


class _Stopping(Exception):
    """Raised from a send's progress when the server stops: the rest is left for later."""


class Sender:
    """The thread "route-sender" and the sends it starts. `stop` ends them (after the image
    under way); `wake` makes it look for due jobs at once."""

    def __init__(self, cfg: Config, store: Store, accounts: Accounts, outbox: RouteQueue,
                 stop: threading.Event, wake: threading.Event) -> None:
        self.cfg, self.store, self.accounts, self.outbox = cfg, store, accounts, outbox
        self._stop, self._wake = stop, wake
        self._busy: dict[str, int] = {}   # destination -> jobs in flight on this node
        self._lock = threading.Lock()
        # One thread per association under way, not a shared pool: a pool's threads can all
        # be taken by destinations that stopped reading, and the jobs to healthy ones would
        # wait behind them. There are at most `concurrency` per destination, and destinations
        # are the routes' nodes, so this stays bounded.
        self._senders: set[threading.Thread] = set()
        self.thread = threading.Thread(target=self._loop, name="route-sender", daemon=True)

    def join_sends(self) -> None:
        """Once stopping: wait up to STOP_WAIT_S for the sends under way."""
        deadline = time.monotonic() + STOP_WAIT_S
        with self._lock:
            senders = list(self._senders)
        for t in senders:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in senders):
            log.warning("routing: a send still waits on its destination at stop; its jobs are "
                        "given back to the queue (sent again later)")

    def _loop(self) -> None:
        wait = POLL_S
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.dispatch()
                # Until the next retry comes due, if sooner than the usual look. Due now means
                # its destination is busy: a send that ends wakes us.
                due = self.outbox.next_due_in(POLL_S)
                wait = POLL_S if due == 0 else max(0.05, due)
            except Exception as e:  # noqa: BLE001 - the index may be away; next round
                log.warning("routing: reading the outbox failed: %s", e)
                wait = POLL_S

    def dispatch(self) -> int:
        """Claim and start what is due, within each destination's concurrency: each
        association takes the due jobs of one study. How many associations were started."""
        started = 0
        for dest in self.outbox.destinations():
            while True:
                with self._lock:
                    if self._busy.get(dest, 0) >= self.cfg.routing_concurrency:
                        break
                jobs = self.outbox.claim(dest)
                if not jobs:
                    break
                t = threading.Thread(target=self._run, args=(jobs,), daemon=True,
                                     name=f"route-send-{dest}")
                with self._lock:
                    self._busy[dest] = self._busy.get(dest, 0) + 1
                    self._senders.add(t)
                t.start()
                started += 1
        return started

    def _run(self, jobs: list[Job]) -> None:
        dest = jobs[0].destination
        try:
            error = self._send(jobs)
        except _Stopping:
            log.info("routing: stopping; %d job(s) to %s left in the queue", len(jobs), dest)
            return   # not a failed try: the claims are given back by stop()
        except Exception as e:  # noqa: BLE001 - a failed try, counted below
            error = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._busy[dest] -= 1
                self._senders.discard(threading.current_thread())
        for job in jobs:
            if error is None:
                self.outbox.done(job.id)
                continue
            state = self.outbox.failed(job, error, self.cfg.routing_retry_delay,
                                       self.cfg.routing_max_attempts)
            log.log(logging.ERROR if state == "dead" else logging.WARNING,
                    "routing job %d (route %s, study %s) to %s failed (try %d of %d): %s%s",
                    job.id, job.route, job.study_uid, dest, job.attempts + 1,
                    self.cfg.routing_max_attempts, error,
                    "; it is in the dead-letter list (admin page, `pacsd queue`)"
                    if state == "dead" else "")
        self._wake.set()   # a slot is free

    def _send(self, jobs: list[Job]) -> str | None:
        """Send the jobs' instances (all of one study) over one association; None on success,
        else what went wrong."""
        first = jobs[0]
        node = self.accounts.node(first.destination)
        if node is None:
            return f"{first.destination!r} is not a known node"
        # Only some instances (when = "stored"), or the whole study.
        sops = [j.sop_uid for j in jobs] if all(j.sop_uid for j in jobs) else []
        insts = reads.instances_to_send(first.study_uid, sops)
        if not insts:
            log.info("routing: nothing of study %s is stored any more; %d job(s) done",
                     first.study_uid, len(jobs))
            return None
        renewed = [time.monotonic()]

        def progress(done: int, failed: int, total: int | None) -> None:
            if self._stop.is_set():
                raise _Stopping
            if time.monotonic() - renewed[0] > 60:   # a long send keeps its claims
                renewed[0] = time.monotonic()
                for job in jobs:
                    self.outbox.renew(job.id)

        completed, failed = remote.send(self.cfg, node, insts, self.store, progress)
        if failed:
            return f"{failed} of {len(insts)} instance(s) not accepted by {node.aet}"
        log.info("routing: %d instance(s) of study %s sent to %s (%d job(s), route(s) %s)",
                 completed, first.study_uid, node.name, len(jobs),
                 ", ".join(sorted({j.route for j in jobs})))
        return None
