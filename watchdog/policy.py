"""When to act. Pure logic over time and probe results: no processes, no sockets."""

from __future__ import annotations

import collections
from dataclasses import dataclass

KEEP, KILL, ALERT = "keep", "kill", "alert"


@dataclass(frozen=True)
class Decision:
    action: str          # KEEP, KILL or ALERT (should kill, but the rate limit says no)
    failed: int          # consecutive failed rounds so far (outside the grace period)
    in_grace: bool
    recovered: bool      # this round passed after failed ones


class Policy:
    """`failures` consecutive failed rounds after the grace period mean a kill, unless
    `max_kills_per_hour` kills already happened in the last hour: then an alert only (a server
    that hangs again at once is not helped by a kill loop)."""

    def __init__(self, *, grace: float, failures: int, max_kills_per_hour: int) -> None:
        self.grace, self.failures, self.max_kills = grace, failures, max_kills_per_hour
        self.kills: collections.deque[float] = collections.deque()
        self.failed = 0
        self._was_failing = False

    def reset(self) -> None:
        """Count failures from zero again (a new server process, or after an alert). Whether
        it was failing is kept: its next passing round is a recovery."""
        self.failed = 0

    def kills_last_hour(self, now: float) -> int:
        while self.kills and now - self.kills[0] > 3600:
            self.kills.popleft()
        return len(self.kills)

    def observe(self, ok: bool, *, now: float, started: float) -> Decision:
        in_grace = now - started < self.grace
        if ok:
            recovered = self._was_failing
            self.failed, self._was_failing = 0, False
            return Decision(KEEP, 0, in_grace, recovered)
        self._was_failing = True
        if in_grace:
            return Decision(KEEP, 0, True, False)
        self.failed += 1
        if self.failed < self.failures:
            return Decision(KEEP, self.failed, False, False)
        if self.kills_last_hour(now) >= self.max_kills:
            return Decision(ALERT, self.failed, False, False)
        return Decision(KILL, self.failed, False, False)

    def killed(self, now: float) -> None:
        self.kills.append(now)
        self.reset()
