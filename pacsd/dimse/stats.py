"""What the DICOM side has done since the server started, for /metrics (pacsd.web.metrics):
associations accepted and refused, C-STORE responses by status, and every DIMSE request by
operation. Counters in memory, each bumped under one lock: a scrape costs a copy of a few small
dicts, never a query.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.events import Event

# pynetdicom's DIMSE message classes (C_ECHO_RQ, N_ACTION_RQ...) -> the operation's name.
_REQUEST_SUFFIX = "_RQ"


def status_of(result: int | Dataset) -> int:
    """The Status a C-STORE handler answered (an int, or a Dataset carrying Status)."""
    if isinstance(result, Dataset):
        return int(getattr(result, "Status", -1))
    return int(result)


class DimseStats:
    """Counters since start; `snapshot()` is what /metrics reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.accepted = 0
        self.rejected: dict[str, int] = {}      # why -> associations refused
        self.stores: dict[int, int] = {}        # C-STORE response status -> count
        self.requests: dict[str, int] = {}      # "C-FIND" -> requests received

    def association_accepted(self) -> None:
        with self._lock:
            self.accepted += 1

    def association_rejected(self, why: str) -> None:
        with self._lock:
            self.rejected[why] = self.rejected.get(why, 0) + 1

    def stored(self, result: int | Dataset) -> None:
        status = status_of(result)
        with self._lock:
            self.stores[status] = self.stores.get(status, 0) + 1

    def on_dimse_recv(self, event: Event) -> None:
        """EVT_DIMSE_RECV: one count per request message (responses, e.g. the C-STORE-RSPs a
        C-GET requestor sends back, are not requests)."""
        name = type(event.message).__name__
        if not name.endswith(_REQUEST_SUFFIX):
            return
        self.requested(name[:-len(_REQUEST_SUFFIX)].replace("_", "-"))

    def requested(self, op: str) -> None:
        """One request of `op` ("C-STORE") received (the fast lane counts its own here)."""
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"associations_accepted": self.accepted,
                    "associations_rejected": dict(self.rejected),
                    "stores": dict(self.stores), "requests": dict(self.requests)}
