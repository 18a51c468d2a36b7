"""Remote DICOM nodes as seen from here: we are the SCU (C-STORE, C-FIND, C-MOVE).

A service module, like archive: the DICOM front end (dimse/retrieve.py, the C-MOVE/C-GET SCP)
and the XML-RPC front end both send stored files through it. Stored files go out as `StoredRef`s:
a data set holding only the UIDs plus the file's path, so that `send_stored` can hand pynetdicom
the file's bytes unchanged when the peer accepted the stored transfer syntax, and transcode it
(pacsd.imaging.transcode) only when it did not.

Every association uses our AE title as calling AE and the configured timeouts, bounded by
`MAX_WAIT` so that a web request never hangs for the two minutes a DIMSE timeout allows.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections import Counter
from typing import Any, Callable

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import
    StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
    Verification)

from pacsd import query
from pacsd.compat import pynetdicom as compat
from pacsd.imaging import transcode
from pacsd.config import Config, Node
from pacsd.dicom_status import (CANCEL, PENDING, PENDING_OPTIONAL_KEYS, SUCCESS,
                                WARNING_COERCION, WARNING_DATA_SET_DOES_NOT_MATCH,
                                WARNING_ELEMENTS_DISCARDED, WARNING_SUBOPERATIONS_FAILED)
from pacsd.errors import DamagedFile, PacsError
from pacsd.nodes.attempt import Attempt
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128   # PS3.8 9.3.2.2: at most 128 presentation contexts per association
MAX_WAIT = 30.0      # seconds, at most, for association set-up and for each DIMSE message
MAX_MATCHES = 10_000  # C-FIND responses kept from one query
# PS3.4 B.2.3 / C.4.2.1.5: success, and the warnings after which the data set was kept.
_STORED = {SUCCESS, WARNING_COERCION, WARNING_ELEMENTS_DISCARDED, WARNING_DATA_SET_DOES_NOT_MATCH}


class RemoteError(PacsError):
    """A remote node could not be reached, refused the association, or failed the request."""

    http_status = 502


# --- sending stored files (shared with the C-MOVE / C-GET SCP) ---------------------------------

class StoredRef(Dataset):
    """A stored instance, by reference: UIDs decoded, the bytes left on disk."""


def stored_ref(inst: query.StoredInstance, store: Store) -> StoredRef:
    ds = StoredRef()
    ds.SOPClassUID = UID(inst.sop_class_uid)
    ds.SOPInstanceUID = UID(inst.sop_instance_uid)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(inst.transfer_syntax_uid)
    ds.pacsd_path = store.placed(inst.path)
    ds.pacsd_damaged = inst.damaged
    return ds


def send_stored(assoc: Association, label: str,
                preference: tuple[str, ...] = ()) -> None:
    """Make `assoc.send_c_store` send a StoredRef's file unchanged when the peer accepted its
    transfer syntax, and otherwise transcoded to the first of `preference` (the node's
    transfer_syntaxes; empty: Explicit, then Implicit VR Little Endian) that the peer accepted
    for its SOP class and that we can make (pacsd.imaging.transcode). A file that cannot be made into
    any of them is a failed sub-operation, with a warning. One INFO line, "`label`: sent N as
    stored, M transcoded (...), K failed", when the association closes."""
    original = assoc.send_c_store
    if getattr(original, "pacsd_wrapped", False):
        return
    tally = transcode.Tally()

    def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2,
                     originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        path = getattr(dataset, "pacsd_path", None)
        if path is None:
            return original(dataset, msg_id, priority, originator_aet, originator_id)
        if getattr(dataset, "pacsd_damaged", False):
            tally.fail()
            log.warning("%s: %s not sent: its stored file was found damaged (see /status, "
                        "`pacsd verify`)", label, dataset.SOPInstanceUID)
            raise DamagedFile(f"the stored file of {dataset.SOPInstanceUID} is damaged")
        sop_class = dataset.SOPClassUID
        stored = dataset.file_meta.TransferSyntaxUID
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == sop_class and cx.as_scu]
        target = transcode.choose(stored, accepted, preference)
        pair = None if target == stored else (str(stored), str(target))
        # A de-identifying send (see `send`): read, changed and encoded again, never raw.
        transform = getattr(dataset, "pacsd_transform", None)
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor   # C-GET: requestor
        try:
            if not accepted:
                raise transcode.TranscodeError(
                    f"{peer.ae_title} accepted no presentation context for {sop_class.name}")
            if target is None:
                raise transcode.TranscodeError(
                    f"{transcode.short(stored)} -> "
                    f"{', '.join(transcode.short(ts) for ts in accepted) or 'nothing'} "
                    f"(what {peer.ae_title} accepted for {sop_class.name}): "
                    "no decoder or encoder here makes any of them from it")
            # Sent raw from the file (compat.send_files_as_stored): unchanged bytes.
            payload = (path if pair is None and transform is None
                       else transcode.transcode(path, target, transform))
        except transcode.TranscodeError as e:
            tally.fail()
            log.warning("%s: %s not sent: %s", label, dataset.SOPInstanceUID, e)
            raise
        lane = compat.lane_of(assoc) if pair is None and transform is None else None
        if lane is not None:   # the file's bytes straight onto the socket (pynetdicom_lane)
            rsp = lane.send_file(path, str(sop_class), str(dataset.SOPInstanceUID),
                                 str(stored), msg_id, priority, originator_aet, originator_id)
            if rsp is not None:
                if int(getattr(rsp, "Status", -1)) in _STORED:
                    tally.sent(pair)
                else:
                    tally.fail()
                return rsp
        parked = compat.park_reactor(assoc)   # pynetdicom's race (see there)
        try:
            rsp = original(payload, msg_id, priority, originator_aet, originator_id)
        except Exception:
            tally.fail()
            if parked:
                compat.unpark_reactor(assoc)   # parked above; pynetdicom did not unpark it
            raise
        if int(getattr(rsp, "Status", -1)) in _STORED:
            tally.sent(pair)
        else:
            tally.fail()
        return rsp

    def summary(_: Event) -> None:
        if tally.total:
            log.info("%s: %s", label, tally.summary())

    send_c_store.pacsd_wrapped = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store  # type: ignore[method-assign]
    assoc.bind(evt.EVT_CONN_CLOSE, summary)


