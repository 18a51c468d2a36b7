"""The fast lane (pacsd.compat.pynetdicom_lane, pacsd.dimse.fast): C-STORE and C-ECHO answered
by the thread that reads the association, everything else handed to pynetdicom unchanged.

A peer here speaks PDUs by hand on a plain socket, so that it can cut messages where real
peers may (a command set over several PDUs, a PDU holding the end of one message and the start
of the next, fragments of a few bytes) and where only broken or hostile ones do (a data set
before its command, a command inside a data set, a PDV longer than its PDU, a connection
dropped mid-image: tests/reliability/test_hostile_lane.py). Command sets are encoded with pydicom and responses decoded with it, so
that pacsd's own codec (pacsd.dicom_commands) is checked against a third party's.
"""

from __future__ import annotations

import re
import socket
import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage, StudyRootQueryRetrieveInformationModelFind)

from conftest import associate
from data import ct_slice
from pacsd import dicom_commands
from pacsd.dicom_commands import CommandError

from dimse_raw import (ECHO_CX, FIND_CX, STORE_CX, Peer, command, echo_rq, encoded, implicit,
                       leftovers, pieces, store_rq, stored_files)

# --- messages cut where real peers may cut them ---------------------------------------------

def test_a_store_cut_into_tiny_fragments_is_stored_byte_for_byte(server):
    ds = ct_slice(seed=1, patient=1, study=1, series=1, number=1, size=64)
    data, rq = encoded(ds), store_rq(7, ds)
    peer = Peer(server.dicom_port)
    assert peer.accepted == {ECHO_CX, STORE_CX, FIND_CX}
    # The command set over three PDUs; its last fragment shares a PDU with the first data
    # fragments; then the data set in 100-byte fragments, five to a PDU.
    cmd = pieces(rq, 30)
    for frag in cmd[:-2]:
        peer.send_pdu([(STORE_CX, 0x01, frag)])
    data_frags = pieces(data, 100)
    peer.send_pdu([(STORE_CX, 0x01, cmd[-2]), (STORE_CX, 0x03, cmd[-1]),
                   (STORE_CX, 0x00, data_frags[0]), (STORE_CX, 0x00, data_frags[1])])
    rest = data_frags[2:]
    for i in range(0, len(rest), 5):
        batch = rest[i:i + 5]
        peer.send_pdu([(STORE_CX, 0x02 if i + 5 >= len(rest) and j == len(batch) - 1 else 0x00,
                        frag) for j, frag in enumerate(batch)])
    rsp = peer.response()
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8001, 7, 0)
    assert rsp.AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert rsp.AffectedSOPClassUID == CTImageStorage
    peer.release()
    [path] = stored_files(server)
    kept = dcmread(path)
    assert kept.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert path.read_bytes().endswith(data)   # the data set kept exactly as it came
    assert leftovers(server) == []


