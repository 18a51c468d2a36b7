"""Query/Retrieve GET and MOVE as SCP (PS3.4 C.4.2, C.4.3), Patient Root and Study Root.

Both look up the stored instances with query.instances() and hand pynetdicom one `StoredRef`
per instance: a data set holding only its UIDs plus the path of the stored file. The sending
association's send_c_store is wrapped (`send_stored`) so that the file's bytes go out as they
are, in chunks, when the peer accepted the stored transfer syntax; only otherwise is the file
transcoded (pacsd.imaging.transcode): for C-GET to what the requestor accepted, for C-MOVE to the
destination node's transfer_syntaxes. Those helpers live in pacsd.nodes.remote, which sends stored
files to remote nodes for the XML-RPC side and routing too. Each sending association logs one
summary line (sent as stored / transcoded / failed) when it closes.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from pacsd import query
from pacsd.dicom_status import CANCEL, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, PENDING
from pacsd.accounts import Accounts
from pacsd.dimse.find import Cancelled, parse_identifier
from pacsd.index import Index
from pacsd.nodes.remote import CONNECTION_HANDLERS, move_contexts, send_stored, stored_ref
from pacsd.storage.store import Store

log = logging.getLogger(__name__)


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
            yield CANCEL, None
            return
        yield PENDING, stored_ref(inst, store)


def handle_get(event: Event, index: Index, store: Store) -> Iterator[Any]:
    insts = _lookup(event, index, "C-GET")
    if insts is None:
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    send_stored(event.assoc, f"C-GET from {event.assoc.requestor.ae_title}")
    yield len(insts)
    yield from _send(event, insts, store, "C-GET")


def handle_move(event: Event, accounts: Accounts, index: Index, store: Store
                ) -> Iterator[Any]:
    dest = (event.move_destination or "").strip()
    node = accounts.node_by_aet(dest)
    if node is None:
        log.warning("C-MOVE from %s to unknown destination %r refused (0xA801); add it to "
                    "[[nodes]] or on the admin page", event.assoc.requestor.ae_title, dest)
        yield None, None
        return
    insts = _lookup(event, index, "C-MOVE")
    if insts is None:
        yield node.host, node.port
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return

    label = f"C-MOVE to {node.aet} from {event.assoc.requestor.ae_title}"

    def on_accepted(ev: Event) -> None:
        send_stored(ev.assoc, label, node.transfer_syntaxes)

    yield node.host, node.port, {
        "ae_title": node.aet,
        "contexts": move_contexts(insts, node) or None,
        "evt_handlers": [*CONNECTION_HANDLERS, (evt.EVT_ACCEPTED, on_accepted)],
    }
    yield len(insts)
    yield from _send(event, insts, store, f"C-MOVE to {node.aet}")
