"""Hostile DICOM input against a real `pacsd serve`: raw PDUs, a P-DATA-TF announcing 4 GiB,
presentation-context abuse, fuzzed data sets and hostile UIDs.

Throughout, another thread opens an association and sends a C-ECHO again and again: none may
fail. The server's RSS is sampled: it must stay bounded. Afterwards it still stores and finds
a normal image, and nothing was written outside its storage folder.

Already covered elsewhere (not repeated): tests/test_store.py (hostile Study / SOP Instance UIDs
in the data set, a truncated data set, SOP class mismatch), tests/test_retrieve.py (C-MOVE to an
unknown destination).
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

sys.path.insert(0, str(Path(__file__).parent))

from conftest import LOCAL, c_find, serve, store_files, write_config  # noqa: E402
from dimse_raw import (APP_CONTEXT, IVRLE, VERIFICATION, associate_rq, item,  # noqa: E402,F401
                       pdu, pres_context, read_pdu)
from data import ct_slice, uid  # noqa: E402
from pacsd.imaging.header import file_meta_bytes  # noqa: E402
from report import PeakMemory, record, scaled  # noqa: E402

MAX_PDU = 262144
RSS_HEADROOM_MB = 200      # above the RSS at start; one buffered 4 GiB PDU would be far beyond
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


# --- raw PDUs (PS3.8 9.3) ---------------------------------------------------------------------

def _el(group: int, elem: int, value: bytes) -> bytes:
    """An implicit VR little endian element (DIMSE commands are always so encoded)."""
    return struct.pack("<HHL", group, elem, len(value)) + value


def _command(fields: bytes) -> bytes:
    return _el(0, 0x0000, struct.pack("<L", len(fields))) + fields


def _pdv(cx_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cx_id, flags) + data


def p_data_echo() -> bytes:
    """P-DATA-TF with a C-ECHO-RQ command on context 1."""
    command = _command(_el(0, 0x0002, VERIFICATION + b"\x00")
                       + _el(0, 0x0100, struct.pack("<H", 0x30))
                       + _el(0, 0x0110, struct.pack("<H", 1))
                       + _el(0, 0x0800, struct.pack("<H", 0x0101)))
    return pdu(0x04, _pdv(1, 0x03, command))


def c_store_rq(sop_instance: bytes, dataset: bytes) -> bytes:
    """P-DATA-TF PDUs of a C-STORE-RQ (CT Image Storage on context 1) as a peer could write
    it, whatever the Affected SOP Instance UID holds (pynetdicom refuses to send some)."""
    ct = CTImageStorage.encode() + b"\x00"
    uid_value = sop_instance + (b"\x00" if len(sop_instance) % 2 else b"")
    command = _command(_el(0, 0x0002, ct) + _el(0, 0x0100, struct.pack("<H", 0x0001))
                       + _el(0, 0x0110, struct.pack("<H", 7))
                       + _el(0, 0x0700, struct.pack("<H", 0))
                       + _el(0, 0x0800, struct.pack("<H", 0x0000))
                       + _el(0, 0x1000, uid_value))
    return pdu(0x04, _pdv(1, 0x03, command)) + pdu(0x04, _pdv(1, 0x02, dataset))


def response_status(body: bytes) -> int | None:
    """The Status (0000,0900) of a DIMSE response in one P-DATA-TF PDU body."""
    data = body[6:]
    i = 0
    while i + 8 <= len(data):
        group, elem, length = struct.unpack("<HHL", data[i:i + 8])
        if (group, elem) == (0, 0x0900):
            return int(struct.unpack("<H", data[i + 8:i + 10])[0])
        i += 8 + length
    return None


def raw_c_store(port: int, sop_instance: bytes, dataset: bytes) -> int | None:
    """One raw C-STORE on a new association: the response status (None: aborted, closed, or
    no answer within 3 s)."""
    with raw(port, timeout=3) as s:
        s.sendall(associate_rq([pres_context(1, CTImageStorage.encode(),
                                             (ExplicitVRLittleEndian.encode(),))]))
        got = read_pdu(s)
        assert got and got[0] == A_ASSOCIATE_AC, got
        s.sendall(c_store_rq(sop_instance, dataset))
        got = read_pdu(s)
        if got is None or got[0] != 0x04:
            return None
        s.sendall(pdu(0x05, bytes(4)))   # A-RELEASE-RQ
        read_pdu(s)
        return response_status(got[1])


@contextmanager
def raw(port: int, timeout: float = 15) -> Iterator[socket.socket]:
    s = socket.create_connection((LOCAL, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield s
    finally:
        s.close()


def answer(port: int, data: bytes, then_close: bool = False) -> tuple[int, bytes] | None:
    """Send raw bytes on a new connection, return the server's first PDU (None: it closed)."""
    with raw(port) as s:
        try:
            s.sendall(data)
            if then_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_pdu(s)


