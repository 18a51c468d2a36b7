"""The recent warnings and errors of this run, kept in memory for the admin page.

A logging handler on the root logger holding the last few hundred WARNING-and-worse records,
whatever the log's destination (file, stderr, journald): the IT person sees what went wrong
without a terminal. Messages are formatted once, at emit time.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    time: float
    level: str
    logger: str
    message: str


class Logbook(logging.Handler):
    def __init__(self, capacity: int = 500, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._entries: collections.deque[Entry] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            entry = Entry(record.created, record.levelname, record.name, message[:2000])
        except Exception:   # a broken log call must not break the caller
            return
        with self._guard:
            self._entries.append(entry)

    def recent(self, limit: int = 200) -> list[Entry]:
        """Newest first."""
        with self._guard:
            items = list(self._entries)
        return items[::-1][:max(0, limit)]

    def attach(self) -> "Logbook":
        logging.getLogger().addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)
