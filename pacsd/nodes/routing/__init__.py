"""Auto-routing: the [[routes]] rules, and the threads that empty the outbox.

A rule matches on the calling AE title and on any attribute of the data set (a keyword or a
tag, DICOM wildcards `*` and `?`, a list meaning any of them). `when = "stored"` rules are
checked for each instance as it is stored (Archive.put asks `for_instance`) and their jobs are
queued with the instance's row; `when = "stable"` rules are checked once the study has received
nothing for `[hooks] study_stable_after` seconds, against the study as a whole (any of its
series' modalities, any of its callers), and queue the whole study.

The Router runs two threads on each node:
- the sender claims due jobs per destination, at most `[routing] concurrency` associations at
  once to each, each in a thread of its own (a destination that stops reading holds only its
  own; every send is bounded by the network timeout, pacsd.nodes.remote.send_deadline), sends them (pacsd.nodes.remote.send: stored bytes as they are, or transcoded for a
  destination that wants another syntax), and marks them done, or failed: retried with
  back-off, then dead;
- the stable watcher (one node at a time, under the lease "study-stable") turns quiet studies
  stable: it queues their `stable` routes and calls the on_study_stable hooks.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pacsd import query
from pacsd.nodes import remote
from pacsd.config import Config, Route
from pacsd.accounts import Accounts
from pacsd.imaging.header import read_header
from pacsd.plugins.hooks import Hooks
from pacsd.index import Index
from pacsd.index.models import Instance, Patient, Series, Study, reading
from pacsd.index.outbox import Job, RouteQueue
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

POLL_S = 1.0   # the sender looks for due jobs at least this often (and at once when woken)
STOP_WAIT_S = 15.0   # at stop, how long sends under way may take to finish their image


class _Stopping(Exception):
    """Raised from a send's progress when the server stops: the rest is left for later."""


def _values(value: Any) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, (MultiValue, list, tuple, set)):
        return [str(v) for v in value] or [""]
    return [str(value)]


def matches(route: Route, values: dict[str, Any], callers: Iterable[str]) -> bool:
    """Whether `route` takes what has these attribute `values` (keyword -> value or values),
    sent by these calling AE titles."""
    if route.calling_aets and not set(route.calling_aets) & {c.strip() for c in callers}:
        return False
    for keyword, patterns in route.match:
        have = _values(values.get(keyword))
        # DICOM's wildcards are * and ? only (PS3.4 C.2.2.2.4): '[' is fnmatch's, made literal.
        globs = [pat.replace("[", "[[]") for pat in patterns]
        if not any(fnmatch.fnmatchcase(v.strip(), pat) for v in have for pat in globs):
            return False
    return True


