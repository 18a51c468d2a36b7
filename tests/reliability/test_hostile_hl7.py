"""Hostile HL7 peers (pacsd.hl7): nothing a peer sends (a truncated frame, wrong encoding
characters, 10 MB, an HTTP request or a TLS hello, an unsupported type, a flood of connections,
silence, an address outside [hl7] allowed_networks) stops the listener or makes it wait
unbounded: each is refused (a NAK or a closed connection) with a log line, and the next good
message is answered AA."""

from __future__ import annotations

import logging
import socket
import time

from conftest import LOCAL, wait_for
from pacsd.config.sections import Hl7Settings
from pacsd.hl7 import MllpListener
from test_hl7 import END, VT, Mllp, adt, closed_by_server, hl7_server, msa, orm, send


def test_hostile_input_never_stops_the_listener(make_server, caplog):
    caplog.set_level(logging.INFO, logger="pacsd.hl7")
    server = hl7_server(make_server, idle_timeout=3.0, max_connections=4)
    port = server.hl7.port
    good = adt("A08", "OK", "NOBODY", "Nobody^Known")

    def still_serving() -> None:
        assert msa(send(port, good)) == ("AA", "OK", "patient updated: 0 step(s), 0 stored "
                                         "instance(s) rewritten")

    # A truncated frame, the connection then closed; then one followed by a whole frame.
    with socket.create_connection((LOCAL, port)) as s:
        s.sendall(VT + good[:30])
    still_serving()
    client = Mllp(port)
    client.sock.sendall(VT + good[:30])
    assert msa(client.send(good))[0] == "AA"   # the unfinished one dropped, the new one read
    client.close()
    # Wrong encoding characters: AR with the standard separators, no control id to echo.
    for head in (b"MSH|AB12|RIS|", b"MSH|^^^^|RIS|", b"MSH\x00^~\\&|"):
        code, control, _ = msa(send(port, head + b"X|Y||ADT^A08|BAD|P|2.5\rPID|1||P\r"))
        assert (code, control) == ("AR", "")
    still_serving()
    # 10 MB in one frame: AR for its control id, the rest read and dropped, then closed.
    big = adt("A08", "BIG", "P1", "A^B") + b"NTE|1||" + b"A" * (10 << 20)
    client = Mllp(port, timeout=60)
    client.sock.sendall(VT + big)
    assert msa(client.read())[:2] == ("AR", "BIG")
    assert closed_by_server(client.sock, 15)
    client.close()
    still_serving()
    # Not MLLP (an HTTP request, a TLS hello): closed at once, no answer.
    for stray in (b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00"):
        with socket.create_connection((LOCAL, port)) as s:
            s.sendall(stray)
            assert closed_by_server(s, 5)
    still_serving()
    # Unsupported and broken messages: AR; the connection goes on.
    client = Mllp(port)
    assert msa(client.send(adt("A01", "T1", "P1", "A^B")))[:2] == ("AR", "T1")
    assert msa(client.send(adt("A08", "T2", "P1", "A\\.sp99999999\\B")))[:2] == ("AR", "T2")
    assert msa(client.send(good))[0] == "AA"
    client.close()
    # A flood: max_connections silent ones are served (until idle_timeout); more are closed.
    wait_for(lambda: server.hl7.connections == 0, 5, "the earlier connections gone")
    silent = [socket.create_connection((LOCAL, port)) for _ in range(4)]
    wait_for(lambda: server.hl7.connections == 4, 5, "4 connections open")
    extra = [socket.create_connection((LOCAL, port)) for _ in range(10)]
    assert all(closed_by_server(s, 1.5) for s in extra)
    for s in silent + extra:
        s.close()
    wait_for(lambda: server.hl7.connections == 0, 5, "the connections gone")
    still_serving()
    # Silence: closed after idle_timeout.
    with socket.create_connection((LOCAL, port)) as s:
        began = time.monotonic()
        assert closed_by_server(s, 10)
        assert 2.5 < time.monotonic() - began < 10
    still_serving()
    said = [r.getMessage() for r in caplog.records if r.name.startswith("pacsd.hl7")]
    for words in ("a new message began before the last one ended", "answered AR",
                  "longer than [hl7] max_message_kb", "bytes that are not MLLP",
                  "max_connections = 4 connections are open", "below [hl7] max_connections"):
        assert any(words in line for line in said), words
    assert server.hl7.alive and server.health_problem(5) is None


def test_connections_from_outside_allowed_networks_are_closed(caplog):
    class Answers:
        def answer(self, raw: bytes, peer: str) -> bytes:
            raise AssertionError("never asked")

        def too_large(self, head: bytes, limit_kb: int, peer: str) -> bytes:
            raise AssertionError("never asked")

    listener = MllpListener(Hl7Settings(port=0, bind=LOCAL, allowed_networks=("10.0.0.0/8",)),
                            Answers()).start()
    try:
        with socket.create_connection((LOCAL, listener.port)) as s:
            s.sendall(VT + adt("A08", "X", "P1", "A^B") + END)
            assert closed_by_server(s, 5)
    finally:
        listener.stop()
    assert any("not in [hl7] allowed_networks" in r.getMessage() for r in caplog.records)