def nodelay(event: Event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY, or every small PDU waits for a delayed ACK."""
    try:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    except (AttributeError, OSError):
        pass


def send_deadline(event: Event) -> None:
    """EVT_CONN_OPEN handler: a send to a peer that stops reading fails after the association's
    network_timeout instead of blocking for ever.

    pynetdicom connects a requestor's socket with connection_timeout and then sets it blocking
    with no timeout (transport.AssociationSocket.connect: settimeout(None)): once the peer's TCP
    window is full, socket.send() waits for ever, in the DUL thread or, for P-DATA, in the
    thread that sends (pacsd.compat.pynetdicom_pace), and no timer of pynetdicom's can end it (its idle timer's
    A-ABORT is itself a send). With a timeout the send raises, pynetdicom reads that as the
    connection closing (Evt17) and the association ends: a C-MOVE counts the sub-operation
    failed, a routing job is retried. Accepted sockets already have network_timeout (pynetdicom
    sets it on the listening socket, accepted ones inherit it)."""
    assoc = event.assoc
    if not assoc.is_requestor:
        return
    timeout = assoc.network_timeout
    try:
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        if timeout is not None and sock is not None:
            sock.settimeout(float(timeout))
    except (AttributeError, OSError):
        pass


# How every association of ours is set up, accepted or requested: Nagle off, pynetdicom's
# loops waiting for work instead of polling (pacsd.compat.pynetdicom_pace), the fast lane
# (pacsd.compat.pynetdicom_lane: stored files sent raw, their responses read by the DUL), and a
# bound on every send.
CONNECTION_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, nodelay),
                                  (evt.EVT_CONN_OPEN, compat.wake_on_work),
                                  (evt.EVT_CONN_OPEN, compat.open_lane),
                                  (evt.EVT_CONN_OPEN, send_deadline),
                                  (evt.EVT_CONN_CLOSE, compat.drop_wakeups),
                                  (evt.EVT_CONN_CLOSE, compat.close_lane)]


def move_contexts(insts: list[query.StoredInstance], node: Node | None = None
                  ) -> list[PresentationContext]:
    """Contexts to propose to a C-MOVE destination or send target.

    Without the node's transfer_syntaxes: each stored (SOP class, transfer syntax) in a
    context of its own, so that a peer that takes the stored syntax gets the stored bytes
    unchanged (a peer accepts one syntax per context, PS3.8 9.3.2.2: offered Explicit and
    Implicit VR in one, it would take one and the files stored in the other would be
    re-encoded); and for each class one conversion context with the uncompressed syntaxes
    (Explicit, then Implicit VR Little Endian) that no context of the class offers already.
    Within MAX_CONTEXTS (PS3.8 9.3.2.2, pynetdicom's limit): the conversion contexts come
    first, one per class, each then offering Explicit and Implicit VR Little Endian both; then
    the stored syntaxes' own contexts, those of the most instances first, as many as fit.

    With them: for each class, each of the node's syntaxes in a context of its own (the node
    says which of them it takes; a stored syntax not among them is transcoded), or, past 128
    contexts, one context per class offering them all."""
    classes = sorted({i.sop_class_uid for i in insts})
    wanted = list(node.transfer_syntaxes) if node is not None else []
    if wanted:
        cxs = [build_context(c, [ts]) for c in classes for ts in wanted]
        if len(cxs) > MAX_CONTEXTS:
            cxs = [build_context(c, wanted) for c in classes]
    else:
        plain: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        counts = Counter((i.sop_class_uid, i.transfer_syntax_uid) for i in insts)
        own = sorted(counts, key=lambda pair: (-counts[pair], pair))
        rest: dict[str, list[str | UID]] = {
            c: [ts for ts in plain if (c, ts) not in counts] for c in classes}
        if len(own) + sum(1 for c in classes if rest[c]) <= MAX_CONTEXTS:
            cxs = [build_context(c, [ts]) for c, ts in sorted(own)]
            cxs += [build_context(c, rest[c]) for c in classes if rest[c]]
        else:
            cxs = [build_context(c, plain) for c in classes]
            room = max(0, MAX_CONTEXTS - len(cxs))
            cxs += [build_context(c, [ts]) for c, ts in own[:room]]
            if room < len(own):
                log.info("%d stored (SOP class, transfer syntax) pairs: %d proposed in a "
                         "context of their own, the rest sent through the conversion contexts",
                         len(own), room)
    if len(cxs) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; proposing the first %d",
                    len(cxs), MAX_CONTEXTS)
    return cxs[:MAX_CONTEXTS]


def associate_to_send(ae: AE, node: Node, insts: list[query.StoredInstance], label: str
                      ) -> tuple[Association | None, tuple[str, str]]:
    """An association with `node` for sending `insts` (the C-MOVE sub-association: `ae` is the
    listening AE, whose timeouts pynetdicom's own request would use), with `send_stored` in
    place; or None and why not: (in words, for the log line; in at most 64 characters, for
    the Error Comment)."""
    attempt = Attempt(ae.connection_timeout, ae.acse_timeout)
    assoc = ae.associate(node.host, node.port, contexts=move_contexts(insts, node),
                         ae_title=node.aet,
                         evt_handlers=[*CONNECTION_HANDLERS, *attempt.handlers])
    if not assoc.is_established:
        _drop(assoc)
        return None, attempt.failure(assoc)
    send_stored(assoc, label, node.transfer_syntaxes)
    return assoc, ("", "")


def _drop(assoc: Association) -> None:
    """What pynetdicom's C-MOVE SCP does with a request that failed: close its socket."""
    sock = getattr(assoc.dul, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


# --- associations as SCU ----------------------------------------------------------------------

def scu_ae(cfg: Config) -> AE:
    """An AE of ours for associations we request, with our timeouts (each at most MAX_WAIT)."""
    ae = AE(ae_title=cfg.dicom_aet)
    ae.acse_timeout = min(cfg.dicom_acse_timeout, MAX_WAIT)
    ae.dimse_timeout = min(cfg.dicom_dimse_timeout, MAX_WAIT)
    ae.network_timeout = min(cfg.dicom_network_timeout, MAX_WAIT)
    ae.connection_timeout = min(cfg.dicom_acse_timeout, MAX_WAIT)
    return ae


def self_tls(cfg: Config) -> tuple[ssl.SSLContext, str | None] | None:
    """tls_args for an association to our own listener when it speaks TLS ([dicom] tls_cert),
    for `pacsd status` and the watchdog: the listener's certificate is not checked (it is us, on
    loopback), and ours is shown as the client's, since a listener with tls_ca requires one."""
    if not cfg.dicom_tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(os.path.expanduser(cfg.dicom_tls_cert),
                        os.path.expanduser(cfg.dicom_tls_key))
    return ctx, None   # no name to check: it is us


def open_association(ae: AE, node: Node, contexts: list[PresentationContext],
                     handlers: list[Any] | None = None,
                     tls: tuple[ssl.SSLContext, str | None] | None = None,
                     ext_neg: list[Any] | None = None) -> Association:
    """An established association with `node`, or RemoteError saying why not in plain words."""
    ae.requested_contexts = contexts
    attempt = Attempt(ae.connection_timeout, ae.acse_timeout)
    assoc = ae.associate(node.host, node.port, ae_title=node.aet, tls_args=tls,  # type: ignore[arg-type]  # None is passed on to wrap_socket
                         ext_neg=ext_neg, evt_handlers=CONNECTION_HANDLERS + list(handlers or [])
                         + attempt.handlers)
    if not assoc.is_established:
        ae.shutdown()
        if attempt.refused():   # no association was ever asked for: nobody there to refuse it
            raise RemoteError(f"{node.name or node.aet} ({node.aet}): nothing listens on "
                              f"{node.host}:{node.port} (connection refused)")
        raise RemoteError(f"{node.name or node.aet} ({node.aet}@{node.host}:{node.port}) did "
                          f"not accept the association: {attempt.failure(assoc)[0]}")
    return assoc


def close_association(ae: AE, assoc: Association) -> None:
    """Release (when still established) and shut the AE down."""
    if assoc.is_established:
        assoc.release()
    ae.shutdown()


Progress = Callable[[int, int, int | None], None]   # (completed, failed, total or None)


def send(cfg: Config, node: Node, instances: list[query.StoredInstance], store: Store,
         progress: Progress | None = None,
         transform: Callable[[Dataset], Dataset] | None = None) -> tuple[int, int]:
    """C-STORE stored instances to `node` over one association; (completed, failed). With
    `transform` (a de-identification, pacsd.imaging.deidentify), each file is read, changed
    by it in memory and sent encoded again, one at a time; what is stored never changes."""
    if not instances:
        return 0, 0
    compat.send_files_as_stored()   # as build_ae: stored files are sent by path
    ae = scu_ae(cfg)
    assoc = open_association(ae, node, move_contexts(instances, node))
    send_stored(assoc, f"send to {node.name} ({node.aet})", node.transfer_syntaxes)
    completed = failed = 0
    try:
        for n, inst in enumerate(instances):
            if not assoc.is_established:
                log.warning("send to %s: the association ended; %d instance(s) not sent",
                            node.aet, len(instances) - n)
                failed += len(instances) - n
                if progress is not None:
                    progress(completed, failed, len(instances))
                break
            status = -1
            try:
                ref = stored_ref(inst, store)
                if transform is not None:
                    ref.pacsd_transform = transform
                rsp = assoc.send_c_store(ref)
                status = int(getattr(rsp, "Status", -1)) if rsp else -1
                if status not in _STORED:
                    log.warning("C-STORE of %s to %s: status 0x%04X", inst.sop_instance_uid,
                                node.aet, status & 0xFFFF)
            except transcode.TranscodeError:   # logged by send_stored
                pass
            except (ValueError, RuntimeError, OSError, AttributeError) as e:
                log.warning("C-STORE of %s to %s failed: %s", inst.sop_instance_uid, node.aet, e)
            if status in _STORED:
                completed += 1
            else:
                failed += 1
            if progress is not None:
                progress(completed, failed, len(instances))
    finally:
        close_association(ae, assoc)   # send_stored logs the summary as the connection closes
    return completed, failed


def values_of(ds: Dataset) -> dict[str, str]:
    out: dict[str, str] = {}
    for elem in ds:
        if not elem.keyword or elem.VR == "SQ" or isinstance(elem.value, (Sequence, bytes)):
            continue
        value = elem.value
        if value is None:
            out[elem.keyword] = ""
        elif isinstance(value, (MultiValue, list, tuple)):
            out[elem.keyword] = "\\".join(str(v) for v in value)
        else:
            out[elem.keyword] = str(value)
    return out


def query_identifier(level: str, keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.upper()
    for k, v in keys.items():
        if tag_for_keyword(k) is None:
            raise ValueError(f"{k!r} is not a DICOM keyword")
        setattr(ds, k, v)
    return ds


def find(cfg: Config, node: Node, level: str, keys: dict[str, str]) -> list[dict[str, str]]:
    """Study Root C-FIND on `node`: one dict (keyword -> value) per match. `keys` are matching
    keys ("" for return keys); unknown keywords raise ValueError."""
    ae = scu_ae(cfg)
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = open_association(ae, node, [build_context(model)])
    matches: list[dict[str, str]] = []
    final = None
    try:
        for status, identifier in assoc.send_c_find(query_identifier(level, keys), model):
            if not status:   # no answer within the DIMSE timeout, or aborted
                break
            final = int(status.Status)
            if final in (PENDING, PENDING_OPTIONAL_KEYS) and identifier is not None:
                if len(matches) < MAX_MATCHES:
                    matches.append(values_of(identifier))
    finally:
        close_association(ae, assoc)
    if final != SUCCESS:
        raise RemoteError(f"C-FIND on {node.aet} failed (status "
                          f"{'none' if final is None else hex(final)})")
    return matches


def move_here(cfg: Config, node: Node, keys: dict[str, str], level: str = "STUDY",
              progress: Progress | None = None) -> dict[str, int]:
    """Ask `node` to C-MOVE what `keys` name to our own AE title (the remote must list us as a
    destination). Returns the final sub-operation counts and status."""
    ae = scu_ae(cfg)
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = open_association(ae, node, [build_context(model)])
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_move(query_identifier(level, keys), cfg.dicom_aet, model):
            if not status:
                break
            final = status
            if progress is not None and int(status.Status) == PENDING:   # C.4.2.1.6
                done, failed, remaining = (
                    int(status.get(k, 0) or 0) for k in ("NumberOfCompletedSuboperations",
                                                         "NumberOfFailedSuboperations",
                                                         "NumberOfRemainingSuboperations"))
                progress(done, failed, done + failed + remaining
                         + int(status.get("NumberOfWarningSuboperations", 0) or 0))
    finally:
        close_association(ae, assoc)
    if final is None:
        raise RemoteError(f"C-MOVE from {node.aet}: no response within the time limit")
    counts = {"status": int(final.Status)}
    for name, key in (("completed", "NumberOfCompletedSuboperations"),
                      ("failed", "NumberOfFailedSuboperations"),
                      ("warning", "NumberOfWarningSuboperations")):
        counts[name] = int(final.get(key, 0) or 0)
    if counts["status"] not in (SUCCESS, WARNING_SUBOPERATIONS_FAILED, CANCEL):
        raise RemoteError(f"C-MOVE from {node.aet} to {cfg.dicom_aet} failed (status "
                          f"0x{counts['status']:04X}); does {node.aet} list {cfg.dicom_aet} "
                          "as a destination?")
    log.info("C-MOVE from %s: %d completed, %d failed", node.aet, counts["completed"],
             counts["failed"])
    return counts


def move_studies(cfg: Config, node: Node, uids: list[str], progress: Progress | None = None
                 ) -> tuple[int, int]:
    """C-MOVE each study from `node` to us, one after the other; (received, failed) over all
    of them, with `progress` counting across studies. A RemoteError stops at that study."""
    done = failed = total = 0

    def each(d: int, f: int, t: int | None) -> None:
        if progress is not None:
            progress(done + d, failed + f, total + (t or 0))
    for uid in uids:
        counts = move_here(cfg, node, {"StudyInstanceUID": uid}, progress=each)
        received = counts["completed"] + counts["warning"]   # warnings were stored too
        done, failed = done + received, failed + counts["failed"]
        total += received + counts["failed"]
        if progress is not None:
            progress(done, failed, total)
    return done, failed


def echo(cfg: Config, node: Node, timeout: float | None = None,
         tls: tuple[ssl.SSLContext, str | None] | None = None) -> tuple[bool, float, str]:
    """C-ECHO `node` (over TLS with `tls`): (answered with Success, milliseconds, what
    happened)."""
    ae = scu_ae(cfg)
    if timeout is not None:
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    t0 = time.monotonic()
    try:
        assoc = open_association(ae, node, [build_context(Verification)], tls=tls)
    except RemoteError as e:
        return False, (time.monotonic() - t0) * 1000, str(e)
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and int(status.Status) == 0
    finally:
        close_association(ae, assoc)
    ms = (time.monotonic() - t0) * 1000
    return ok, ms, "C-ECHO answered Success" if ok else "C-ECHO got no Success answer"

