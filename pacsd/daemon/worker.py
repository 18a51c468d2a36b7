"""One DICOM worker process (pacsd.daemon.workers), forked by the supervisor's zygote with its
file descriptors: the pipes up and down, the listening socket, the data folder's lock.

It opens what the DICOM side needs (the store, the index with a writer of its own, the accounts,
the plugins) on the configuration its supervisor sends, serves associations from the shared
listening socket, and talks to its supervisor: association slots and log records up, counters
and "stop" down. Migrations, recovery, housekeeping and routing stay with the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import traceback
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from pynetdicom.association import Association

from pacsd import compat, logbook
from pacsd.accounts import Accounts
from pacsd.config import Config
from pacsd.daemon.shared import dump_stacks, new_auditor, notify_stored
from pacsd.dimse import DicomServer
from pacsd.imaging import bounds
from pacsd.index import Index
from pacsd.logbook import DATE_FORMAT, FORMAT, OneLineFormatter
from pacsd.nodes.routing import rules
from pacsd.plugins.hooks import Context, Hooks
from pacsd.storage.archive import Archive
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

REAP_S = 1.0


class Link:
    """The worker's end of the pipe up to its supervisor, shared by every thread. Also its
    association slots (pacsd.dimse.access.Slots): taken before an association is accepted,
    given back when its connection closes or, failing that, once its thread has ended."""

    def __init__(self, up: Connection) -> None:
        self.up = up
        self._lock = threading.Lock()
        self._taken: dict[Association, int] = {}
        self._keys = 0
        self.gone = threading.Event()   # the supervisor is gone: stop at once

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._send(message)

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.up.send(message)
        except OSError:
            self.gone.set()

    def take(self, assoc: Association, address: str) -> str | None:
        with self._lock:
            self._keys += 1
            key = self._keys
            self._send(("take", key, address))
            try:
                answer = self.up.recv()
            except (OSError, EOFError):
                self.gone.set()
                return "the server is stopping"
            if answer is None:
                self._taken[assoc] = key
            return answer   # type: ignore[no-any-return]

    def spell(self, kind: str, on: bool) -> bool:
        """pacsd.logbook.spell, asked of the supervisor (one line for the whole server)."""
        with self._lock:
            self._send(("spell", kind, on))
            try:
                return bool(self.up.recv())
            except (OSError, EOFError):
                self.gone.set()
                return True   # no one else to say it: say it here

    def give(self, assoc: Association) -> None:
        with self._lock:
            key = self._taken.pop(assoc, None)
            if key is not None:
                self._send(("give", key))

    def reap(self) -> None:
        """Give back the slots of associations whose threads ended without a closed-connection
        event (a killed association): a leaked slot would refuse peers for ever."""
        while not self.gone.wait(REAP_S):
            with self._lock:
                ended = [a for a in self._taken if not a.is_alive()]
            for assoc in ended:
                self.give(assoc)


class LinkHandler(logging.Handler):
    """Every record goes up to the supervisor, which logs it as its own."""

    def __init__(self, link: Link) -> None:
        super().__init__()
        self.link = link
        self._stderr = logging.StreamHandler(sys.stderr)
        self._stderr.setFormatter(OneLineFormatter(FORMAT, DATE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.link.gone.is_set():   # no one to write it: standard error, as pacsd writes
            self._stderr.handle(record)
            return
        try:
            fields = {"name": record.name, "levelno": record.levelno,
                      "levelname": record.levelname, "msg": record.getMessage(),
                      "created": record.created, "msecs": record.msecs,
                      "process": record.process, "threadName": record.threadName}
            if record.exc_info:
                fields["exc_text"] = "".join(traceback.format_exception(*record.exc_info))
            self.link.send(("log", fields))
        except Exception:   # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _logging(cfg: Config, link: Link) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(cfg.log_level)
    root.addHandler(LinkHandler(link))
    logging.captureWarnings(True)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if cfg.log_level == "DEBUG"
                                             else logging.WARNING)


def _routes(cfg: Config, link: Link) -> Any:
    """Archive.routes_for in a worker: the `stored` rules, and a word to the supervisor's
    router that there is something to send."""
    stored = [r for r in cfg.routes if r.when == "stored"]
    if not stored:
        return None

    def routes_for(header: Any, calling_aet: str) -> list[tuple[str, str]]:
        out = rules.for_instance(stored, header, calling_aet)
        if out:
            link.send(("routed",))
        return out
    return routes_for


def _index_figures(index: Index) -> dict[str, Any]:
    """This worker's index writer, for /metrics (added up over the workers by the supervisor)."""
    h = index.commit_times.snapshot()
    return {"write_queue": index.queue_depth, "retries": index.retries,
            "commits": {"count": h.count, "total": h.total,
                        "buckets": {str(i): n for i, n in enumerate(h.counts)}}}


