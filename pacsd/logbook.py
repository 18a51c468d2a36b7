"""The recent warnings and errors of this run, kept in memory for the admin page.

A logging handler on the root logger holding the last few hundred records an administrator
should act on (`for_admin`), whatever the log's destination (file, stderr, journald): the IT
person sees what went wrong without a terminal. Messages are formatted once, at emit time. At
start-up it first reads those of the previous runs from the tail of the log file, so that after
a crash and a restart the reason is still on the admin page.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The one line format of pacsd's and the watchdog's logs, and how preload() reads it back:
# "2026-11-25 01:31:38 WARNING pacsd.web: message"
FORMAT, DATE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (WARNING|ERROR|CRITICAL) +(\S+): (.*)")
TAIL_BYTES = 1 << 20
LEVELS = {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


# Characters that end or rewrite a line for a terminal, a log reader or str.splitlines (which
# preload uses): C0 controls but the tab, DEL, C1 controls (NEL), the Unicode separators.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """`text` with line breaks and other control characters written as escapes (\\n,
    \\x1b): whatever a client put in a path, header or AE title stays on its log line."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    """FORMAT, with each record's message on one line: the root fix against forged log lines.

    Escaping here, where a record becomes text, covers every call site and every library
    (a request path, an XML-RPC method name, an AE title, a user name) without each having to
    remember it. A traceback keeps its lines, each indented, so that no line of it can pass
    for a record of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + printable(line) for line in text.splitlines())