# --- the server under attack, with a C-ECHO loop and its memory watched -----------------------

class EchoLoop(threading.Thread):
    """A new association and a C-ECHO, again and again, until stopped (bounded in count)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.ok, self.failures = port, 0, []
        self._stop_flag = threading.Event()

    def run(self) -> None:
        ae = AE(ae_title="ECHOLOOP")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        for _ in range(100_000):
            if self._stop_flag.is_set():
                break
            try:
                assoc = ae.associate(LOCAL, self.port, ae_title="PACSD")
                if not assoc.is_established:
                    self.failures.append("not established")
                    continue
                status = assoc.send_c_echo()
                assoc.release()
                if status and status.Status == 0:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever it is
                self.failures.append(repr(e))
            self._stop_flag.wait(0.02)

    def stop(self) -> None:
        self._stop_flag.set()
        self.join(30)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    # No per-host cap: every attacker here, and the C-ECHO loop that stands for everyone else,
    # runs on this one host, and the attacks' dropped associations linger for network_timeout
    # (the cap itself is tested in test_dicom_rights.py).
    cfg = write_config(root / "pacsd.toml", data,
                       dicom={"max_pdu": MAX_PDU, "acse_timeout": 5, "network_timeout": 15,
                              "max_associations_per_host": 0},
                       log={"file": "-", "level": "INFO"})
    with serve(cfg, data) as proc:
        proc.root = root
        proc.base_rss_mb = psutil.Process(proc.proc.pid).memory_info().rss / 2**20
        yield proc


@contextmanager
def attacked(pacs, test: str, **figures: float) -> Iterator[dict]:
    """Run the block with the C-ECHO loop and the memory watch; check and record both after."""
    outside_before = outside_storage(pacs)
    echo = EchoLoop(pacs.port)
    counts = {"bad_inputs": 0, "associations": 0, "stored": 0, **figures}
    with PeakMemory(pacs.proc.pid) as mem:
        echo.start()
        try:
            yield counts
        finally:
            # At least a few echoes during the block, however quick it was.
            deadline = time.monotonic() + 10
            while echo.ok < 3 and time.monotonic() < deadline and echo.is_alive():
                time.sleep(0.05)
            echo.stop()
    record(test, associations=counts["associations"] + echo.ok, bad_inputs=counts["bad_inputs"],
           stored=counts["stored"], peak_rss_mb=mem.mb)
    assert pacs.proc.poll() is None, f"pacsd died:\n{pacs.output()}"
    assert echo.failures == [], (echo.failures[:5], pacs.output())
    assert echo.ok >= 3
    assert mem.mb - pacs.base_rss_mb < RSS_HEADROOM_MB, (mem.mb, pacs.base_rss_mb)
    assert outside_storage(pacs) == outside_before


def outside_storage(pacs) -> set[str]:
    """Every path under the test's root that is not in the storage folder nor the server's own
    bookkeeping (index, logs, run files, the audit trail, which records the refused attempts):
    hostile input must add none."""
    storage, audit = pacs.data / "storage", pacs.data / "audit"
    out = set()
    for p in pacs.root.rglob("*"):
        if p in (storage, audit) or storage in p.parents or audit in p.parents:
            continue
        if p.parent == pacs.data or p.parent == pacs.root:
            continue    # the index and its journal, pidfile, logs, config
        out.add(str(p.relative_to(pacs.root)))
    return out


# --- 1. malformed PDUs before and during association -----------------------------------------

def test_malformed_pdus_are_aborted_or_closed(pacs):
    good = associate_rq()
    cases = {
        "unknown PDU type": pdu(0x55, bytes(10)),
        "P-DATA-TF before any association": p_data_echo(),
        "A-ASSOCIATE-RQ announcing 2 GiB": pdu(0x01, good[6:], length=2**31),
        "A-ASSOCIATE-RQ truncated mid-item": pdu(0x01, good[6:6 + 100]),
        "A-ASSOCIATE-RQ length longer than sent": pdu(0x01, good[6:], length=len(good) + 500),
        "A-ASSOCIATE-RQ item length lying": pdu(0x01, good[6:74] + b"\x10\x00\xff\xff"
                                                + good[78:]),
        "header only": good[:6],
        "garbage": bytes(random.Random(1).getrandbits(8) for _ in range(300)),
        "A-RELEASE-RQ before any association": pdu(0x05, bytes(4)),
    }
    with attacked(pacs, "test_malformed_pdus_are_aborted_or_closed") as counts:
        for name, data in cases.items():
            got = answer(pacs.port, data, then_close=True)
            counts["bad_inputs"] += 1
            assert got is None or got[0] in (A_ABORT, A_ASSOCIATE_RJ), (name, got)


def test_association_request_oddities(pacs):
    """Junk AE titles, a bad protocol version, no / too many presentation contexts: each
    rejected or answered per PS3.8, and never an established association that can do more
    than it should."""
    with attacked(pacs, "test_association_request_oddities") as counts:
        # Zero presentation contexts (PS3.8 9.3.2: at least one is required): rejected or an
        # association in which nothing can be done. pynetdicom answers an empty AC.
        got = answer(pacs.port, associate_rq(contexts=[]))
        assert got and got[0] in (A_ASSOCIATE_RJ, A_ASSOCIATE_AC, A_ABORT), got
        if got[0] == A_ASSOCIATE_AC:
            assert b"\x21" not in got[1][68:69]   # no presentation context in the answer
        counts["bad_inputs"] += 1

        # 200 presentation contexts: IDs must be odd 1..255 (at most 128).
        many = [pres_context((2 * i + 1) % 256) for i in range(200)]
        got = answer(pacs.port, associate_rq(contexts=many))
        assert got is None or got[0] in (A_ASSOCIATE_RJ, A_ABORT, A_ASSOCIATE_AC), got
        counts["bad_inputs"] += 1

        # Junk in the AE titles (control characters, bytes beyond ASCII, backslash).
        for calling in (b"\x00\x01\x02\x1b[31m", b"\xff\xfe\xc3\x28 X", b"A\\B*?", b" " * 16):
            got = answer(pacs.port, associate_rq(calling=calling))
            assert got is not None and got[0] in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT), \
                (calling, got)
            counts["bad_inputs"] += 1

        # Protocol versions without bit 0 set (PS3.8 9.3.2).
        for version in (0x0000, 0xFFFE, 0x8000):
            got = answer(pacs.port, associate_rq(version=version))
            assert got is not None and got[0] in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT), got
            counts["bad_inputs"] += 1
        counts["associations"] += counts["bad_inputs"]


# --- 2. a P-DATA-TF announcing more than we accept ---------------------------------------------

def _established(s: socket.socket) -> None:
    s.sendall(associate_rq())
    got = read_pdu(s)
    assert got and got[0] == A_ASSOCIATE_AC, got


def test_p_data_announcing_4_gib_is_aborted_without_reading_it(pacs):
    chunk = bytes(1 << 20)
    budget_mb = 64      # what we are ready to send; the server must stop us well before
    with attacked(pacs, "test_p_data_announcing_4_gib_is_aborted_without_reading_it") as counts:
        for length in (0xFFFFFFFF, MAX_PDU + 4096):
            with raw(pacs.port, timeout=10) as s:
                _established(s)
                s.sendall(struct.pack(">BBL", 0x04, 0, length))
                sent_mb, refused = 0, False
                try:
                    for _ in range(min(budget_mb, length >> 20 or 1)):
                        s.sendall(chunk)
                        sent_mb += 1
                except (BrokenPipeError, ConnectionResetError):
                    refused = True
                except TimeoutError:
                    pass
                got = read_pdu(s)
                # The server said A-ABORT (or dropped the connection) instead of reading on.
                assert refused or got is None or got[0] == A_ABORT, (length, sent_mb, got)
                if length > budget_mb << 20:
                    assert sent_mb < budget_mb, "the server kept reading"
                counts["bad_inputs"] += 1
                counts["associations"] += 1
        # A PDU at the limit is fine: a normal 512 x 512 image in full-size PDUs.
        good = pacs.root / "big.dcm"
        ct_slice(seed=71, patient=1, study=1, series=1, number=1, size=512).save_as(
            good, enforce_file_format=True)
        assert store_files(pacs.port, [good]) == [0]
        counts["stored"] += 1
    assert "announces" in pacs.log.read_text()


# --- 3. fuzzed data sets as C-STORE ------------------------------------------------------------

def _element_offsets(body: bytes) -> list[int]:
    """Offsets of the top-level elements of an explicit VR little endian data set."""
    offsets, i = [], 0
    while i + 8 <= len(body):
        offsets.append(i)
        vr = body[i + 4:i + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            length = struct.unpack("<L", body[i + 8:i + 12])[0]
            if length == 0xFFFFFFFF:
                break
            i += 12 + length
        else:
            i += 8 + struct.unpack("<H", body[i + 6:i + 8])[0]
    return offsets


def deep_sequence(depth: int) -> bytes:
    """A data set whose first element is a sequence nested `depth` deep (undefined lengths)."""
    open_ = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return open_ * depth + close * depth


def mutations(body: bytes, n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    offsets = _element_offsets(body)
    header_end = offsets[-1] if offsets else len(body)
    for k in range(n):
        kind = k % 6
        b = bytearray(body)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(header_end)] = rng.getrandbits(8)
            yield "flipped bytes", bytes(b)
        elif kind == 1:
            yield "truncated", bytes(b[:rng.randrange(1, len(b))])
        elif kind == 2:
            at = rng.choice(offsets)
            b[at + 4:at + 6] = rng.choice([b"SQ", b"UN", b"OB", b"XX", b"\x00\x00", b"UT"])
            yield "wrong VR", bytes(b)
        elif kind == 3:
            at = rng.choice(offsets)
            if bytes(b[at + 4:at + 6]) in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
                b[at + 8:at + 12] = struct.pack("<L", rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 1]))
            else:
                b[at + 6:at + 8] = struct.pack("<H", rng.choice([0xFFFF, 0xFFF0, 1]))
            yield "lying length", bytes(b)
        elif kind == 4:
            yield "deep sequence", deep_sequence(rng.choice([50, 500, 5000])) + bytes(b)
        else:
            at = rng.choice(offsets)
            yield "junk element", bytes(b[:at]) + bytes(rng.getrandbits(8) for _ in range(
                rng.randint(1, 64))) + bytes(b[at:])


def body_of(ds) -> bytes:
    """The data set encoded explicit VR little endian, without any File Meta group."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def send_raw(port: int, paths: list[Path]) -> list[int]:
    """C-STORE each file's data set bytes as they are (by path: pynetdicom reads only the File
    Meta group, for the command), on one CT / explicit VR LE context; -1 for no answer."""
    from pynetdicom import _config
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    assert assoc.is_established
    statuses = []
    try:
        for p in paths:
            rsp = assoc.send_c_store(p)
            statuses.append(int(rsp.Status) if rsp else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


REFUSED = {0xA700, 0xA900, 0x0110, 0x0122, 0x0211} | set(range(0xC000, 0xD000))


def test_fuzzed_data_sets_are_refused_or_stored_inside_storage(pacs, tmp_path):
    ds = ct_slice(seed=72, patient=1, study=1, series=1, number=1, size=16)
    body = body_of(ds)
    n = scaled(200)
    paths = []
    for k, (kind, data) in enumerate(mutations(body, n, seed=7)):
        p = tmp_path / f"{k:05d}.dcm"
        # The meta says which instance and syntax; the data set after it is fuzzed.
        p.write_bytes(file_meta_bytes(CTImageStorage, f"2.25.{7000 + k}", ExplicitVRLittleEndian)
                      + data)
        paths.append((kind, p))
    storage = pacs.data / "storage"
    with attacked(pacs, "test_fuzzed_data_sets_are_refused_or_stored_inside_storage") as counts:
        statuses: list[int] = []
        for start in range(0, n, 50):   # several associations
            batch = paths[start:start + 50]
            statuses += send_raw(pacs.port, [p for _, p in batch])
            counts["associations"] += 1
        counts["bad_inputs"] = n
        counts["stored"] = sum(s == 0 for s in statuses)
        for (kind, p), status in zip(paths, statuses):
            assert status == 0 or status in REFUSED, (kind, p.name, hex(status))
    stored = [p for p in storage.rglob("*") if p.is_file()]
    assert all(storage in p.resolve().parents for p in stored)
    assert not [p for p in (storage / ".tmp").rglob("*") if p.is_file()]


# --- 4. hostile UIDs in the command (Affected SOP Instance UID) and in the data set ------------

HOSTILE_UIDS = ["../../pwned", "/tmp/pwned", "1.2.3\x00../pwned", "1." + "2" * 70, "",
                "..", "1.2.3/../../pwned", "1.2.3\\..\\pwned"]


def test_hostile_uids_in_the_command_and_the_data_set(pacs):
    storage = pacs.data / "storage"
    with attacked(pacs, "test_hostile_uids_in_the_command_and_the_data_set") as counts:
        statuses = []
        for k, bad in enumerate(HOSTILE_UIDS):
            ds = ct_slice(seed=73, patient=1, study=1, series=1, number=k + 1, size=8)
            # (a) the command's Affected SOP Instance UID is hostile, the data set is honest
            statuses.append(raw_c_store(pacs.port, bad.encode(), body_of(ds)))
            # (b) Series and SOP Instance UIDs in the data set hostile, the command agrees
            ds.SeriesInstanceUID = bad
            ds.SOPInstanceUID = bad
            statuses.append(raw_c_store(pacs.port, bad.encode(), body_of(ds)))
            counts["associations"] += 2
            counts["bad_inputs"] += 2
        # None: an A-ABORT (pynetdicom cannot decode a UID over 64 characters) or no answer at
        # all (pynetdicom drops a C-STORE-RQ without Affected SOP Instance UID unanswered).
        assert all(s is None or s in REFUSED for s in statuses), statuses
    assert not [p for p in storage.rglob("*") if p.is_file() and "pwned" in str(p)]
    assert not list(Path("/tmp").glob("pwned*"))
    assert not list(pacs.root.rglob("*pwned*"))


# --- 5. afterwards: still a PACS ----------------------------------------------------------------

def test_after_the_attacks_it_still_stores_and_finds(pacs, tmp_path):
    good = tmp_path / "good.dcm"
    ds = ct_slice(seed=74, patient=9, study=1, series=1, number=1, size=64)
    ds.save_as(good, enforce_file_format=True)
    with attacked(pacs, "test_after_the_attacks_it_still_stores_and_finds") as counts:
        assert store_files(pacs.port, [good]) == [0]
        status, matches = c_find(pacs.port, "STUDY", StudyInstanceUID=ds.StudyInstanceUID)
        assert status == 0 and len(matches) == 1
        counts["stored"] = 1
        counts["associations"] = 2
