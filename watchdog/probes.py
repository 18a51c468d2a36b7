"""What the watchdog asks of the server each round. Each probe has its own timeout and returns a
`Result`; none raises. DICOM can be wedged while HTTP answers and the other way round, so both
sides are asked: HTTP `/testdbalive` (a real index read and write, as in OsiriX), XML-RPC `Ping`
(the web side's worker threads), a C-ECHO to the server's own AE title (the DICOM listener),
and, optionally, a C-STORE of a tiny instance followed by a C-FIND for it (the whole path).
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
import xmlrpc.client
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# Imported here, once, before any probe thread runs: two probes importing pydicom at the same
# moment in their own threads leave it half initialised for good.
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind, Verification)

ALIVE_TEXT = b"succeeded"
# /testdbalive's answer when the index's volume is full: the server is alive and a restart
# cannot free space (pacsd.web.health).
INDEX_FULL = 507
# A fixed instance for the round trip: stored once (later copies are duplicates, kept out).
ROUNDTRIP_SOP = "2.25.246812175390451728096435541262411693573"
ROUNDTRIP_STUDY = "2.25.246812175390451728096435541262411693574"
ROUNDTRIP_SERIES = "2.25.246812175390451728096435541262411693575"


@dataclass(frozen=True)
class Target:
    """The running server as its pacsd.json describes it."""

    pid: int
    started: float
    aet: str
    dicom_host: str
    dicom_port: int
    http_scheme: str
    http_host: str
    http_port: int
    tls: Any = None   # tls_args when the DICOM listener speaks TLS (pacsd.nodes.remote.self_tls)

    @classmethod
    def read(cls, runfile: Path) -> "Target | None":
        try:
            info = json.loads(runfile.read_text())
            return cls(pid=int(info["pid"]), started=float(info["started"]), aet=info["aet"],
                       dicom_host=_local(info.get("dicom_bind", "")),
                       dicom_port=int(info["dicom_port"]),
                       http_scheme=info.get("http_scheme", "http"),
                       http_host=_local(info.get("http_bind", "")),
                       http_port=int(info["http_port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _local(bind: str) -> str:
    """Where to reach a listener bound to `bind` from this machine."""
    return "127.0.0.1" if bind in ("", "0.0.0.0") else ("::1" if bind == "::" else bind)


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    ms: float
    detail: str = ""


def timed(name: str, probe: Callable[[], str]) -> Result:
    """Run `probe` (returns a detail, raises on failure) and time it."""
    t0 = time.monotonic()
    try:
        detail = probe()
        return Result(name, True, (time.monotonic() - t0) * 1000, detail)
    except Exception as e:  # noqa: BLE001 - any failure is a failed probe, with its reason
        reason = str(e) or type(e).__name__
        return Result(name, False, (time.monotonic() - t0) * 1000, reason[:300])


def _connection(t: Target, timeout: float) -> http.client.HTTPConnection:
    if t.http_scheme == "https":
        # Our own server on this machine, often with a self-made certificate.
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        return http.client.HTTPSConnection(t.http_host, t.http_port, timeout=timeout,
                                           context=ctx)
    return http.client.HTTPConnection(t.http_host, t.http_port, timeout=timeout)


def _request(t: Target, timeout: float, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = _connection(t, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        rsp = conn.getresponse()
        return rsp.status, rsp.read(64 << 10)
    finally:
        conn.close()


def http_alive(t: Target, timeout: float) -> Result:
    def probe() -> str:
        status, body = _request(t, timeout, "GET", "/testdbalive")
        if status != 200 or ALIVE_TEXT not in body:
            raise RuntimeError(f"/testdbalive answered {status}: "
                               f"{body[:120].decode('utf-8', 'replace').strip()}")
        return "200"
    return timed("http", probe)


def index_full(reason: str) -> str | None:
    """Why a restart cannot help, when a round failed because the index volume is full."""
    if f"/testdbalive answered {INDEX_FULL}" in reason:
        return "the index volume is full (pacsd answers /testdbalive with 507)"
    return None


def xmlrpc_ping(t: Target, timeout: float) -> Result:
    def probe() -> str:
        body = xmlrpc.client.dumps(({},), "Ping").encode()
        status, answer = _request(t, timeout, "POST", "/RPC2", body,
                                  {"Content-Type": "text/xml"})
        if status == 401:
            # Users are configured and the watchdog has none: the web side's threads, routing
            # and authentication answered, which is what this probe is for (/testdbalive,
            # open on loopback, covers the index).
            return "401 (users configured)"
        if status != 200:
            raise RuntimeError(f"/RPC2 answered {status}")
        (reply,), _ = xmlrpc.client.loads(answer)
        if not isinstance(reply, dict) or str(reply.get("error")) != "0":
            raise RuntimeError(f"Ping answered {reply!r}")
        return "200"
    return timed("xmlrpc", probe)


def _established(assoc: Any) -> None:
    if assoc.is_established:
        return
    if assoc.is_rejected:
        raise RuntimeError("the association was rejected (all associations busy, or refused)")
    if assoc.is_aborted:
        raise RuntimeError("the association was aborted")
    raise RuntimeError("no answer to the association request")


@contextmanager
def _association(t: Target, timeout: float, contexts: list[Any]) -> Iterator[Any]:
    """An association from the server's own AE title to itself (always allowed to call it)."""
    ae = AE(ae_title=t.aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.requested_contexts = contexts
    assoc = ae.associate(t.dicom_host, t.dicom_port, ae_title=t.aet, tls_args=t.tls)
    try:
        _established(assoc)
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def c_echo(t: Target, timeout: float) -> Result:
    def probe() -> str:
        with _association(t, timeout, [build_context(Verification)]) as assoc:
            status = assoc.send_c_echo()
            if not status or int(status.Status) != 0:
                raise RuntimeError("no Success answer to C-ECHO")
            return "Success"
    return timed("echo", probe)


def _tiny_instance() -> Any:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ROUNDTRIP_SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ROUNDTRIP_STUDY, ROUNDTRIP_SERIES
    ds.PatientName, ds.PatientID = "PACSD^WATCHDOG", "PACSD-WATCHDOG"
    ds.Modality, ds.StudyDescription = "OT", "pacsd-watchdog round trip"
    return ds


def roundtrip(t: Target, timeout: float) -> Result:
    """C-STORE one tiny instance (always the same: a duplicate after the first round) and find
    it with C-FIND: the store path, the index writer and the query path in one go."""
    def probe() -> str:
        contexts = [build_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian]),
                    build_context(StudyRootQueryRetrieveInformationModelFind)]
        with _association(t, timeout, contexts) as assoc:
            rsp = assoc.send_c_store(_tiny_instance())
            if not rsp or int(rsp.Status) != 0:
                raise RuntimeError(f"C-STORE answered {getattr(rsp, 'Status', None)!r}")
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID, q.SeriesInstanceUID = ROUNDTRIP_STUDY, ROUNDTRIP_SERIES
            q.SOPInstanceUID = ROUNDTRIP_SOP
            found = [ds for status, ds in assoc.send_c_find(
                q, StudyRootQueryRetrieveInformationModelFind)
                if status and int(status.Status) in (0xFF00, 0xFF01)]
            if len(found) != 1:
                raise RuntimeError(f"C-FIND found {len(found)} instead of the stored instance")
            return "stored and found"
    return timed("roundtrip", probe)