# Libraries whose warnings and errors are noise in pacsd's log: pynetdicom's TCP and PDU errors
# (a peer that resets the connection after a normal release, CTN does), pydicom's VR warnings
# on ingest, the codecs' messages for images that decode. pacsd says what happened in its own
# words (refused with 0xC000: ..., association aborted, ...); theirs stay for DEBUG. Python
# warnings come through logging.captureWarnings as "py.warnings".
NOISY = ("pynetdicom", "pydicom", "pylibjpeg", "openjpeg", "libjpeg", "PIL", "py.warnings")
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _ours(record: logging.LogRecord) -> bool:
    """Whether a library's record is about a fault of pacsd's own code, reported through the
    library (an exception raised in one of our pynetdicom handlers): that stays an error.
    Transport failures (OSError) are the peer's doing, wherever the stack passed through."""
    if "handler bound to" in record.getMessage():
        return True
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or isinstance(exc, OSError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            return True
        tb = tb.tb_next
    return False


def is_noise(record: logging.LogRecord) -> bool:
    name = record.name
    return (record.levelno > logging.DEBUG
            and any(name == lib or name.startswith(lib + ".") for lib in NOISY)
            and not _ours(record))


class LibraryNoise(logging.Filter):
    """Demote the records of NOISY libraries to DEBUG (unless `_ours`), then let a record
    through only if it reaches `level`. One filter on every handler of pacsd's log and on the
    Logbook: no call site has to remember it. A record is demoted once; the handlers after the
    first see it as DEBUG."""

    def __init__(self, level: int | str = logging.INFO) -> None:
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        if is_noise(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


def log_to(level: str, handlers: list[logging.Handler]) -> None:
    """Make `handlers` the root logger's, all writing FORMAT, one line per record, with the
    libraries' noise demoted (LibraryNoise)."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fmt = OneLineFormatter(FORMAT, DATE_FORMAT)
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(LibraryNoise(level))
        root.addHandler(handler)
    logging.captureWarnings(True)   # pydicom's warnings.warn too, as records (then demoted)


class Spells:
    """Conditions that begin and end (the index's volume full), logged once for the whole
    server: its own process and each DICOM worker (pacsd.daemon.workers) meet them on their
    own. A holder that meets one asks `change(kind, True)`: True if the spell begins with it (log
    it). When one of the holders is through (`change(kind, False)`), the spell ends for all: True
    (log that). A holder that is gone (a dead worker) is dropped (`forget`)."""

    def __init__(self) -> None:
        self._holders: dict[str, set[object]] = {}
        self._lock = threading.Lock()

    def change(self, kind: str, on: bool, holder: object = "server") -> bool:
        with self._lock:
            holders = self._holders.setdefault(kind, set())
            if on:
                began = not holders
                holders.add(holder)
                return began
            if holder in holders:
                holders.clear()
                return True
            return False

    def clear(self) -> None:
        """A new run (of an in-process server: tests) begins with none."""
        with self._lock:
            self._holders.clear()

    def forget(self, holder: object) -> None:
        with self._lock:
            for holders in self._holders.values():
                holders.discard(holder)


SPELLS = Spells()   # this process's; a DICOM worker asks its supervisor's instead (spell_gate)
_gate: Callable[[str, bool], bool] = SPELLS.change


def spell(kind: str, on: bool) -> bool:
    """Whether to log that `kind` begins (on) or ends (off) here: once per server (Spells)."""
    return _gate(kind, on)


def spell_gate(gate: Callable[[str, bool], bool]) -> None:
    """Where `spell` asks (a DICOM worker: its supervisor, over its pipe)."""
    global _gate
    _gate = gate


def rotating_file(path: Path, max_mb: int, backups: int) -> logging.Handler:
    """A log file that rotates at `max_mb` MiB, keeping `backups` old ones; OSError if it
    cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(path, maxBytes=max_mb << 20, backupCount=backups,
                                                encoding="utf-8")


# What the admin page's "recent errors" shows (issue 19): what an administrator should act on,
# by one rule that the live records and those read back from the log file both pass:
# - ERROR and worse from pacsd's own code: something broke (a stored file unreadable, the index
#   failing, a bug);
# - WARNING from the parts of pacsd that work with other systems and keep the archive: an
#   association refused, a send, retrieve or routing job that failed, a full disk or index, an
#   unclean stop, a plugin that fails or gives up a delivery, a library patch that no longer
#   fits, a job started from the pages that failed, password guessing (HTTP Basic throttle).
# Not shown: the libraries' records (LibraryNoise), anything below WARNING (per-request
# detail, which is also where patient data may be, at DEBUG), and the warnings of single web
# requests (a 4xx answer, a refused Host, a slow body, a failed log-in, the admin page's own
# changes), of the ZIP builder and of one-shot commands: the log file has them all.
ACT_ON = ("pacsd.dimse", "pacsd.nodes", "pacsd.storage", "pacsd.index", "pacsd.plugins",
          "pacsd.daemon", "pacsd.compat", "pacsd.accounts", "pacsd.web.jobs", "pacsd.web.auth",
          "watchdog")
OURS = ("pacsd", "watchdog")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def for_admin(levelno: int, logger: str) -> bool:
    """Whether a record of this level and logger belongs in the admin page's recent errors
    (the rule above)."""
    if levelno >= logging.ERROR:
        return _under(logger, OURS)
    return levelno >= logging.WARNING and _under(logger, ACT_ON)


class ForAdmin(logging.Filter):
    """`for_admin`, plus a library's error that reports a fault of pacsd's own code (an
    exception in one of our pynetdicom handlers: `_ours`), which counts as pacsd's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (for_admin(record.levelno, record.name)
                or (record.levelno >= logging.ERROR and _ours(record)))


@dataclass(frozen=True)
class Entry:
    time: float
    level: str
    logger: str
    message: str


class Logbook(logging.Handler):
    def __init__(self, capacity: int = 500, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.addFilter(LibraryNoise(level))   # "recent errors" are pacsd's, not the libraries'
        self.addFilter(ForAdmin())            # and only what an administrator acts on
        self._entries: collections.deque[Entry] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = printable(record.getMessage())
            if record.exc_info and record.exc_info[1] is not None:
                message += printable(f" ({type(record.exc_info[1]).__name__}: "
                                     f"{record.exc_info[1]})")
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

    def preload(self, path: Path | None) -> int:
        """Take the warnings and errors in the last megabyte of the log file; how many."""
        if path is None:
            return 0
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - TAIL_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return 0
        found = []
        for line in text.splitlines():
            m = LINE.match(line)
            if m and for_admin(LEVELS[m.group(2)], m.group(3)):
                when = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                found.append(Entry(when, m.group(2), m.group(3), m.group(4)[:2000]))
        with self._guard:
            self._entries.extendleft(reversed(found[-(self._entries.maxlen or 0):]))
        return len(found)

    def attach(self) -> "Logbook":
        logging.getLogger().addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger().removeHandler(self)
