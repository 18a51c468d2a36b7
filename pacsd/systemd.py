"""sd_notify(3) without libsystemd: tell the service manager we are ready, alive, stopping.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the AF_UNIX socket
named by NOTIFY_SOCKET ("@name" is an abstract socket). Outside systemd there is no such socket
and every call is a no-op, so pacsd runs the same everywhere (the idea of gunicorn's sd_notify).
Nothing here imports from pacsd, and nothing here touches the environment.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send `lines` ("READY=1", "STATUS=...", ...) to the service manager. False outside systemd
    or when it could not be sent; never raises: no notification is worth stopping the server."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not lines:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5.0)   # a full receive queue must not block us for ever
            sock.connect(target)
            sock.send("\n".join(lines).encode("utf-8", "replace"))
        return True
    except (OSError, ValueError) as e:
        log.debug("cannot notify the service manager at %s: %s", address, e)
        return False


def watchdog_interval() -> float | None:
    """Seconds between health checks and WATCHDOG=1 pings: a third of WatchdogSec (within the
    half sd_watchdog_enabled(3) advises), so that one failed check is forgiven and two in a row
    are not. None when no service manager watches this very process."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID") or os.getpid())
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():   # WATCHDOG_PID names another process: not for us
        return None
    return usec / 3e6
