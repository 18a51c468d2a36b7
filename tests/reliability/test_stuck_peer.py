"""Attack: a DICOM peer that accepts our association and then stops reading.

pynetdicom connects a requestor's socket and then leaves it blocking with no timeout: once the
peer's TCP window is full, every send waits for ever. A C-MOVE to such a destination never
answered its requestor, and routing jobs to it held their sender threads for ever; with a few
such destinations the routing pool was full and jobs to healthy nodes waited behind them.

The stuck peer here is real TCP: a proxy with a tiny receive buffer passes the A-ASSOCIATE-RQ to
a real pynetdicom SCP, passes its A-ASSOCIATE-AC back, and from then on reads nothing. Wanted:
the C-MOVE ends in bounded time with failed sub-operations, and a routing job to a healthy node
(DCMTK storescp) is delivered while the stuck ones hang.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from conftest import (LOCAL, associate, dcmtk, free_port, peer_env, serve, store_files,
                      wait_for, write_config)
from data import write_series
from pydicom import dcmread

from reliability.report import record

# Short timeouts, so that a bounded wait is seconds here (defaults: 120 s).
NETWORK_TIMEOUT = 3.0
# One C-STORE must be larger than the socket buffers (up to 4 MiB for the sender here), or it
# all fits and only the wait for its response (the DIMSE timeout, which works) remains.
IMAGES, SIZE = 3, 2048   # 2048 x 2048 x 16 bit: 8 MiB each (a mammogram, a large CR)
SLOW_TIMEOUT = 20.0    # network_timeout of the routing test: the stuck sends end after it
BOUND_S = 25.0         # the C-MOVE's answer must come within this (old code: never)


def _read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU (PS3.8 9.3.1: type, reserved, 4-byte length), or b"" at EOF."""
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return b""
        head += chunk
    length = struct.unpack(">I", head[2:6])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            return b""
        body += chunk
    return head + body


