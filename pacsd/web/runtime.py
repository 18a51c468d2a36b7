"""What the web side may know of the running server: one typed `Runtime`, built by the daemon
and handed to every sub-app's `make_app`.

A module of its own, importing nothing of `pacsd.web`, so that every sub-app can name the type
without an import cycle through the package's `__init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pacsd.accounts import Accounts
from pacsd.audit import Auditor
from pacsd.config import Config
from pacsd.index.outbox import RouteQueue
from pacsd.logbook import Logbook
from pacsd.plugins.hooks import Hooks
from pacsd.storage.archive import Archive
from pacsd.web.jobs import Jobs


@dataclass
class Runtime:
    """What the web side may know of the running server."""

    cfg: Config
    archive: Archive
    accounts: Accounts
    started: float
    associations: Callable[[], int] = lambda: 0
    logbook: Logbook = field(default_factory=Logbook)
    jobs: Jobs = field(default_factory=Jobs)
    hooks: Hooks | None = None        # the plugins (their HTTP routes, their state)
    outbox: RouteQueue | None = None  # the routing queue (admin page, /api/queue)
    # The DICOM side's counters since start (pacsd.dimse.stats, plus the storage commitment
    # requests pending), as plain data: the web side does not import the DICOM side.
    dicom_stats: Callable[[], dict[str, Any]] = dict
    # DICOM worker processes alive and replaced since start (0, 0: DICOM in this process).
    dicom_workers: Callable[[], tuple[int, int]] = lambda: (0, 0)
    # The audit trail (pacsd.audit): `rt.audit.record(AuditRecord(...))` from any route; the
    # requests themselves are recorded by pacsd.web.audit.AuditTrail.
    audit: Auditor = field(default_factory=Auditor.off)
