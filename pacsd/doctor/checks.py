"""What `pacsd doctor` probes: check, node by node, everything that must hold for images to flow.

Each check ends in one finding, OK / WARN / FAIL, worded for the IT person who has to act on it:
1. DNS: the node's host resolves (to which addresses);
2. TCP: its port accepts a connection (refused, timed out and unreachable told apart);
3. C-ECHO from us: the association accepted, else the A-ASSOCIATE-RJ reason (PS3.8 9.3.4)
   turned into what to change where; the echo status and its round trip;
4. the way back: our own listener (pacsd.json, a C-ECHO to ourselves, the address it binds) and
   whether the node knows our AE title as a C-MOVE destination (PS3.4 C.4.2.1.4.1: a C-MOVE of a
   study that cannot exist answers 0xA801 "Move Destination unknown" before anything else);
5. what the node accepts: the common storage classes (STORAGE_CLASSES) each with the transfer
   syntaxes we store, one presentation context per pair, at most 128 per association
   (PS3.8 9.3.2.2), plus Query/Retrieve and Storage Commitment.
Every network wait is bounded by `timeout` (5 s per step by default): a dead node costs seconds.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from pacsd.config import Config, Node
from pacsd.dicom_status import MOVE_DESTINATION_UNKNOWN, PENDING, PENDING_OPTIONAL_KEYS
from pacsd.doctor.report import FAIL, OK, WARN, Finding, NodeReport
from pacsd.nodes.remote import CONNECTION_HANDLERS, MAX_CONTEXTS, self_tls

TIMEOUT = 5.0   # seconds, per step

# The storage classes proposed, with the short names shown. Images get every transfer syntax
# pacsd stores; documents, structured reports and RT objects without pixels only the plain ones.
IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT", "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR", "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.1": "CR", "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "MG", "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast tomosynthesis",
    "1.2.840.10008.5.1.4.1.1.6.1": "US", "1.2.840.10008.5.1.4.1.1.3.1": "US multi-frame",
    "1.2.840.10008.5.1.4.1.1.7": "SC", "1.2.840.10008.5.1.4.1.1.7.2": "SC multi-frame byte",
    "1.2.840.10008.5.1.4.1.1.7.3": "SC multi-frame word",
    "1.2.840.10008.5.1.4.1.1.7.4": "SC multi-frame colour",
    "1.2.840.10008.5.1.4.1.1.20": "NM", "1.2.840.10008.5.1.4.1.1.128": "PET",
    "1.2.840.10008.5.1.4.1.1.12.1": "XA", "1.2.840.10008.5.1.4.1.1.12.2": "RF",
    "1.2.840.10008.5.1.4.1.1.481.1": "RT Image", "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL photographic",
}
OTHER_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set", "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.104.1": "PDF", "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR", "1.2.840.10008.5.1.4.1.1.88.33":
    "Comprehensive SR", "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.11.1": "Presentation State",
}
STORAGE_CLASSES = {**IMAGE_CLASSES, **OTHER_CLASSES}
PLAIN = {ExplicitVRLittleEndian: "Explicit VR LE", ImplicitVRLittleEndian: "Implicit VR LE"}
SYNTAXES = {**PLAIN, JPEGBaseline8Bit: "JPEG baseline", JPEGLosslessSV1: "JPEG lossless",
            JPEGLSLossless: "JPEG-LS lossless", JPEG2000Lossless: "JPEG 2000 lossless",
            JPEG2000: "JPEG 2000", RLELossless: "RLE"}
SERVICES = {   # PS3.4 C.6 (Query/Retrieve), J.3 (Storage Commitment Push Model)
    "1.2.840.10008.5.1.4.1.2.2.1": ("C-FIND", "Study Root"),
    "1.2.840.10008.5.1.4.1.2.2.2": ("C-MOVE", "Study Root"),
    "1.2.840.10008.5.1.4.1.2.2.3": ("C-GET", "Study Root"),
    "1.2.840.10008.5.1.4.1.2.1.1": ("C-FIND", "Patient Root"),
    "1.2.840.10008.5.1.4.1.2.1.2": ("C-MOVE", "Patient Root"),
    "1.2.840.10008.5.1.4.1.2.1.3": ("C-GET", "Patient Root"),
    "1.2.840.10008.1.20.1": ("Storage Commitment", "Push Model"),
}
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class OwnListener:
    """Our own DICOM listener, as `pacsd serve` announced it in pacsd.json (or as the config
    says it would listen, when it is not running), with the finding of a C-ECHO to it."""

    aet: str
    port: int
    bind: str
    running: bool
    pid: int | None = None
    finding: Finding | None = None

    @property
    def loopback_only(self) -> bool:
        return _is_loopback(self.bind)


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _bounded(fn: Any, timeout: float) -> tuple[bool, Any]:
    """Run `fn` in a daemon thread for at most `timeout` s: (finished, result or exception).
    For calls that take no timeout themselves (the resolver); a late one is left behind."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except (OSError, UnicodeError) as e:   # handed back to the caller
            box.append(e)
    t = threading.Thread(target=run, name="doctor-wait", daemon=True)
    t.start()
    t.join(timeout)
    return (bool(box), box[0] if box else None)