class StuckPeer:
    """Associates like a storage SCP (a real pynetdicom one answers the request), then never
    reads again. `port` is where to send; `associations` counts those it accepted."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts
        self.backend = AE(ae_title="BACKEND")
        self.backend.supported_contexts = AllStoragePresentationContexts
        self.backend.require_called_aet = False
        self.server = self.backend.start_server((LOCAL, 0), block=False)
        self.backend_port = self.server.server_address[1]
        self.listener = socket.socket()
        # Set before listen(): accepted sockets inherit it, and the window stays tiny.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind((LOCAL, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.associations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._associate, args=(conn,), daemon=True).start()

    def _associate(self, conn: socket.socket) -> None:
        self.held.append(conn)
        conn.settimeout(10)
        try:
            rq = _read_pdu(conn)
            with socket.create_connection((LOCAL, self.backend_port), timeout=10) as up:
                up.sendall(rq)
                ac = _read_pdu(up)
            conn.sendall(ac)
            if ac[:1] == b"\x02":
                self.associations += 1
        except OSError:
            pass
        # From here on: nothing is read from `conn`, which stays open.

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for s in self.held:
            s.close()
        self.server.shutdown()


def _config(tmp_path: Path, nodes: list[dict], network_timeout: float = NETWORK_TIMEOUT,
            **extra) -> tuple[Path, Path]:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, nodes=nodes, dicom={
        "network_timeout": network_timeout, "dimse_timeout": 10.0, "acse_timeout": 10.0},
        **extra)
    return cfg, data


def test_c_move_to_a_peer_that_stops_reading_ends_in_bounded_time(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pynetdicom import build_context
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
    files = write_series(tmp_path / "in", seed=7, images=IMAGES, size=SIZE)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    peer = StuckPeer()
    try:
        cfg, data = _config(tmp_path, [{"name": "stuck", "aet": "STUCK", "host": LOCAL,
                                        "port": peer.port}])
        with serve(cfg, data) as srv:
            assert store_files(srv.port, files) == [0] * IMAGES
            q = Dataset()
            q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", study
            t0 = time.monotonic()
            with associate(srv.port, [build_context(MOVE)]) as assoc:
                responses = list(assoc.send_c_move(q, "STUCK", MOVE))
            seconds = time.monotonic() - t0
            final = responses[-1][0]
            assert peer.associations >= 1, "pacsd never associated with the stuck peer"
            assert final and "Status" in final, \
                f"no final C-MOVE response within the client's 30 s ({seconds:.1f} s)"
            assert seconds < BOUND_S, f"the C-MOVE took {seconds:.1f} s"
            failed = int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
            assert int(final.Status) != 0 and failed >= 1, \
                f"status 0x{int(final.Status):04X}, {failed} failed sub-operation(s)"
            # The server goes on: another association is served at once.
            with associate(srv.port, [build_context("1.2.840.10008.1.1")]) as echo:
                assert echo.send_c_echo().Status == 0
        record("test_c_move_to_a_peer_that_stops_reading_ends_in_bounded_time",
               associations=3, bad_inputs=1)
    finally:
        peer.close()


def test_routing_to_healthy_node_is_not_held_by_stuck_ones(tmp_path: Path) -> None:
    """Four stuck destinations with [routing] concurrency = 1: the old sender's pool (four
    threads) was all theirs, and the healthy node's job never ran. The healthy node must get
    its images well before the stuck sends time out: it never waits behind them."""
    files = write_series(tmp_path / "in", seed=8, images=IMAGES, size=SIZE)
    sops = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    received = tmp_path / "received"
    received.mkdir()
    healthy_port = free_port()
    storescp = subprocess.Popen([dcmtk("storescp"), "-aet", "HEALTHY", "-od", str(received),
                                 "+uf", str(healthy_port)], env=peer_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peer = StuckPeer()
    stuck = [f"STUCK{i}" for i in range(1, 5)]
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex((LOCAL, healthy_port)) == 0
        wait_for(listening, 10, "storescp to listen")
        nodes = [{"name": a.lower(), "aet": a, "host": LOCAL, "port": peer.port} for a in stuck]
        nodes.append({"name": "healthy", "aet": "HEALTHY", "host": LOCAL, "port": healthy_port})
        routes = [{"name": f"to-{a.lower()}", "to": a, "when": "stored"} for a in stuck]
        routes.append({"name": "to-healthy", "to": "HEALTHY", "when": "stored"})
        cfg, data = _config(tmp_path, nodes, network_timeout=SLOW_TIMEOUT,
                            routing={"concurrency": 1, "retry_delay": 60.0}, routes=routes)
        with serve(cfg, data) as srv:
            # The stuck destinations first: their jobs are older and claimed first.
            assert store_files(srv.port, files) == [0] * IMAGES
            t0 = time.monotonic()

            def delivered() -> bool:
                got = set()
                for f in received.iterdir():
                    try:
                        got.add(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
                    except Exception:   # still being written
                        pass
                return got >= sops
            wait_for(delivered, SLOW_TIMEOUT / 2, "the healthy node to receive every image "
                                                  "while four destinations do not read")
            delivered_s = time.monotonic() - t0
            wait_for(lambda: peer.associations >= len(stuck), BOUND_S,
                     "pacsd to associate with each stuck destination")
            # And the stuck ones' sends end too (failed, to be retried), in bounded time.
            wait_for(lambda: all(f"to STUCK{i} failed" in srv.output() or
                                 f"to stuck{i} failed" in srv.output() for i in range(1, 5)),
                     SLOW_TIMEOUT + BOUND_S, "the sends to the stuck destinations to fail")
            assert delivered_s < SLOW_TIMEOUT / 2
        record("test_routing_to_healthy_node_is_not_held_by_stuck_ones",
               associations=len(stuck) + 2, bad_inputs=len(stuck))
    finally:
        peer.close()
        storescp.terminate()
        try:
            storescp.wait(10)
        except subprocess.TimeoutExpired:
            storescp.kill()
