"""Searching the audit trail: every file under DATA/audit, newest records first, bounded.

Files are read newest first (by modification time: a file holds nothing newer than its last
write); once `limit` matches are kept and the next file is older than the oldest of them,
the older files cannot change the answer and are not read. A line that does not parse (the
end of a file cut by kill -9) is skipped.
"""

from __future__ import annotations

import datetime
import heapq
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

LIMIT_MAX = 10_000


@dataclass
class Search:
    patient: str = ""      # a Patient ID (exact) or a part of a patient's name
    study: str = ""        # a Study Instance UID
    user: str = ""         # a user name or calling AE title (exact, case ignored)
    action: str = ""
    since: float | None = None
    until: float | None = None
    limit: int = 100

    def matches(self, r: dict[str, Any]) -> bool:
        t = r.get("t")
        if not isinstance(t, (int, float)):
            return False
        if (self.since is not None and t < self.since) or (
                self.until is not None and t > self.until):
            return False
        if self.action and r.get("action") != self.action:
            return False
        if self.user and str(r.get("user", "")).lower() != self.user.lower():
            return False
        if self.study and self.study not in (r.get("studies") or ()):
            return False
        if self.patient:
            want = self.patient.lower()
            pats = r.get("patients") or ()
            if not any(isinstance(p, dict) and (str(p.get("id", "")) == self.patient
                                                or want in str(p.get("name", "")).lower())
                       for p in pats):
                return False
        return True


def when(text: str, end: bool = False) -> float:
    """A date or time as people type it -> epoch seconds (local time): 2026-12-07, 2026-12-07
    14:30, an ISO date-time, or an age: 30m, 12h, 7d. `end`: a bare date means its last
    second (for --until). ValueError with what is accepted."""
    text = text.strip()
    age = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if age:
        return time.time() - float(age[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[age[2]]
    try:
        if re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", text):
            day = datetime.datetime.strptime(text.replace("-", ""), "%Y%m%d")
            return (day + datetime.timedelta(days=1 if end else 0)).timestamp() - (
                0.001 if end else 0)
        moment = datetime.datetime.fromisoformat(text.replace(" ", "T", 1))
        return moment.timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is not a date (2026-12-07), a date and time "
                         "(2026-12-07 14:30) or an age (30m, 12h, 7d)") from None


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    yield r
    except OSError:
        return


def search(folder: Path, s: Search) -> list[dict[str, Any]]:
    """The records matching `s`, newest first, at most `s.limit` (and LIMIT_MAX)."""
    limit = max(1, min(LIMIT_MAX, s.limit))
    try:
        files = [(p.stat().st_mtime, p) for p in folder.glob("*.jsonl")]
    except OSError:
        return []
    files.sort(key=lambda f: f[0], reverse=True)
    kept: list[tuple[float, int, dict[str, Any]]] = []   # a min-heap on time
    n = 0
    for mtime, path in files:
        if s.since is not None and mtime < s.since:
            break   # this file and the older ones hold nothing since then
        if len(kept) >= limit and mtime < kept[0][0]:
            break
        for r in _lines(path):
            if not s.matches(r):
                continue
            n += 1
            item = (float(r["t"]), n, r)
            if len(kept) < limit:
                heapq.heappush(kept, item)
            elif item[0] > kept[0][0]:
                heapq.heapreplace(kept, item)
    return [r for _, _, r in sorted(kept, key=lambda k: (k[0], k[1]), reverse=True)]