def test_store_echo_and_find_share_an_association_and_a_pdu(server):
    """Messages pacsd answers itself and messages pynetdicom answers, one after another on
    one association, two of them in one PDU: each gets its own response, in order."""
    first = ct_slice(seed=2, patient=1, study=1, series=1, number=1, size=16)
    second = ct_slice(seed=3, patient=1, study=1, series=1, number=2, size=16)
    peer = Peer(server.dicom_port)
    # A C-ECHO and a whole C-STORE in one PDU.
    peer.send_pdu([(ECHO_CX, 0x03, echo_rq(1)), (STORE_CX, 0x03, store_rq(2, first)),
                   (STORE_CX, 0x02, encoded(first))])
    echo, store = peer.response(), peer.response()
    assert (echo.CommandField, echo.MessageIDBeingRespondedTo, echo.Status) == (0x8030, 1, 0)
    assert (store.CommandField, store.MessageIDBeingRespondedTo, store.Status) == (0x8001, 2, 0)
    # A C-FIND (pynetdicom's), its identifier in two fragments, then another C-STORE.
    ident = implicit(QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    peer.send_pdu([(FIND_CX, 0x03, command(
        AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind, CommandField=0x0020,
        MessageID=3, Priority=0, CommandDataSetType=0x0000)), (FIND_CX, 0x00, ident[:10])])
    peer.send_pdu([(FIND_CX, 0x02, ident[10:])])
    statuses = []
    while not statuses or statuses[-1] == 0xFF00:
        kind, body = peer.read_pdu()
        assert kind == 0x04
        rsp = body[6:] if body[5] & 1 else None
        if rsp is not None:   # a command set (pending ones are followed by an identifier)
            statuses.append(decode_dataset(BytesIO(rsp), True, True).Status)
    assert statuses == [0xFF00, 0x0000]   # one study, then Success
    peer.send_pdu([(STORE_CX, 0x03, store_rq(4, second)), (STORE_CX, 0x02, encoded(second))])
    assert peer.response().Status == 0
    peer.release()
    assert len(stored_files(server)) == 2


def test_a_long_association_of_messages_pynetdicom_answers(server):
    """Hundreds of C-FINDs (not the lane's) then a C-STORE (the lane's), on one association:
    what the lane passes on leaves nothing behind in it (a command set kept from one message
    to the next would grow until the lane refused it)."""
    peer = Peer(server.dicom_port)
    query = implicit(QueryRetrieveLevel="STUDY", PatientID="nobody")
    for msg_id in range(1, 1001):
        peer.send_pdu([(FIND_CX, 0x03, command(
            AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind,
            CommandField=0x0020, MessageID=msg_id, Priority=0, CommandDataSetType=0x0000)),
            (FIND_CX, 0x02, query)])
        kind, body = peer.read_pdu()
        assert kind == 0x04, f"C-FIND {msg_id}: PDU type 0x{kind:02X}"
        assert decode_dataset(BytesIO(body[6:]), True, True).Status == 0
    ds = ct_slice(seed=5, patient=1, study=1, series=1, number=1, size=16)
    peer.send_pdu([(STORE_CX, 0x03, store_rq(1001, ds)), (STORE_CX, 0x02, encoded(ds))])
    assert peer.response().Status == 0
    peer.release()


def test_responses_fit_the_peers_maximum_pdu(server):
    """A peer that takes PDUs of at most 64 bytes gets the C-STORE response in pieces."""
    ds = ct_slice(seed=6, patient=1, study=1, series=1, number=1, size=16)
    peer = Peer(server.dicom_port, max_pdu=64)
    peer.send_pdu([(STORE_CX, 0x03, store_rq(9, ds))])
    for frag in pieces(encoded(ds), 58)[:-1]:
        peer.send_pdu([(STORE_CX, 0x00, frag)])
    peer.send_pdu([(STORE_CX, 0x02, pieces(encoded(ds), 58)[-1])])
    seen = []
    raw = b""
    while True:
        kind, body = peer.read_pdu()
        assert kind == 0x04
        seen.append(len(body) + 6)
        raw += body[6:]
        if body[5] & 2:
            break
    assert len(seen) > 1 and max(seen) <= 64 + 6   # the PDU's header aside (PS3.8 D.1)
    rsp = decode_dataset(BytesIO(raw), True, True)
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (9, 0)
    peer.release()


def test_the_way_back_without_the_lane(make_server):
    """[dicom] fast_lane = false: pynetdicom carries every message, with the same results."""
    server = make_server(dicom={"fast_lane": False})
    ds = ct_slice(seed=10, patient=1, study=1, series=1, number=1, size=16)
    peer = Peer(server.dicom_port)
    peer.send_pdu([(ECHO_CX, 0x03, echo_rq(1))])
    assert peer.response().Status == 0
    peer.send_pdu([(STORE_CX, 0x03, store_rq(2, ds)), (STORE_CX, 0x02, encoded(ds))])
    assert peer.response().Status == 0
    peer.release()
    assert len(stored_files(server)) == 1
    assert server.dicom.stats.snapshot()["requests"] == {"C-ECHO": 1, "C-STORE": 1}


# --- the command set codec, against pydicom's ---------------------------------------------

def test_commands_decode_what_pydicom_encodes():
    rq = command(AffectedSOPClassUID=CTImageStorage, CommandField=0x0001, MessageID=513,
                 Priority=2, CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4",
                 MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=77)
    got = dicom_commands.decode(rq)
    assert (got.field, got.message_id, got.has_data, got.sop_class, got.sop_instance,
            got.priority, got.move_originator_aet, got.move_originator_id) == (
        0x0001, 513, True, CTImageStorage, "1.2.3.4", 2, "MOVER", 77)
    echo = dicom_commands.decode(echo_rq(5))
    assert (echo.field, echo.message_id, echo.has_data) == (0x0030, 5, False)


def test_responses_decode_with_pydicom():
    rq = dicom_commands.decode(store_rq(65535, ct_slice(seed=1, patient=1, study=1, series=1,
                                                        number=1, size=8)))
    for status, comment in ((0, ""), (0xA700, "storage full"), (0xC000, "odd")):
        raw = dicom_commands.response(rq, status, comment)
        ds = decode_dataset(BytesIO(raw), True, True)
        assert ds.CommandGroupLength == len(raw) - 12
        assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status,
                ds.CommandDataSetType) == (0x8001, 65535, status, 0x0101)
        assert ds.AffectedSOPInstanceUID == rq.sop_instance
        assert ds.get("ErrorComment", "") == comment
        assert all(len(elem.value if isinstance(elem.value, bytes) else b"") % 2 == 0
                   for elem in ds)
    request = dicom_commands.store_request(3, CTImageStorage, "1.2.3.45", 1, "MOVER", 9)
    ds = decode_dataset(BytesIO(request), True, True)
    assert (ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType,
            ds.AffectedSOPInstanceUID, ds.MoveOriginatorApplicationEntityTitle,
            ds.MoveOriginatorMessageID) == (1, 3, 1, 0, "1.2.3.45", "MOVER", 9)
    assert ds.CommandGroupLength == len(request) - 12