def serve(up: Connection, down: Connection, listen: socket.socket) -> int:
    hello = down.recv()[1]
    cfg: Config = hello["cfg"]
    link = Link(up)
    _logging(cfg, link)
    logbook.spell_gate(link.spell)
    signal.signal(signal.SIGUSR1, dump_stacks)
    store = index = hooks = dicom = audit = None
    try:
        compat.enforce()
        bounds.configure(bounds.Limits.from_settings(cfg.dicom))
        store = Store(cfg.storage_path, cfg.storage_min_free_mb, node=hello["node"])
        store.open(clean=False)   # other workers' files are in the same temporary folder
        # The supervisor migrated the schema before it started us.
        index = Index(cfg.index_url, node=hello["node"], pool_size=cfg.index_pool_size,
                      auto_migrate=False).open()
        archive = Archive(store, index, overwrite=cfg.storage_overwrite,
                          patient_mismatch=cfg.storage_patient_mismatch,
                          on_conflict=cfg.storage_on_conflict,
                          trash_days=cfg.storage_trash_days,
                          rejection_notes=cfg.storage_rejection_notes)
        archive.label_rules = cfg.label_rules
        accounts = Accounts(cfg, index).open()
        hooks = Hooks(cfg, Context(cfg.dicom_aet, cfg.data))
        if hooks.has("on_instance_stored"):
            archive.on_stored = partial(notify_stored, hooks, store)
        archive.routes_for = _routes(cfg, link)
        audit = new_auditor(cfg, f"dicom{hello['number']}")
        dicom = DicomServer(cfg, archive, accounts, hooks, listen=listen, slots=link,
                            audit=audit)
        dicom.start()
    except BaseException as e:   # noqa: BLE001 - said to the supervisor, which stops the start
        link.send(("failed", f"{type(e).__name__}: {e}"))
        if dicom is not None:
            dicom.stop(0)
        for part in (store, audit, index, hooks):
            if part is not None:
                part.close()
        return 1
    threading.Thread(target=link.reap, name="slots", daemon=True).start()
    link.send(("ready", os.getpid()))
    timeout = 0.0   # the supervisor gone: no one waits for a drain
    while True:
        try:
            message = down.recv()
        except (EOFError, OSError):
            link.gone.set()
            log.warning("DICOM worker %d (pid %d): the server's process is gone; cutting "
                        "its associations and stopping now", hello["number"], os.getpid())
            break
        if message[0] == "stats":
            down.send({**dicom.figures(), "index": _index_figures(index)})
        elif message[0] == "stop":
            timeout = float(message[1])
            break
    link.gone.set()
    dicom.stop(timeout)
    store.close()
    audit.close()   # before the index: it looks up patients
    flushed = index.close()
    hooks.close()
    return 0 if flushed else 3


def run(fds: list[int]) -> int:
    """A worker on its file descriptors: the pipes up and down, the listening socket, and
    (when given) the data folder's lock, held open for the worker's life."""
    # Ctrl-C in a terminal and systemd's stop signal the whole group: the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    up, down = Connection(fds[0]), Connection(fds[1])
    listen = socket.socket(fileno=fds[2])
    return serve(up, down, listen)


if __name__ == "__main__":   # by hand, for a look at one worker: the supervisor forks them
    sys.exit(run([int(a) for a in sys.argv[1:]]))
