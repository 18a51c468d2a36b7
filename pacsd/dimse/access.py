"""Who may associate: a calling AE title that is a known node must come from that node's host.

An AE title is only a name a peer chooses; `[dicom] check_peer_address = true` ties the names
we know (the nodes: [[nodes]] and the admin page) to their hosts, so that a machine cannot take
a modality's or a workstation's name. Calling AE titles that are not nodes are not judged here:
`[dicom] allowed_calling_aets` is the one allow-list (our own AE title, used by `pacsd status`
and the watchdog, is never a node). Making the node table an implicit second allow-list would
lock out every modality that stores to us but is never sent to, which is most of them.

Node hosts may be names: they are resolved with a bound on the time (a resolver that hangs
must not hold an association thread) and cached; a name that does not resolve refuses.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from pynetdicom.events import Event

from pacsd.directory import Directory

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 2.0
CACHE_S = 60.0
FAILED_CACHE_S = 10.0
# PS3.8 9.3.4: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)


def _normal(address: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 as IPv4, no zone."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class PeerCheck:
    """Decides whether a calling AE title may associate from an address."""

    def __init__(self, directory: Directory, timeout: float = RESOLVE_TIMEOUT_S) -> None:
        self.directory = directory
        self.timeout = timeout
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()
        # Few threads: a resolver stuck on one name must not use up a thread per association.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resolve")

    def addresses(self, host: str) -> frozenset[str]:
        """The addresses `host` resolves to (empty if it does not, in time); cached."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(host)
            if hit and hit[0] > now:
                return hit[1]
        try:
            ip = ipaddress.ip_address(host)
            found = frozenset({_normal(str(ip))})
        except ValueError:
            try:
                infos = self._pool.submit(socket.getaddrinfo, host, None,
                                          type=socket.SOCK_STREAM).result(self.timeout)
                found = frozenset(_normal(str(i[4][0])) for i in infos)
            except (OSError, FutureTimeout) as e:
                log.warning("node host %r does not resolve (%s)", host, e or "timed out")
                found = frozenset()
        with self._lock:
            self._cache[host] = (now + (CACHE_S if found else FAILED_CACHE_S), found)
        return found

    def refusal(self, calling_aet: str, address: str) -> str | None:
        """Why `calling_aet` may not associate from `address`, or None if it may."""
        node = self.directory.node_by_aet(calling_aet.strip())
        if node is None:
            return None
        allowed = self.addresses(node.host)
        if _normal(address) in allowed:
            return None
        return (f"calling AE title {calling_aet.strip()!r} is node {node.name!r}, whose host "
                f"{node.host!r} is {', '.join(sorted(allowed)) or 'not resolvable'}")

    def on_requested(self, event: Event) -> None:
        """EVT_REQUESTED handler: reject the association when `refusal` says so (pynetdicom
        lets this handler answer with an A-ASSOCIATE-RJ before any negotiation)."""
        assoc = event.assoc
        aet = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
        address = str(assoc.requestor.address)
        reason = self.refusal(aet, address)
        if reason is None:
            return
        log.warning("association from %s refused: %s", address, reason)
        assoc.acse.send_reject(*REJECT_CALLING_AET)
        assoc.is_rejected = True
        assoc.kill()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
