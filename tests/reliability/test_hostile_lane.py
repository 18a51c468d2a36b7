"""Broken and hostile peers against the fast lane (pacsd.compat.pynetdicom_lane): a message the
lane took whose framing breaks is aborted (A-ABORT, as pynetdicom aborts an invalid PDU),
nothing of it is kept, and the server goes on serving everyone else. The well-formed side is
tests/test_fast_lane.py; the PDUs are written by hand (tests/dimse_raw.py)."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).parent.parent))

from conftest import associate, wait_for  # noqa: E402
from data import ct_slice  # noqa: E402
from dimse_raw import (ECHO_CX, STORE_CX, Peer, command, echo_rq, encoded,  # noqa: E402
                       leftovers, store_rq, stored_files)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # pydicom on the bad UID


def _still_serves(server) -> None:
    with associate(server.dicom_port, [build_context(Verification)]) as assoc:
        assert assoc.send_c_echo().Status == 0


def test_a_data_set_before_its_command_aborts(server, caplog):
    peer = Peer(server.dicom_port)
    peer.send_pdu([(STORE_CX, 0x02, b"\x08\x00\x16\x00")])
    assert peer.aborted()
    assert "a data set fragment before its command set" in caplog.text
    _still_serves(server)


def test_a_command_inside_a_data_set_aborts_and_nothing_is_kept(server):
    ds = ct_slice(seed=7, patient=1, study=1, series=1, number=1, size=64)
    data = encoded(ds)
    peer = Peer(server.dicom_port)
    peer.send_pdu([(STORE_CX, 0x03, store_rq(1, ds)), (STORE_CX, 0x00, data[:4000])])
    peer.send_pdu([(ECHO_CX, 0x03, echo_rq(2))])
    assert peer.aborted()
    _still_serves(server)
    wait_for(lambda: not leftovers(server), 10, "the unfinished file to be removed")
    assert stored_files(server) == []


def test_a_command_set_beyond_64_kib_aborts(server):
    """Command fragments that never end (no last flag) are not gathered without bound."""
    peer = Peer(server.dicom_port)
    fragment = struct.pack("<HHL", 0, 0x0902, 16000) + b"x" * 16000   # an Error Comment
    for _ in range(5):
        try:
            peer.send_pdu([(STORE_CX, 0x01, fragment)])
        except OSError:   # aborted and closed while we were still sending
            break
    assert peer.aborted()
    _still_serves(server)


def test_a_pdv_longer_than_its_pdu_aborts(server):
    peer = Peer(server.dicom_port)
    body = struct.pack(">LBB", 5000, STORE_CX, 0x03) + b"x" * 20
    peer.sock.sendall(struct.pack(">BBL", 0x04, 0, len(body)) + body)
    assert peer.aborted()
    _still_serves(server)


def test_a_connection_dropped_mid_image_keeps_nothing(server):
    ds = ct_slice(seed=8, patient=1, study=1, series=1, number=1, size=128)
    data = encoded(ds)
    peer = Peer(server.dicom_port)
    peer.send_pdu([(STORE_CX, 0x03, store_rq(1, ds))])
    peer.send_pdu([(STORE_CX, 0x00, data[:len(data) // 2])])
    time.sleep(0.2)   # the first half is being written to its file
    peer.sock.close()
    wait_for(lambda: not leftovers(server) and not server.dicom.active_associations, 10,
             "the association to end and its unfinished file to be removed")
    assert stored_files(server) == []
    _still_serves(server)


def test_a_bad_uid_in_the_request_is_refused_without_a_file(server):
    ds = ct_slice(seed=9, patient=1, study=1, series=1, number=1, size=16)
    peer = Peer(server.dicom_port)
    rq = command(AffectedSOPClassUID=CTImageStorage, CommandField=0x0001, MessageID=3,
                 Priority=0, CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.x/../y")
    peer.send_pdu([(STORE_CX, 0x03, rq), (STORE_CX, 0x02, encoded(ds))])
    rsp = peer.response()
    assert rsp.Status == 0xC000   # as through pynetdicom (test_store's hostile UIDs)
    peer.release()
    assert stored_files(server) == [] and leftovers(server) == []
