"""Query/Retrieve GET and MOVE as SCP (PS3.4 C.4.2, C.4.3), Patient Root and Study Root.

Both look up the stored instances with query.instances() and hand pynetdicom one `StoredRef`
per instance: a data set holding only its UIDs plus the path of the stored file. The sending
association's send_c_store is wrapped (`send_stored`) so that the file's bytes go out as they
are, in chunks, when the peer accepted the stored transfer syntax; only otherwise is the file
transcoded (pacsd.imaging.transcode): for C-GET to what the requestor accepted, for C-MOVE to the
destination node's transfer_syntaxes. Those helpers live in pacsd.nodes.remote, which sends stored
files to remote nodes for the XML-RPC side and routing too. Each sending association logs one
summary line (sent as stored / transcoded / failed) when it closes.

C-MOVE statuses (PS3.4 C.4.2.1.5, Table C.4-2): 0xA801 "Move Destination unknown" only when
no node has the destination's AE title. A known node that cannot be sent to (its port closed,
no answer, the association rejected, or none of the presentation contexts accepted) is
answered 0xA702 "Refused: Out of Resources - Unable to perform sub-operations", with the counts
(every sub-operation failed), the Failed SOP Instance UID List and an Error Comment saying
what happened: C.4.2.3.1 asks for a Failure or Refused status when every sub-operation failed,
and of those A702 is the one that names this case; being an A7xx "Refused" it tells the SCU
that the same request may succeed later (once the node is back), where a Cxxx "Unable to
process" would say the request itself was wrong. DCMTK's dcmqrscp answers the same.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from pacsd import query
from pacsd.query import scope as scopes
from pacsd.compat import pynetdicom as compat
from pacsd.dicom_status import (CANCEL, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, PENDING,
                                UNABLE_TO_PERFORM_SUBOPERATIONS)
from pacsd.accounts import Accounts
from pacsd.config import Node
from pacsd.dimse.find import Cancelled, parse_identifier
from pacsd.index import Index
from pacsd.nodes.attempt import COMMENT_MAX
from pacsd.nodes.remote import (CONNECTION_HANDLERS, associate_to_send, move_contexts,
                                send_stored, stored_ref)
from pacsd.storage.store import Store

log = logging.getLogger(__name__)


def scope_of(accounts: Accounts | None, aet: str) -> Any:
    """What a DICOM caller may find and retrieve: its node's [[groups]]' scope, None for all."""
    if accounts is None:
        return None
    return scopes.of_groups(accounts.groups_of_caller(aet), f"caller {aet}")


def _lookup(event: Event, index: Index, verb: str, accounts: Accounts | None
            ) -> list[query.StoredInstance] | None:
    peer = event.assoc.requestor.ae_title
    try:
        req, _ = parse_identifier(event.identifier, str(event.request.AffectedSOPClassUID))
        # A node in [[groups]] retrieves its groups' studies only.
        req.scope = scope_of(accounts, peer)
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
        compat.keep_alive(event.assoc)   # sending for it is not being idle
        if cancelled():
            log.info("%s from %s cancelled after %d of %d", verb,
                     event.assoc.requestor.ae_title, n, len(insts))
            yield CANCEL, None
            return
        yield PENDING, stored_ref(inst, store)
    compat.keep_alive(event.assoc)   # the last sub-operation, before the final response


def handle_get(event: Event, index: Index, store: Store, accounts: Accounts | None = None
               ) -> Iterator[Any]:
    insts = _lookup(event, index, "C-GET", accounts)
    if insts is None:
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    send_stored(event.assoc, f"C-GET from {event.assoc.requestor.ae_title}")
    yield len(insts)
    yield from _send(event, insts, store, "C-GET")


MAX_SUBOPERATIONS = 65535   # the counts are US (PS3.7 E.1): pynetdicom refuses more (0xC516)
UID_LIST_MAX = 65534        # bytes of a UI value with a 16-bit length (Explicit VR, PS3.5 7.1.2)


def _failed(insts: list[query.StoredInstance], comment: str, implicit: bool
            ) -> tuple[Dataset, Dataset]:
    """The final response of a C-MOVE none of whose sub-operations could be performed: the
    status with its Error Comment, and the identifier with the Failed SOP Instance UID List
    (C.4.2.1.4.2: in every Failure, Refused, Warning or Cancel response). In Explicit VR the
    list's value has a 16-bit length: past about a thousand UIDs it is cut to what fits."""
    status = Dataset()
    status.Status = UNABLE_TO_PERFORM_SUBOPERATIONS
    status.ErrorComment = comment[:COMMENT_MAX]
    uids: list[str] = []
    size = -1
    for inst in insts:
        size += len(inst.sop_instance_uid) + 1
        if not implicit and size > UID_LIST_MAX:
            break
        uids.append(inst.sop_instance_uid)
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = uids
    return status, identifier


def _where(node: Node) -> str:
    return f"{node.name + ' ' if node.name else ''}({node.aet}@{node.host}:{node.port})"


def handle_move(event: Event, accounts: Accounts, index: Index, store: Store
                ) -> Iterator[Any]:
    dest = (event.move_destination or "").strip()
    requestor = event.assoc.requestor.ae_title
    node = accounts.node_by_aet(dest)
    if node is None:
        log.warning("C-MOVE from %s to unknown destination %r refused (0xA801); add it to "
                    "[[nodes]] or on the admin page", requestor, dest)
        yield None, None
        return
    handover = compat.HANDOVER.fits
    insts = _lookup(event, index, "C-MOVE", accounts)
    if insts is None:
        # Nothing to send: pynetdicom is handed no sub-association rather than opening one.
        yield node.host, node.port, ({compat.MADE: compat.NOT_SENT} if handover else {})
        yield 1
        yield IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return

    label = f"C-MOVE to {node.aet} from {requestor}"
    if not insts or len(insts) > MAX_SUBOPERATIONS or not handover:
        # pynetdicom's own way: it answers these without associating (no match: Success;
        # too many: 0xC516), or (the hand-over unavailable) associates itself.
        def on_accepted(ev: Event) -> None:
            send_stored(ev.assoc, label, node.transfer_syntaxes)

        yield node.host, node.port, {
            "ae_title": node.aet,
            "contexts": move_contexts(insts, node) or None,
            "evt_handlers": [*CONNECTION_HANDLERS, (evt.EVT_ACCEPTED, on_accepted)],
        }
        yield len(insts)
        yield from _send(event, insts, store, f"C-MOVE to {node.aet}")
        return

    # The sub-association, requested here so that a known node that is down or refuses every
    # presentation context is answered 0xA702 with the reason, not 0xA801 (module docstring).
    sub, (why, comment) = associate_to_send(event.assoc.ae, node, insts, label)
    if sub is None:
        log.warning("C-MOVE from %s to %s: none of %d instance(s) sent (0xA702): %s",
                    requestor, _where(node), len(insts), why)
        implicit = bool(event.context.transfer_syntax.is_implicit_VR)
        yield node.host, node.port, {compat.MADE: compat.NOT_SENT}
        yield len(insts)
        yield _failed(insts, comment, implicit)
        return
    try:
        yield node.host, node.port, {compat.MADE: sub}
        yield len(insts)
        yield from _send(event, insts, store, f"C-MOVE to {node.aet}")
    finally:
        # pynetdicom releases it after the last sub-operation; this covers a requestor that
        # went away before pynetdicom took the association over.
        if sub.is_established:
            sub.release()
