"""What pacsd's log says about peers that misbehave (issue 18, point 9): one line of pacsd's own
words, no ERROR nor traceback from a library, nothing in the admin page's "recent errors".

- a peer that resets the connection (SO_LINGER 0) right after a normal A-RELEASE, as CTN does;
- an unparsable C-STORE data set (truncated; sequences nested deeper than Python's stack);
- a data set with a bad VR value that pydicom warns about while it is stored.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import pytest
import requests
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.sop_class import Verification

sys.path.insert(0, str(Path(__file__).parent))

from conftest import LOCAL, associate, serve, store_files, wait_for, write_config  # noqa: E402
from data import ct_slice  # noqa: E402
from test_hostile_dicom import (A_ASSOCIATE_AC, associate_rq, body_of, c_store_rq,  # noqa: E402
                                deep_sequence, pdu, raw, read_pdu, response_status)

A_RELEASE_RP = 0x06


@pytest.fixture
def pacs(tmp_path):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "pacsd.toml", data,
                       log={"file": str(tmp_path / "pacsd.log"), "level": "INFO"})
    with serve(cfg, data) as proc:
        proc.logfile = tmp_path / "pacsd.log"
        yield proc


def log_since(pacs, offset: int) -> str:
    return pacs.logfile.read_bytes()[offset:].decode("utf-8", "replace")


def recent_errors(pacs) -> list[dict]:
    rsp = requests.get(f"{pacs.http_url}/api/log", timeout=10)
    assert rsp.status_code == 200, rsp.text
    return rsp.json()


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def echo_works(port: int) -> bool:
    with associate(port, [(Verification,)], aet="AFTER") as assoc:
        return bool(assoc.send_c_echo().Status == 0)


def test_a_reset_after_a_normal_release_is_no_error(pacs):
    start = pacs.logfile.stat().st_size
    for n in range(10):
        s = socket.create_connection((LOCAL, pacs.port), timeout=10)
        s.sendall(associate_rq(calling=b"CTN"))
        got = read_pdu(s)
        assert got and got[0] == A_ASSOCIATE_AC, got
        s.sendall(pdu(0x05, bytes(4)))   # A-RELEASE-RQ
        if n % 2 == 0:                   # half wait for the A-RELEASE-RP, half do not
            got = read_pdu(s)
            assert got and got[0] == A_RELEASE_RP, got
        reset(s)
    assert echo_works(pacs.port)
    # pynetdicom's reader threads log as they notice the reset: wait until every one of the
    # ten is gone (the status page counts associations), then read the log.
    wait_for(lambda: requests.get(f"{pacs.http_url}/api/status", timeout=10
                                  ).json()["associations"] == 0, 10, "the associations to end")
    text = log_since(pacs, start)
    assert " ERROR " not in text and "Traceback" not in text and "ConnectionReset" not in text, \
        text[-3000:]
    assert [e for e in recent_errors(pacs) if e["logger"].startswith("pynetdicom")] == []


@pytest.mark.parametrize("kind", ["truncated", "nested too deep"])
def test_an_unparsable_data_set_is_refused_in_one_line(pacs, kind):
    ds = ct_slice(seed=90, patient=1, study=1, series=1, number=1, size=16)
    body = body_of(ds)
    dataset = body[:len(body) // 3] if kind == "truncated" else deep_sequence(5000) + body
    start = pacs.logfile.stat().st_size
    status = None
    with raw(pacs.port) as s:
        s.sendall(associate_rq([_ct_context()], calling=b"MODALITY"))
        got = read_pdu(s)
        assert got and got[0] == A_ASSOCIATE_AC, got
        s.sendall(c_store_rq(str(ds.SOPInstanceUID).encode(), dataset))
        got = read_pdu(s)
        assert got and got[0] == 0x04, got
        status = response_status(got[1])
        s.sendall(pdu(0x05, bytes(4)))
        read_pdu(s)
    assert status == 0xC000
    lines = wait_for(lambda: [line for line in log_since(pacs, start).splitlines()
                              if "C-STORE from MODALITY" in line], 10, "pacsd's line")
    text = log_since(pacs, start)
    assert len(lines) == 1 and "refused with 0xC000" in lines[0], text  # type: ignore[arg-type]
    assert "Traceback" not in text and " ERROR " not in text, text


def test_a_bad_vr_value_is_no_warning_of_pydicom(pacs, tmp_path):
    """pydicom warns (its logger, and warnings.warn) about values too long for their VR while
    pacsd indexes them (a RIS's 20-character accession number in an SH of at most 16); the
    image is stored, and neither the log nor the admin page shows pydicom's warning."""
    ds = ct_slice(seed=91, patient=1, study=1, series=1, number=1, size=16)
    ds.AccessionNumber = "A2024" + "0" * 15
    path = tmp_path / "bad-vr.dcm"
    ds.save_as(path, enforce_file_format=True)
    start = pacs.logfile.stat().st_size
    assert store_files(pacs.port, [path]) == [0]
    text = log_since(pacs, start)
    assert "exceeds the maximum length" not in text, text
    assert not [line for line in text.splitlines()
                if " pydicom" in line or "py.warnings" in line or "UserWarning" in line], text
    assert not [e for e in recent_errors(pacs)
                if e["logger"].startswith(("pydicom", "py.warnings"))]


def _ct_context() -> bytes:
    from test_hostile_dicom import pres_context
    return pres_context(1, CTImageStorage.encode(), (ExplicitVRLittleEndian.encode(),))
