"""Why an association we asked a node for did not come about, in plain words.

pynetdicom answers a failed request with an Association that is simply not established (and
logs the cause itself). An `Attempt` watches the request's events so that pacsd can say which
of the four it was, in one log line and in a DIMSE Error Comment: the connection failed (refused,
or no answer within the connection timeout), the node rejected the association (A-ASSOCIATE-RJ,
PS3.8 9.3.4), it accepted none of the presentation contexts proposed (PS3.8 9.3.3.2), or it
aborted / did not answer the request.
"""

from __future__ import annotations

import time
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

__all__ = ["Attempt", "COMMENT_MAX"]

COMMENT_MAX = 64   # Error Comment (0000,0902) is LO: at most 64 characters (PS3.7 E.1, PS3.5 6.2)


class Attempt:
    """One association request, watched: pass `handlers` to AE.associate(), then ask
    `failure(assoc)` if it did not come about."""

    def __init__(self, connection_timeout: float | None, acse_timeout: float | None) -> None:
        self.started = time.monotonic()
        self.connection_timeout = connection_timeout
        self.acse_timeout = acse_timeout
        self.connected = False
        self.rejection: str | None = None
        self.accepted: int | None = None
        self.refused_classes: list[str] = []

    @property
    def handlers(self) -> list[Any]:
        return [(evt.EVT_CONN_OPEN, self._open), (evt.EVT_ACCEPTED, self._accepted),
                (evt.EVT_REJECTED, self._rejected)]

    def _open(self, event: Event) -> None:
        self.connected = True

    def _accepted(self, event: Event) -> None:
        assoc = event.assoc
        self.accepted = len(assoc.accepted_contexts)
        names = {str(getattr(cx.abstract_syntax, "name", cx.abstract_syntax))
                 for cx in assoc.rejected_contexts}
        self.refused_classes = sorted(names)

    def _rejected(self, event: Event) -> None:
        rsp = event.assoc.acceptor.primitive
        try:
            self.rejection = (f"{rsp.result_str}, by the {rsp.source_str}: {rsp.reason_str}"
                              if rsp is not None else "no reason given")
        except (AttributeError, KeyError, ValueError):
            self.rejection = "no reason given"

    def refused(self) -> bool:
        """The connection itself failed before its timeout: nothing listens there (or the
        host is unreachable), as against a node that answered and said no."""
        waited = time.monotonic() - self.started
        return not self.connected and not (self.connection_timeout
                                           and waited >= 0.95 * self.connection_timeout)

    def failure(self, assoc: Association) -> tuple[str, str]:
        """(what happened, for a log line; the same in at most COMMENT_MAX characters, for an
        Error Comment)."""
        waited = time.monotonic() - self.started
        if not self.connected:
            if self.connection_timeout and waited >= 0.95 * self.connection_timeout:
                return (f"no answer to the connection within {self.connection_timeout:g} s",
                        "destination did not answer (connection timeout)")
            return ("the connection was refused (nothing listens on that port, or the host "
                    "is unreachable)", "destination refused the connection")
        if self.rejection is not None or assoc.is_rejected:
            return (f"it rejected the association ({self.rejection or 'no reason given'})",
                    "destination rejected the association")
        if self.accepted == 0:
            shown = ", ".join(self.refused_classes[:4])
            more = len(self.refused_classes) - 4
            return (f"it accepted none of the presentation contexts proposed ({shown}"
                    f"{f' and {more} more' if more > 0 else ''}: it takes none of these SOP "
                    "classes in any transfer syntax offered)",
                    "destination accepted no presentation context")
        if assoc.is_aborted and not (self.acse_timeout and waited >= 0.95 * self.acse_timeout):
            return ("it aborted the association request", "destination aborted the association")
        return (f"no answer to the association request within {self.acse_timeout or 0:g} s",
                "destination did not answer the association request")