# --- 4a: our own listener ---------------------------------------------------------------------

def own_listener(cfg: Config, timeout: float = TIMEOUT) -> OwnListener:
    """Is our listener running (pacsd.json and its pid), on which address, answering C-ECHO."""
    try:
        run = json.loads(cfg.runfile.read_text())
        pid = int(run["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        run, pid = None, None
    if run is None or pid is None or not psutil.pid_exists(pid):
        return OwnListener(cfg.dicom_aet, cfg.dicom_port, cfg.dicom_bind, False, finding=Finding(
            "listener", WARN, f"pacsd is not running here (no live {cfg.runfile.name} in "
            f"{cfg.data}): nodes cannot send to us until it runs; start it (`pacsd serve` or "
            "the service)"))
    aet, port, bind = str(run["aet"]), int(run["dicom_port"]), str(run.get("dicom_bind") or "")
    bind = bind or "0.0.0.0"
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)
    where = (f"all interfaces ({bind})" if bind in ("0.0.0.0", "::") else
             f"{bind} only (only this machine can reach it)" if _is_loopback(bind) else
             f"{bind} only")
    t0 = time.monotonic()
    assoc, error = _associate(cfg, Node("self", aet, target, port),
                              [build_context(VERIFICATION)], timeout, tls=self_tls(cfg))
    answered = False
    if assoc is not None:
        status = assoc.send_c_echo()
        answered = bool(status) and int(status.Status) == 0
        _release(assoc)
    ms = (time.monotonic() - t0) * 1000
    data = {"pid": pid, "aet": aet, "bind": bind, "port": port, "echo_ms": round(ms, 1)}
    if answered:
        finding = Finding("listener", OK, f"pacsd runs (pid {pid}) as {aet}, listening on {where}, "
                          f"port {port}; it answers C-ECHO ({ms:.0f} ms)", data)
    else:
        finding = Finding("listener", FAIL, f"pacsd runs (pid {pid}) but its DICOM listener "
                          f"{aet} on {bind} port {port} does not answer C-ECHO "
                          f"({error or 'no Success'}): see its log, restart it", data)
    return OwnListener(aet, port, bind, True, pid, finding)


# --- 1, 2: DNS and TCP ------------------------------------------------------------------------

def check_dns(node: Node, timeout: float) -> tuple[Finding, list[str]]:
    try:
        ipaddress.ip_address(node.host)
        return Finding("dns", OK, f"{node.host} is an IP address", {"addresses": [node.host]}), \
            [node.host]
    except ValueError:
        pass
    t0 = time.monotonic()
    done, result = _bounded(lambda: socket.getaddrinfo(node.host, node.port,
                                                       type=socket.SOCK_STREAM), timeout)
    ms = (time.monotonic() - t0) * 1000
    if not done:
        return Finding("dns", FAIL, f"resolving {node.host} took more than {timeout:g} s: the "
                       "DNS server is slow or unreachable; fix DNS or use an IP address"), []
    if isinstance(result, BaseException):
        return Finding("dns", FAIL, f"cannot resolve {node.host}: check the name or use an IP "
                       f"address ({getattr(result, 'strerror', None) or result})"), []
    addresses = list(dict.fromkeys(str(info[4][0]) for info in result))
    return Finding("dns", OK, f"{node.host} resolves to {', '.join(addresses)} ({ms:.0f} ms)",
                   {"addresses": addresses, "ms": round(ms, 1)}), addresses


def check_tcp(node: Node, addresses: list[str], timeout: float) -> tuple[Finding, str | None]:
    """Connect to each address in turn; the first that accepts wins. Returns the finding and
    our own address on that connection: the one the node must use to reach us."""
    failures: list[tuple[str, str]] = []
    for address in addresses[:3]:   # a name with many addresses: a few timeouts at most
        t0 = time.monotonic()
        try:
            with socket.create_connection((address, node.port), timeout=timeout) as s:
                local = str(s.getsockname()[0])
            ms = (time.monotonic() - t0) * 1000
            return Finding("tcp", OK, f"{address} port {node.port} accepts connections "
                           f"({ms:.0f} ms)", {"address": address, "ms": round(ms, 1),
                                               "local_address": local}), local
        except ConnectionRefusedError:
            failures.append((address, "refused"))
        except TimeoutError:
            failures.append((address, "timeout"))
        except OSError as e:
            failures.append((address, f"unreachable: {e.strerror or e}"))
    address, why = failures[0]
    where = f"{address} port {node.port}"
    if why == "refused":
        text = (f"{where}: connection refused: nothing listens on that port or a firewall "
                "rejects us; check the node's DICOM port and that its DICOM service runs")
    elif why == "timeout":
        text = (f"{where}: no answer within {timeout:g} s: a firewall drops the connection or "
                "the host is down; check the host is on and that the port is open to us")
    else:
        text = (f"{where}: {why}: no network route to the host; check the address and the "
                "network (VLAN, VPN, gateway)")
    return Finding("tcp", FAIL, text, {"failures": [{"address": a, "error": w}
                                                    for a, w in failures]}), None


# --- associations -----------------------------------------------------------------------------

# PS3.8 9.3.4: (result source, reason) of an A-ASSOCIATE-RJ.
_REASONS = {(1, 1): "no reason given", (1, 2): "application context name not supported",
            (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
            (2, 1): "no reason given", (2, 2): "protocol version not supported",
            (3, 1): "temporary congestion", (3, 2): "local limit exceeded"}


def _associate(cfg: Config, node: Node, contexts: list[PresentationContext], timeout: float,
               tls: Any = None) -> tuple[Association | None, str]:
    """An association with every wait bounded by `timeout`: (the established association or
    None, why not in plain words)."""
    ae = AE(ae_title=cfg.dicom_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = contexts
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, tls_args=tls,
                         evt_handlers=list(CONNECTION_HANDLERS))
    if assoc.is_established:
        return assoc, ""
    ae.shutdown()
    return None, _why_not(cfg, node, assoc, timeout)


def _answer(assoc: Association) -> Any:
    return getattr(assoc.acceptor, "primitive", None)


def _why_not(cfg: Config, node: Node, assoc: Association, timeout: float) -> str:
    rsp = _answer(assoc)
    if assoc.is_rejected and rsp is not None:
        source, reason = rsp.result_source, rsp.diagnostic
        said = _REASONS.get((source, reason), f"source {source}, reason {reason}")
        kind = "for now" if rsp.result == 2 else "permanently"
        if (source, reason) == (1, 7):
            return (f"rejected ({said}): the node does not know AE title {node.aet} as itself: "
                    f"check the node's AE title and correct it in pacsd's node {node.name!r}")
        if (source, reason) == (1, 3):
            return (f"rejected ({said}): the node does not know us (AE {cfg.dicom_aet}): add "
                    f"us on the node (AE title {cfg.dicom_aet})")
        if source == 3:
            return (f"rejected {kind} ({said}): the node is busy or limits its associations; "
                    "try again later or raise its limit")
        if reason == 1:
            return (f"rejected {kind} ({said}): nodes often do this when they do not know the "
                    f"caller: add us (AE {cfg.dicom_aet}) on the node and check that it calls "
                    f"itself {node.aet}")
        return f"rejected {kind} ({said})"
    if rsp is not None and rsp.result == 0:
        return "the association was accepted but none of the services we proposed"
    if assoc.is_aborted:
        return ("the node broke off the association request (A-ABORT): it may refuse us "
                f"(AE {cfg.dicom_aet}) or expect TLS on this port")
    return (f"no answer to the association request within {timeout:g} s: is this the node's "
            "DICOM port? does it expect TLS?")


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    assoc.ae.shutdown()


def check_echo(cfg: Config, node: Node, timeout: float) -> tuple[Finding, bool]:
    """3. C-ECHO: (finding, whether the node accepts associations from us at all)."""
    t0 = time.monotonic()
    assoc, why = _associate(cfg, node, [build_context(VERIFICATION)], timeout)
    if assoc is None:
        accepted = why.startswith("the association was accepted")
        if accepted:
            return Finding("echo", WARN, "the node accepts associations from us but not "
                           "C-ECHO (Verification): other checks go on"), True
        return Finding("echo", FAIL, f"{cfg.dicom_aet} -> {node.aet}: {why}"), False
    assoc_ms = (time.monotonic() - t0) * 1000
    t1 = time.monotonic()
    status = assoc.send_c_echo()
    echo_ms = (time.monotonic() - t1) * 1000
    _release(assoc)
    code = int(status.Status) if status and "Status" in status else None
    data = {"status": code, "association_ms": round(assoc_ms, 1), "echo_ms": round(echo_ms, 1)}
    if code == 0:
        return Finding("echo", OK, f"{cfg.dicom_aet} -> {node.aet}: association accepted "
                       f"({assoc_ms:.0f} ms), C-ECHO Success ({echo_ms:.0f} ms round trip)",
                       data), True
    said = "no answer" if code is None else f"status 0x{code:04X}"
    return Finding("echo", FAIL, f"{cfg.dicom_aet} -> {node.aet}: association accepted but "
                   f"C-ECHO got {said} within {timeout:g} s: see the node's log", data), True


# --- 5: what the node accepts -----------------------------------------------------------------

def proposals() -> list[PresentationContext]:
    """One context per (storage class, transfer syntax), then one per service."""
    cxs = [build_context(c, [ts]) for c in IMAGE_CLASSES for ts in SYNTAXES]
    cxs += [build_context(c, [ts]) for c in OTHER_CLASSES for ts in PLAIN]
    cxs += [build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for uid in SERVICES]
    return cxs


def probe(cfg: Config, node: Node, timeout: float) -> tuple[set[tuple[str, str]], list[str]]:
    """Propose everything, MAX_CONTEXTS at a time: (accepted (abstract, transfer syntax) pairs,
    problems). An association whose contexts were all refused still tells us so."""
    cxs = proposals()
    accepted: set[tuple[str, str]] = set()
    problems: list[str] = []
    for start in range(0, len(cxs), MAX_CONTEXTS):
        batch = cxs[start:start + MAX_CONTEXTS]
        ae = AE(ae_title=cfg.dicom_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.requested_contexts = batch
        assoc = ae.associate(node.host, node.port, ae_title=node.aet,
                             evt_handlers=list(CONNECTION_HANDLERS))
        rsp = _answer(assoc)
        if rsp is not None and rsp.result == 0:   # answered, even if nothing was accepted
            accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in assoc.accepted_contexts}
        else:
            problems.append(_why_not(cfg, node, assoc, timeout))
        _release(assoc)
    return accepted, problems


def capability_findings(accepted: set[tuple[str, str]], problems: list[str]) -> list[Finding]:
    out: list[Finding] = []
    if problems:
        out.append(Finding("accepts", WARN, "could not ask the node everything it accepts: "
                           + "; ".join(dict.fromkeys(problems))))
    by_class: dict[str, list[str]] = {}
    for uid, ts in sorted(accepted):
        if uid in STORAGE_CLASSES:
            by_class.setdefault(uid, []).append(ts)
    names = [STORAGE_CLASSES[c] for c in STORAGE_CLASSES if c in by_class]
    missing = [STORAGE_CLASSES[c] for c in STORAGE_CLASSES if c not in by_class]
    storage = {"storage": {STORAGE_CLASSES[c]: [SYNTAXES[t] for t in SYNTAXES if t in ts]
                           for c, ts in by_class.items()},
               "storage_refused": missing}
    if not names:
        out.append(Finding("storage", WARN, "the node accepts none of the "
                           f"{len(STORAGE_CLASSES)} storage classes proposed: pacsd cannot send "
                           "images to it (fine if it is only queried)", storage))
    else:
        text = (f"accepts all {len(names)} storage classes proposed" if not missing else
                f"accepts {len(names)} of {len(STORAGE_CLASSES)} storage classes: "
                f"{', '.join(names)} (not: {', '.join(missing)})")
        out.append(Finding("storage", OK, text, storage))
        image_syntaxes = {ts for c, tss in by_class.items() if c in IMAGE_CLASSES for ts in tss}
        listed = ", ".join(SYNTAXES[t] for t in SYNTAXES if t in image_syntaxes)
        if image_syntaxes and image_syntaxes <= set(PLAIN):
            out.append(Finding("syntaxes", WARN, f"accepts only uncompressed transfer syntaxes "
                               f"({listed}): pacsd decompresses JPEG, JPEG-LS, JPEG 2000 and RLE "
                               "images when sending to it (slower, more traffic); enable "
                               "compressed syntaxes on the node if it can", {"syntaxes": listed}))
        elif image_syntaxes:
            out.append(Finding("syntaxes", OK, f"transfer syntaxes for images: {listed}",
                               {"syntaxes": listed}))
    services: dict[str, list[str]] = {}
    for uid, (service, model) in SERVICES.items():
        if any(a == uid for a, _ in accepted):
            services.setdefault(service, []).append(model)
    qr = [f"{s} {'yes (' + ', '.join(services[s]) + ')' if s in services else 'no'}"
          for s in ("C-FIND", "C-MOVE", "C-GET")]
    hint = "" if {"C-FIND", "C-MOVE"} <= set(services) else \
        " (`pacsd retrieve` from this node needs C-FIND and C-MOVE)"
    out.append(Finding("query", OK, "query/retrieve: " + ", ".join(qr) + hint,
                       {"services": services}))
    out.append(Finding("commitment", OK, "Storage Commitment: accepted (the node can confirm "
                       "that it keeps what was sent)" if "Storage Commitment" in services else
                       "Storage Commitment: not accepted (the node cannot confirm that it keeps "
                       "what was sent)", {"accepted": "Storage Commitment" in services}))
    return out


# --- 4: the way back --------------------------------------------------------------------------

def _us(me: OwnListener, local: str | None) -> str:
    """Our AE title, address and port as the node must know them."""
    address = local if me.bind in ("0.0.0.0", "::", "") else me.bind
    where = address or "this machine"
    if not me.port:
        return f"{me.aet} at {where} (its port is picked at start-up: set [dicom] port)"
    return f"{me.aet} at {where}:{me.port}"


def return_path(cfg: Config, node: Node, me: OwnListener, addresses: list[str],
                local: str | None) -> Finding:
    """Can the node reach our listener: bound address, allowed calling AE titles."""
    advertised = local if me.bind in ("0.0.0.0", "::", "") else me.bind
    data = {"our_address": advertised, "our_port": me.port}
    node_is_local = bool(addresses) and all(_is_loopback(a) for a in addresses)
    listens = "listens" if me.running else "is set to listen"
    if me.loopback_only and not node_is_local:
        return Finding("return", WARN, f"pacsd {listens} on {me.bind} only: {node.aet} at "
                       f"{node.host} cannot reach it; set [dicom] bind = \"0.0.0.0\" (or this "
                       f"machine's address{', ' + local if local else ''}) and restart pacsd",
                       data)
    if (me.bind not in ("0.0.0.0", "::", "") and not me.loopback_only and local
            and local != me.bind):
        return Finding("return", WARN, f"pacsd {listens} on {me.bind} only, but we reach "
                       f"{node.aet} from {local}: make sure the node sends to {me.bind}", data)
    allowed = cfg.dicom_allowed_calling_aets
    if allowed and node.aet not in allowed:
        return Finding("return", WARN, f"pacsd accepts associations only from "
                       f"{', '.join(allowed)}: add {node.aet} to [dicom] allowed_calling_aets "
                       "or the node cannot send to us", data)
    return Finding("return", OK, f"the node should send to {_us(me, local)}", data)


def check_move(cfg: Config, node: Node, me: OwnListener, local: str | None,
               timeout: float) -> Finding:
    """4b. A Study Root C-MOVE of a study that cannot exist, to our AE title."""
    assoc, why = _associate(cfg, node, [build_context(STUDY_MOVE)], timeout)
    if assoc is None:
        return Finding("move", WARN, f"could not ask for a C-MOVE: {why}")
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = generate_uid()   # fresh: no node holds it
    final: int | None = None
    try:
        for status, _ in assoc.send_c_move(ds, cfg.dicom_aet, STUDY_MOVE):
            if not status or "Status" not in status:
                break
            final = int(status.Status)
            if final not in (PENDING, PENDING_OPTIONAL_KEYS):
                break
    finally:
        _release(assoc)
    data = {"status": final, "destination": cfg.dicom_aet}
    if final is None:
        return Finding("move", WARN, f"no answer to a C-MOVE within {timeout:g} s: cannot tell "
                       f"whether the node knows {cfg.dicom_aet}", data)
    if final == MOVE_DESTINATION_UNKNOWN:
        return Finding("move", FAIL, f"the node does not know our AE title {cfg.dicom_aet} as a "
                       f"move destination (0xA801): add {_us(me, local)} on the node", data)
    said = "Success" if final == 0 else f"status 0x{final:04X}"
    return Finding("move", OK, f"the node knows {cfg.dicom_aet} as a move destination "
                   f"(C-MOVE of a study that does not exist: {said})", data)


# --- one node, all nodes ----------------------------------------------------------------------

def check_node(cfg: Config, node: Node, source: str, me: OwnListener,
               timeout: float = TIMEOUT) -> NodeReport:
    t0 = time.monotonic()
    report = NodeReport(node, source)
    add = report.findings.append
    dns, addresses = check_dns(node, timeout)
    add(dns)
    if addresses:
        tcp, local = check_tcp(node, addresses, timeout)
        add(tcp)
        associates = False
        if local is not None:
            echo, associates = check_echo(cfg, node, timeout)
            add(echo)
        way_back = return_path(cfg, node, me, addresses, local)
        if local is not None or way_back.level != OK:   # unreachable: only what to fix
            add(way_back)
        if associates:
            accepted, problems = probe(cfg, node, timeout)
            if any(uid == STUDY_MOVE for uid, _ in accepted):
                add(check_move(cfg, node, me, local, timeout))
            else:
                add(Finding("move", OK, "the node does not offer C-MOVE (Study Root): it "
                            "cannot send us studies on request; not checked"))
            report.findings += capability_findings(accepted, problems)
    report.seconds = time.monotonic() - t0
    return report


def check_all(cfg: Config, nodes: list[tuple[Node, str]], me: OwnListener, timeout: float = TIMEOUT,
              workers: int = 8) -> Iterator[NodeReport]:
    """Check the nodes side by side; reports come back in the nodes' order, each as soon as it
    and those before it are done."""
    if not nodes:
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(nodes)),
                            thread_name_prefix="doctor") as pool:
        futures = [pool.submit(check_node, cfg, n, source, me, timeout) for n, source in nodes]
        for f in futures:
            yield f.result()