@pytest.mark.parametrize("raw, why", [
    (b"\x08\x00\x16\x00\x02\x00\x00\x00ab", "element (0008,0016) in a command set"),
    (b"\x00\x00\x00\x01\x02\x00\x00\x00", "longer than the command set"),
    (b"\x00\x00\x00\x01", "ends inside an element header"),
    (struct.pack("<HHL", 0, 0x0110, 2) + b"\x01\x00", "without Command Field"),
    (struct.pack("<HHL", 0, 0x0100, 4) + b"\x01\x00\x00\x00", "is 4 bytes long, not 2"),
])
def test_what_is_no_command_set_is_refused(raw, why):
    with pytest.raises(CommandError, match=re.escape(why)):
        dicom_commands.decode(raw)


# --- C-GET: the files sent raw by the lane, the responses read by it --------------------------

def test_c_get_counts_each_sub_operation_and_sends_the_bytes_as_stored(server):
    """pynetdicom as the C-GET requestor: one pending response per image sent (pacsd packs
    them), counting down, then Success; every image byte for byte as stored; and an image
    the requestor refuses counts as failed."""
    from pynetdicom import evt
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    slices = [ct_slice(seed=20, patient=1, study=1, series=1, number=i + 1, size=32)
              for i in range(4)]
    peer = Peer(server.dicom_port)
    for i, ds in enumerate(slices):
        peer.send_pdu([(STORE_CX, 0x03, store_rq(i + 1, ds)), (STORE_CX, 0x02, encoded(ds))])
        assert peer.response().Status == 0
    peer.release()
    refused = slices[2].SOPInstanceUID
    got: dict[str, bytes] = {}

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == refused:
            return 0xA700
        got[uid] = event.encoded_dataset(include_meta=False)
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    with associate(server.dicom_port, [build_context(GET),
                                       build_context(CTImageStorage, [ExplicitVRLittleEndian])],
                   aet="GETSCU", ext_neg=[role],
                   evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.SeriesInstanceUID = slices[0].SeriesInstanceUID
        responses = [status for status, _ in assoc.send_c_get(q, GET)]
    pending = [(r.Status, r.NumberOfRemainingSuboperations, r.NumberOfCompletedSuboperations,
                r.NumberOfFailedSuboperations, r.NumberOfWarningSuboperations)
               for r in responses[:-1]]
    assert [p[0] for p in pending] == [0xFF00] * 4
    assert [p[1] for p in pending] == [3, 2, 1, 0]
    assert pending[-1][2:] == (3, 1, 0)
    final = responses[-1]
    assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 1   # PS3.4 C.4.3.1.3
    assert got == {ds.SOPInstanceUID: encoded(ds) for ds in slices if ds.SOPInstanceUID != refused}
