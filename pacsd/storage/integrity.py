"""Provable integrity: every stored file is read back and compared with the content hash kept
at ingest (SHA-256 of the data set after the File Meta group, pacsd.storage.archive), by

- the scrubber, a background thread of the server (one node of several, under a lease): first
  the files stored since its last look (each read back once soon after its fsync), then the
  whole archive over and over, paced so that a pass takes [storage] scrub_days and never reads
  faster than [storage] scrub_mb_per_s;
- `pacsd verify` (a study, or everything), on demand.

A file missing, unreadable or changed is recorded in pacsd_damage and logged once at ERROR; from
then on C-GET, C-MOVE and WADO answer a failure for that instance rather than send it
(pacsd.query.matching marks it `damaged`). A later check that finds the file sound again (put
back from a copy) clears the record. Instances stored before hashes were kept get theirs on
their first check.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pacsd.errors import InvalidDataset
from pacsd.index import Index
from pacsd.index.integrity import Checkable
from pacsd.storage.archive import file_content_hash
from pacsd.storage.background import LeasedJob
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

FRESH = "scrub:fresh"        # pacsd_meta: the last instance id read back after its storing
CURSOR = "scrub:cursor"      # the last instance id of the current pass
PASS_BEGAN = "scrub:began"   # when the current pass began (epoch seconds)
PASS_ENDED = "scrub:ended"   # when the last pass ended
BATCH = 200
MIN_RATE = 1 << 20           # bytes/s a pass reads at least (a small archive: done quickly)


@dataclass
class Findings:
    checked: int = 0
    bytes: int = 0
    damaged: list[tuple[Checkable, str, str]] = field(default_factory=list)  # item, problem, hash
    healed: list[str] = field(default_factory=list)


def check(store: Store, item: Checkable) -> tuple[str, str] | None:
    """(problem, what the file hashes to) when the stored file is not what was stored, None
    when it is (or is still being placed). Problems: missing, unreadable, changed."""
    path = store.path(item.path)
    if not os.path.exists(path):
        if store.placing(item.path):
            return None   # its row committed while its fsync runs (Archive.put)
        if not os.path.exists(path):   # (or placed between the two looks)
            return "missing", ""
    try:
        actual = file_content_hash(path)
    except (OSError, InvalidDataset) as e:
        return "unreadable", str(e)[:200]
    if item.content_hash is not None and actual != item.content_hash:
        return "changed", actual
    return None


def check_all(store: Store, index: Index, items: Iterable[Checkable],
              pace: Callable[[int], None] | None = None) -> Findings:
    """Check `items`, record what is damaged (an ERROR line for each new finding) and what is
    sound again; `pace(bytes)` after each file (the scrubber's rate)."""
    found = Findings()
    sound: list[str] = []
    for item in items:
        problem = check(store, item)
        found.checked += 1
        found.bytes += int(item.size or 0)
        if problem is None:
            sound.append(item.sop_instance_uid)
            if item.content_hash is None:   # stored before schema 4: its hash, now
                try:
                    index.set_hash(item.sop_instance_uid, item.path,
                                   file_content_hash(store.path(item.path)))
                except (OSError, InvalidDataset):
                    pass
        else:
            found.damaged.append((item, *problem))
            if index.record_damage(item, problem[0], problem[1]):
                log.error("integrity: SOP Instance %s, file %s: %s; it will not be sent "
                          "(C-GET, C-MOVE and WADO answer a failure for it) until the file is "
                          "put back from a copy (see Integrity in the manual)",
                          item.sop_instance_uid, item.path, _said(item, *problem))
        if pace is not None:
            pace(int(item.size or 0))
    if sound:
        found.healed = _healed(index, sound)
    return found


def _healed(index: Index, sound: list[str]) -> list[str]:
    known = {d.sop_instance_uid for d in index.damage()}
    back = [s for s in sound if s in known]
    if back:
        index.clear_damage(back)
        for sop in back:
            log.warning("integrity: SOP Instance %s is sound again (its file was put back); "
                        "it is sent again", sop)
    return back


def _said(item: Checkable, problem: str, detail: str) -> str:
    if problem == "missing":
        return "the file is missing"
    if problem == "unreadable":
        return f"the file cannot be read ({detail})"
    return (f"the file's content changed since it was stored (SHA-256 {detail[:16]}..., "
            f"stored as {(item.content_hash or '')[:16]}...)")


class Scrubber(LeasedJob):
    """The background check: every TICK seconds, the files stored since the last look, then
    the next stretch of the pass, at a bounded rate. One node of several runs it (lease)."""

    TICK = 5.0
    WORK = 5.0
    LEASE = "scrub"

    def __init__(self, store: Store, index: Index, days: float, mb_per_s: float) -> None:
        super().__init__(index)
        self.store = store
        self.days, self.max_rate = days, mb_per_s * 2**20
        self.checked = 0          # files read back since start
        self.damaged_found = 0
        self._budget = 0.0        # bytes that may be read now
        self._last = time.monotonic()
        self._rate = float(MIN_RATE)

    def run_once(self, seconds: float) -> int:
        """Read back for about `seconds`: new files first, then the pass. Files checked."""
        until = time.monotonic() + seconds
        done = self._fresh(until)
        return done + self._pass(until)

    def _pace(self, size: int) -> None:
        """Sleep as long as reading `size` bytes more needs at the current rate."""
        now = time.monotonic()
        self._budget = min(self._budget + (now - self._last) * self._rate, self._rate)
        self._last = now
        self._budget -= size
        if self._budget < 0:
            self._stop.wait(-self._budget / self._rate)

    def _fresh(self, until: float) -> int:
        last = self.index.cursor(FRESH)
        if last is None:   # first start: what is there already is the passes' work
            self.index.set_cursor(FRESH, float(self.index.last_instance_id()))
            return 0
        self._rate = self.max_rate
        done = 0
        while time.monotonic() < until and not self._stop.is_set():
            items = self.index.checkable_after(int(last), BATCH)
            if not items:
                break
            done += self._check(items)
            last = items[-1].id
            self.index.set_cursor(FRESH, float(last))
        return done

    def _pass(self, until: float) -> int:
        cursor = self.index.cursor(CURSOR)
        began = self.index.cursor(PASS_BEGAN)
        ended = self.index.cursor(PASS_ENDED) or 0.0
        period = self.days * 86400
        if cursor is None or began is None:
            if time.time() - ended < period:
                return 0   # the last pass is recent enough
            cursor, began = 0.0, time.time()
            self.index.set_cursor(CURSOR, 0.0)
            self.index.set_cursor(PASS_BEGAN, began)
        total = self.index.counts()["bytes"]
        self._rate = min(self.max_rate, max(float(MIN_RATE), total / max(period, 1.0)))
        done = 0
        while time.monotonic() < until and not self._stop.is_set():
            items = self.index.checkable_after(int(cursor), BATCH)
            if not items:
                now = time.time()
                log.info("integrity: a pass over the archive is done (began %s); %d damaged "
                         "file(s) on record", time.strftime("%Y-%m-%d %H:%M",
                                                            time.localtime(began)),
                         self.index.damage_count())
                self.index.set_cursor(PASS_ENDED, now)
                self.index.submit(_forget_pass)
                break
            done += self._check(items)
            cursor = float(items[-1].id)
            self.index.set_cursor(CURSOR, cursor)
        return done

    def _check(self, items: list[Checkable]) -> int:
        found = check_all(self.store, self.index, items, pace=self._pace)
        self.checked += found.checked
        self.damaged_found += len(found.damaged)
        return found.checked


def _forget_pass() -> None:
    from pacsd.index.models import Meta_
    Meta_.delete().where(Meta_.key.in_([CURSOR, PASS_BEGAN])).execute()
