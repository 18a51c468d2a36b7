"""DICOM upper-layer PDUs written and read by hand (PS3.8 9.3), for tests that speak to pacsd
the way real, broken or hostile peers may: tests/reliability/test_hostile_dicom.py,
tests/reliability/test_log_lines.py, tests/test_fast_lane.py."""

from __future__ import annotations

import socket
import struct
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification)

LOCAL = "127.0.0.1"
ECHO_CX, STORE_CX, FIND_CX = 1, 3, 5   # the contexts Peer proposes

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IVRLE = b"1.2.840.10008.1.2"


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def pres_context(cx_id: int, abstract: bytes = VERIFICATION, syntaxes=(IVRLE,)) -> bytes:
    return item(0x20, bytes([cx_id, 0, 0, 0]) + item(0x30, abstract)
                + b"".join(item(0x40, ts) for ts in syntaxes))


def associate_rq(contexts: list[bytes] | None = None, calling: bytes = b"HOSTILE",
                 called: bytes = b"PACSD", version: int = 1, max_pdu: int = 16384) -> bytes:
    contexts = [pres_context(1)] if contexts is None else contexts
    user = item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", version, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16]
            + bytes(32) + item(0x10, APP_CONTEXT) + b"".join(contexts) + user)
    return pdu(0x01, body)


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None if the server closed the connection."""
    def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf
    head = exactly(6)
    if head is None:
        return None
    kind, _, length = struct.unpack(">BBL", head)
    body = exactly(length) if length <= 1 << 20 else None
    return kind, body or b""


# --- a peer that speaks PDUs by hand ------------------------------------------------------------

CONTEXTS = [pres_context(ECHO_CX),
            pres_context(STORE_CX, CTImageStorage.encode(), (ExplicitVRLittleEndian.encode(),)),
            pres_context(FIND_CX, StudyRootQueryRetrieveInformationModelFind.encode())]


class Peer:
    """One association, spoken by hand."""

    def __init__(self, port: int, max_pdu: int = 16384) -> None:
        self.sock = socket.create_connection((LOCAL, port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(associate_rq(CONTEXTS, calling=b"PYNETDICOM", max_pdu=max_pdu))
        kind, body = self.read_pdu()
        assert kind == 0x02, f"association not accepted (PDU type 0x{kind:02X})"
        self.accepted = _accepted_contexts(body)

    def read_pdu(self) -> tuple[int, bytes]:
        got = read_pdu(self.sock)
        if got is None:
            raise ConnectionError("closed")
        return got

    def send_pdu(self, items: list[tuple[int, int, bytes]]) -> None:
        """One P-DATA-TF of PDV items (context, control header, bytes)."""
        self.sock.sendall(pdu(0x04, b"".join(struct.pack(">LBB", len(v) + 2, cx, ctl) + v
                                             for cx, ctl, v in items)))

    def response(self) -> Dataset:
        """The next whole command set the server sends (over as many PDUs as it takes)."""
        raw = b""
        while True:
            kind, body = self.read_pdu()
            assert kind == 0x04, f"PDU type 0x{kind:02X} instead of P-DATA-TF"
            offset = 0
            while offset < len(body):
                length, _, control = struct.unpack_from(">LBB", body, offset)
                assert control & 1, "a data set fragment in a response to C-STORE/C-ECHO"
                raw += body[offset + 6:offset + 4 + length]
                offset += 4 + length
                if control & 2:
                    return decode_dataset(BytesIO(raw), True, True)

    def aborted(self) -> bool:
        """Whether the server sent A-ABORT (and closed) rather than anything else."""
        got = read_pdu(self.sock)
        return got is not None and got[0] == 0x07

    def release(self) -> None:
        self.sock.sendall(pdu(0x05, bytes(4)))
        kind, _ = self.read_pdu()
        assert kind == 0x06
        self.sock.close()


def _accepted_contexts(ac_body: bytes) -> set[int]:
    accepted, offset = set(), 68
    while offset < len(ac_body):
        kind, _, length = struct.unpack_from(">BBH", ac_body, offset)
        if kind == 0x21 and ac_body[offset + 6] == 0:
            accepted.add(ac_body[offset + 4])
        offset += 4 + length
    return accepted


def implicit(**fields) -> bytes:
    """A data set of these elements, encoded by pydicom in Implicit VR Little Endian."""
    ds = Dataset()
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def command(**fields) -> bytes:
    """A command set encoded by pydicom (Implicit VR Little Endian, group length first)."""
    rest = implicit(**fields)
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(rest)) + rest


def store_rq(msg_id: int, ds: Dataset) -> bytes:
    return command(AffectedSOPClassUID=CTImageStorage, CommandField=0x0001, MessageID=msg_id,
                   Priority=0, CommandDataSetType=0x0000,
                   AffectedSOPInstanceUID=ds.SOPInstanceUID)


def echo_rq(msg_id: int) -> bytes:
    return command(AffectedSOPClassUID=Verification, CommandField=0x0030, MessageID=msg_id,
                   CommandDataSetType=0x0101)


def encoded(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def pieces(raw: bytes, size: int) -> list[bytes]:
    return [raw[i:i + size] for i in range(0, len(raw), size)]


def stored_files(server) -> list[Path]:
    """The stored images (not those in the recycle bin, STORAGE/.trash)."""
    return sorted(p for p in server.cfg.storage_path.rglob("*.dcm") if ".trash" not in p.parts)


def leftovers(server) -> list[Path]:
    """Temporary files of writes that did not finish."""
    return sorted(p for p in (server.cfg.storage_path / ".tmp").rglob("*") if p.is_file())