def _dataset_values(ds: Dataset, keys: Iterable[str]) -> dict[str, Any]:
    """The values of these keys (keywords, or 8 hex digits for a tag pydicom has no name for)."""
    out: dict[str, Any] = {}
    for key in keys:
        try:
            elem = ds[int(key, 16)] if re.fullmatch(r"[0-9A-Fa-f]{8}", key) else ds[key]
        except (KeyError, ValueError):
            continue
        out[key] = elem.value
    return out


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
        self._busy: dict[str, int] = {}   # destination -> jobs in flight on this node
        self._lock = threading.Lock()
        # One thread per association under way, not a shared pool: a pool's threads can all
        # be taken by destinations that stopped reading, and the jobs to healthy ones would
        # wait behind them. There are at most `concurrency` per destination, and destinations
        # are the routes' nodes, so this stays bounded.
        self._senders: set[threading.Thread] = set()
        self._threads = [threading.Thread(target=self._send_loop, name="route-sender",
                                          daemon=True),
                         threading.Thread(target=self._stable_loop, name="study-stable",
                                          daemon=True)]
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
        deadline = time.monotonic() + STOP_WAIT_S
        with self._lock:
            senders = list(self._senders)
        for t in senders:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in senders):
            log.warning("routing: a send still waits on its destination at stop; its jobs are "
                        "given back to the queue (sent again later)")
        try:
            self.outbox.release_mine()
        except Exception as e:  # noqa: BLE001 - claims expire anyway
            log.warning("routing: claims not given back at stop: %s", e)

    # --- matching ---------------------------------------------------------------------------

    def for_instance(self, header: Dataset, calling_aet: str) -> list[tuple[str, str]]:
        """(route, destination) of every `stored` rule this instance matches."""
        if not self.stored_routes:
            return []
        out = []
        for route in self.stored_routes:
            values = _dataset_values(header, (k for k, _ in route.match))
            if matches(route, values, [calling_aet]):
                out.append((route.name, route.to))
        if out:
            self._wake.set()
        return out

    def _study_view(self, study_uid: str) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """A stable study as rules and hooks see it: its attributes (the index's, every series'
        modality, the first instance's header for anything else), its callers, and the event
        given to on_study_stable."""
        with reading():
            row = (Study.select(Study, Patient).join(Patient)
                   .where(Study.study_instance_uid == study_uid).first())
            if row is None:
                return {}, [], {}
            series: list[Any] = list(Series.select(Series.modality, Series.series_instance_uid)
                                     .where(Series.study == row.id).tuples())
            first = (Instance.select(Instance.path, Instance.calling_aet).join(Series)
                     .where(Series.study == row.id).order_by(Instance.id).first())
            aets: list[Any] = list(Instance.select(Instance.calling_aet).join(Series)
                                   .where(Series.study == row.id).distinct().tuples())
            callers = sorted({str(a) for (a,) in aets if a})
        values: dict[str, Any] = {}
        if first is not None:
            try:
                with open(self.store.path(first.path), "rb") as f:
                    header = read_header(f)
                for e in header:
                    if e.VR != "SQ":
                        values[e.keyword or f"{e.tag:08X}"] = e.value
            except (OSError, ValueError) as e:
                log.warning("study %s: header of its first instance unreadable: %s", study_uid,
                            e)
        modalities = [m for m, _ in series if m]
        values["Modality"] = modalities or values.get("Modality", "")
        values["ModalitiesInStudy"] = modalities
        event = {"study_uid": study_uid, "patient_id": row.patient.patient_id,
                 "patient_name": row.patient.patient_name, "study_date": row.study_date,
                 "study_time": row.study_time, "accession_number": row.accession_number,
                 "study_description": row.study_description,
                 "modalities": sorted(set(modalities)), "series": len(series),
                 "instances": row.number_of_instances, "calling_aets": callers,
                 "referring_physician_name": row.referring_physician_name,
                 "issuer_of_patient_id": row.patient.issuer_of_patient_id,
                 "patient_birth_date": row.patient.patient_birth_date,
                 "patient_sex": row.patient.patient_sex}
        return values, callers, event

    # --- the stable watcher -----------------------------------------------------------------

    def _stable_loop(self) -> None:
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
            values, callers, event = self._study_view(uid)
            jobs = [(r.name, r.to) for r in self.stable_routes if matches(r, values, callers)]
            if not self.outbox.take_stable(uid, quiet, jobs):
                continue
            n += 1
            if jobs:
                log.info("study %s is stable: queued for %s", uid,
                         ", ".join(f"{d} (route {r})" for r, d in jobs))
                self._wake.set()
            if self.hooks and event:
                self.hooks.notify("on_study_stable", event)
        return n

    # --- the sender -------------------------------------------------------------------------

    def _send_loop(self) -> None:
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
        keys = {"StudyInstanceUID": first.study_uid}
        if all(j.sop_uid for j in jobs):   # only some instances (when = "stored")
            keys["SOPInstanceUID"] = "\\".join(dict.fromkeys(j.sop_uid for j in jobs))
        with reading():
            insts = query.instances(query.Request("IMAGE" if "SOPInstanceUID" in keys
                                                  else "STUDY", keys))
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
