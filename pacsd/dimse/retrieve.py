"""Query/Retrieve GET and MOVE as SCP (PS3.4 C.4.2, C.4.3), Patient Root and Study Root.

Both look up the stored instances with query.instances() and hand pynetdicom one `StoredRef`
per instance: a data set holding only its UIDs plus the path of the stored file. The sending
association's send_c_store is wrapped (`send_stored`) so that the file's bytes go out as they
are, in chunks, when the peer accepted the stored transfer syntax; only otherwise is the file
decoded and converted by pynetdicom.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from pacsd import query
from pacsd.config import Config
from pacsd.dimse.find import Cancelled, parse_identifier
from pacsd.index import Index
from pacsd.store import Store

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128   # PS3.8 9.3.2.2: at most 128 presentation contexts per association


class StoredRef(Dataset):
    """A stored instance, by reference: UIDs decoded, the bytes left on disk."""


def _ref(inst: query.StoredInstance, store: Store) -> StoredRef:
    ds = StoredRef()
    ds.SOPClassUID = UID(inst.sop_class_uid)
    ds.SOPInstanceUID = UID(inst.sop_instance_uid)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(inst.transfer_syntax_uid)
    ds.pacsd_path = store.path(inst.path)
    return ds


def _park_reactor(assoc: Association, timeout: float = 5.0) -> None:
    """Return once the association's own reactor thread is blocked at its checkpoint.

    pynetdicom (3.0.4, its issues #435 and #875) pauses that thread before sending a C-STORE by
    clearing the checkpoint and waiting for `_is_paused`, which is also True for an instant
    after the thread has passed the checkpoint; it may then take the C-STORE response for
    itself ("unexpected C-STORE service message") and the C-MOVE stalls until the DIMSE
    timeout. Waiting until the thread really waits on the checkpoint closes that window."""
    if threading.current_thread() is assoc:   # C-GET: we are the reactor thread
        return
    gate = assoc._reactor_checkpoint
    gate.clear()
    deadline = time.monotonic() + timeout
    while (not (assoc._is_paused and gate._cond._waiters)  # type: ignore[attr-defined]
           and assoc.is_alive() and time.monotonic() < deadline):
        time.sleep(0.0001)


def send_stored(assoc: Association) -> None:
    """Make `assoc.send_c_store` send a StoredRef's file unchanged when it can."""
    original = assoc.send_c_store
    if getattr(original, "pacsd_wrapped", False):
        return

    def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2,
                     originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        path = getattr(dataset, "pacsd_path", None)
        if path is not None:
            sop_class = dataset.SOPClassUID
            ts = dataset.file_meta.TransferSyntaxUID
            _park_reactor(assoc)
            if any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts and cx.as_scu
                   for cx in assoc.accepted_contexts):
                # Sent raw from the file (_config.STORE_SEND_CHUNKED_DATASET): unchanged bytes.
                return original(path, msg_id, priority, originator_aet, originator_id)
            log.debug("%s: peer did not accept %s, converting", dataset.SOPInstanceUID, ts)
            dataset = dcmread(path)
            if ts.is_compressed:
                # pynetdicom converts only between uncompressed syntaxes: decode the pixel data
                # first (same SOP Instance UID); without a decoder this sub-operation fails.
                dataset.decompress(generate_instance_uid=False)
        return original(dataset, msg_id, priority, originator_aet, originator_id)

    send_c_store.pacsd_wrapped = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


def _nodelay(event: Event) -> None:
    try:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    except (AttributeError, OSError):
        pass


def move_contexts(insts: list[query.StoredInstance]) -> list[PresentationContext]:
    """Contexts to propose to a C-MOVE destination: each stored (class, syntax) as it is, and for
    each class the uncompressed syntaxes pynetdicom can convert to."""
    exact = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in insts})
    classes = sorted({i.sop_class_uid for i in insts})
    plain = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    cxs = [build_context(c, [ts]) for c, ts in exact if ts not in plain]
    cxs += [build_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for c in classes]
    if len(cxs) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; proposing the first %d",
                    len(cxs), MAX_CONTEXTS)
    return cxs[:MAX_CONTEXTS]


def _lookup(event: Event, index: Index, verb: str) -> list[query.StoredInstance] | None:
    peer = event.assoc.requestor.ae_title
    try:
        req, _ = parse_identifier(event.identifier, str(event.request.AffectedSOPClassUID))
        with index.reading():
            return query.instances(req)
    except query.QueryError as e:
        log.warning("%s from %s refused: %s", verb, peer, e)
    except Exception as e:
        log.warning("%s from %s: unreadable identifier: %s", verb, peer, e)
    return None


def _send(event: Event, insts: list[query.StoredInstance], store: Store, verb: str
          ) -> Iterator[tuple[int, Dataset | None]]:
    cancelled = Cancelled(event)
    for n, inst in enumerate(insts):
        if cancelled():
            log.info("%s from %s cancelled after %d of %d", verb,
                     event.assoc.requestor.ae_title, n, len(insts))
            yield 0xFE00, None
            return
        yield 0xFF00, _ref(inst, store)
    log.info("%s from %s: %d instance(s) sent", verb, event.assoc.requestor.ae_title, len(insts))


def handle_get(event: Event, index: Index, store: Store) -> Iterator[Any]:
    insts = _lookup(event, index, "C-GET")
    if insts is None:
        yield 1
        yield 0xA900, None   # Identifier does not match SOP Class
        return
    send_stored(event.assoc)
    yield len(insts)
    yield from _send(event, insts, store, "C-GET")


def handle_move(event: Event, cfg: Config, index: Index, store: Store) -> Iterator[Any]:
    dest = (event.move_destination or "").strip()
    node = cfg.node_by_aet(dest)
    if node is None:
        log.warning("C-MOVE from %s to unknown destination %r refused (0xA801); add it to "
                    "[[nodes]]", event.assoc.requestor.ae_title, dest)
        yield None, None
        return
    insts = _lookup(event, index, "C-MOVE")
    if insts is None:
        yield node.host, node.port
        yield 1
        yield 0xA900, None
        return

    def on_accepted(ev: Event) -> None:
        send_stored(ev.assoc)

    yield node.host, node.port, {
        "ae_title": node.aet,
        "contexts": move_contexts(insts) or None,
        "evt_handlers": [(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_ACCEPTED, on_accepted)],
    }
    yield len(insts)
    yield from _send(event, insts, store, f"C-MOVE to {node.aet}")
