"""`pacsd doctor` against real peers: DCMTK storescp, pynetdicom SCPs that reject us, a real
pacsd as a Q/R node that knows us or not, a name that cannot resolve, a closed port and a port
whose accept queue is full (the SYN is dropped: what a firewall that drops looks like)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import (
    LOCAL,
    dcmtk,
    free_port,
    pacsd_cmd,
    peer_env,
    peer_missing,
    wait_for,
    write_config,
)

from pacsd import config as config_mod
from pacsd import doctor
from pacsd.config import Config, Node

TIMEOUT = 2.0   # per step: every failure below must cost about this, not a DIMSE timeout


def _cfg(tmp_path: Path, aet: str = "PACSD", **dicom) -> Config:
    data = tmp_path / f"doctor-{aet}"
    path = write_config(tmp_path / f"doctor-{aet}.toml", data, dicom={"aet": aet, **dicom})
    return config_mod.load(path, env={})


def _check(cfg: Config, node: Node) -> dict[str, doctor.Finding]:
    report = doctor.check_node(cfg, node, "config", doctor.own_listener(cfg, TIMEOUT), TIMEOUT)
    return {f.check: f for f in report.findings}


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((LOCAL, port), timeout=0.2).close()
        return True
    except OSError:
        return False


@contextmanager
def storescp(tmp_path: Path, *options: str) -> Iterator[int]:
    """DCMTK's storescp on a free port (its own default: uncompressed syntaxes only)."""
    port = free_port()
    out = tmp_path / f"storescp-{port}"
    out.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), *options, "-od", str(out), str(port)],
                            env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or _accepts(port), 10, "storescp to listen")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def pynetdicom_scp(aet: str, callers: list[str]) -> Iterator[int]:
    """A pynetdicom Verification + CT storage SCP that knows only `callers` and itself as
    `aet` (A-ASSOCIATE-RJ otherwise, with the reason)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
    ae = AE(ae_title=aet)
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage)
    ae.require_called_aet = True
    ae.require_calling_aet = callers
    server = ae.start_server((LOCAL, 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        ae.shutdown()


def test_storescp_plain_then_every_syntax(tmp_path):
    cfg = _cfg(tmp_path)
    with storescp(tmp_path) as port:
        t0 = time.monotonic()
        found = _check(cfg, Node("storescp", "STORESCP", "localhost", port))
        seconds = time.monotonic() - t0
    assert found["dns"].level == doctor.OK and "127.0.0.1" in found["dns"].data["addresses"]
    assert found["tcp"].level == doctor.OK
    assert found["echo"].level == doctor.OK and "C-ECHO Success" in found["echo"].message
    assert found["storage"].level == doctor.OK
    assert found["storage"].message == "accepts all 30 storage classes proposed"
    assert found["storage"].data["storage"]["CT"] == ["Explicit VR LE", "Implicit VR LE"]
    assert found["syntaxes"].level == doctor.WARN
    assert "only uncompressed" in found["syntaxes"].message
    assert "decompresses" in found["syntaxes"].message
    assert found["query"].message.startswith("query/retrieve: C-FIND no, C-MOVE no, C-GET no")
    assert "not accepted" in found["commitment"].message
    assert found["move"].level == doctor.OK and "does not offer C-MOVE" in found["move"].message
    assert seconds < 5
    with storescp(tmp_path, "+xa") as port:
        found = _check(cfg, Node("storescp", "STORESCP", LOCAL, port))
    assert found["syntaxes"].level == doctor.OK
    assert found["storage"].data["storage"]["CT"] == list(doctor.SYNTAXES.values())
    assert "JPEG 2000 lossless" in found["syntaxes"].message
    assert not any(f.level != doctor.OK for f in found.values() if f.check != "listener")


def test_rejections_say_why(tmp_path):
    with pynetdicom_scp("VIEWER", callers=["FRIEND"]) as port:
        # Calling AE title not recognised (PS3.8 9.3.4: source 1, reason 3).
        found = _check(_cfg(tmp_path, "PACSD"), Node("viewer", "VIEWER", LOCAL, port))
        assert found["echo"].level == doctor.FAIL
        assert "the node does not know us (AE PACSD): add us on the node" in \
            found["echo"].message
        assert "storage" not in found and "move" not in found   # nothing more to learn
        # Called AE title not recognised (reason 7): we call it by the wrong name.
        friend = _cfg(tmp_path, "FRIEND")
        found = _check(friend, Node("viewer", "WRONGNAME", LOCAL, port))
        assert found["echo"].level == doctor.FAIL
        assert "the node does not know AE title WRONGNAME as itself: check the node's AE " \
            "title" in found["echo"].message
        found = _check(friend, Node("viewer", "VIEWER", LOCAL, port))
    assert found["echo"].level == doctor.OK
    assert found["storage"].message.startswith("accepts 1 of 30 storage classes: CT (not: ")


def test_move_destination_known_or_not(make_server, tmp_path):
    """A real pacsd as the node. With the in-process server's own config the doctor also finds
    our listener running (pacsd.json, pid alive, C-ECHO to ourselves)."""
    port = free_port()
    # Open query/retrieve: the doctor calls as STRANGER below, which must get as far as the
    # move destination check (a caller that is not a node is refused C-MOVE otherwise).
    server = make_server(dicom={"aet": "PACSD", "port": port, "open_query_retrieve": True},
                         nodes=[{"name": "itself", "aet": "PACSD", "host": LOCAL,
                                 "port": port}])
    node = Node("pacs", "PACSD", LOCAL, port)
    me = doctor.own_listener(server.cfg, TIMEOUT)
    assert me.running and me.finding is not None and me.finding.level == doctor.OK
    assert (f"listening on 127.0.0.1 only (only this machine can reach it), port {port}; it "
            "answers C-ECHO") in me.finding.message
    report = doctor.check_node(server.cfg, node, "config", me, TIMEOUT)
    found = {f.check: f for f in report.findings}
    assert not report.failed, doctor.render(report)
    assert found["move"].level == doctor.OK
    assert "the node knows PACSD as a move destination" in found["move"].message
    assert found["move"].data["status"] == 0x0000
    assert found["return"].message == f"the node should send to PACSD at 127.0.0.1:{port}"
    assert found["query"].message == ("query/retrieve: C-FIND yes (Study Root, Patient Root), "
                                      "C-MOVE yes (Study Root, Patient Root), C-GET yes (Study "
                                      "Root, Patient Root)")
    # A caller the node does not list as a destination: 0xA801, and what to add where.
    stranger = _cfg(tmp_path, "STRANGER", port=11112)
    found = _check(stranger, node)
    assert found["echo"].level == doctor.OK
    assert found["move"].level == doctor.FAIL and found["move"].data["status"] == 0xA801
    assert found["move"].message == ("the node does not know our AE title STRANGER as a move "
                                     "destination (0xA801): add STRANGER at 127.0.0.1:11112 on "
                                     "the node")


def test_dns_and_tcp_failures_are_told_apart(tmp_path):
    cfg = _cfg(tmp_path)
    ok, _ = doctor.checks._bounded(lambda: socket.getaddrinfo("pacsd-doctor.invalid", 104), TIMEOUT)
    if not ok:
        peer_missing("this machine's resolver takes more than 2 s to refuse a .invalid name")
    t0 = time.monotonic()
    found = _check(cfg, Node("ghost", "GHOST", "pacsd-doctor.invalid", 104))
    assert found["dns"].level == doctor.FAIL
    assert found["dns"].message.startswith("cannot resolve pacsd-doctor.invalid: check the name "
                                           "or use an IP address")
    assert list(found) == ["dns"]
    closed = free_port()   # nothing listens
    found = _check(cfg, Node("closed", "CLOSED", LOCAL, closed))
    assert found["tcp"].level == doctor.FAIL
    assert "connection refused: nothing listens on that port or a firewall rejects us" in \
        found["tcp"].message
    assert time.monotonic() - t0 < 1.5
    # A listener whose accept queue is full: Linux drops the SYN, as a dropping firewall does.
    with socket.socket() as full:
        full.bind((LOCAL, 0))
        full.listen(0)
        with socket.create_connection(full.getsockname(), timeout=1):   # fills the queue
            t0 = time.monotonic()
            found = _check(cfg, Node("dropped", "DROPPED", LOCAL, full.getsockname()[1]))
            seconds = time.monotonic() - t0
    assert found["tcp"].level == doctor.FAIL
    assert f"no answer within {TIMEOUT:g} s: a firewall drops the connection or the host is " \
        "down" in found["tcp"].message
    assert TIMEOUT - 0.1 < seconds < TIMEOUT + 1.5


def test_return_path_words(tmp_path):
    """The listener's address against the node's (no network: the decision alone)."""
    remote = Node("ct", "CT1", "10.1.2.3", 104)
    cfg = _cfg(tmp_path)
    loopback = doctor.OwnListener("PACSD", 11112, "127.0.0.1", running=True, pid=1)
    found = doctor.return_path(cfg, remote, loopback, ["10.1.2.3"], "10.9.9.9")
    assert found.level == doctor.WARN
    assert found.message.startswith("pacsd listens on 127.0.0.1 only: CT1 at 10.1.2.3 cannot "
                                    "reach it; set [dicom] bind = \"0.0.0.0\"")
    everywhere = doctor.OwnListener("PACSD", 11112, "0.0.0.0", running=False)
    found = doctor.return_path(cfg, remote, everywhere, ["10.1.2.3"], "10.9.9.9")
    assert found.level == doctor.OK
    assert found.message == "the node should send to PACSD at 10.9.9.9:11112"
    picky = _cfg(tmp_path, "PICKY", allowed_calling_aets=["OTHER"])
    found = doctor.return_path(picky, remote, everywhere, ["10.1.2.3"], "10.9.9.9")
    assert found.level == doctor.WARN and "add CT1 to [dicom] allowed_calling_aets" in \
        found.message


def test_pacsd_doctor_command(make_server, tmp_path):
    """`python -m pacsd doctor` as a real process, beside a running pacsd (found through its
    pacsd.json) that has a node added on the admin page."""
    # The closed node's port stays bound, never listening, for the whole test (connections to
    # it are refused): a port merely found free could be taken by the servers started here.
    closed = socket.socket()
    closed.bind((LOCAL, 0))
    with closed, storescp(tmp_path) as scp:
        server = make_server(qr_clients=False, nodes=[   # the nodes checked: these only
            {"name": "ghost", "aet": "GHOST", "host": "pacsd-doctor.invalid", "port": 104},
            {"name": "closed", "aet": "CLOSED", "host": LOCAL,
             "port": closed.getsockname()[1]}])
        server.runtime.accounts.save_node({"name": "archive", "aet": "STORESCP",
                                            "host": "localhost", "port": scp})
        config = str(server.cfg.source)

        def doctor_cmd(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(pacsd_cmd("doctor", "--config", config, "--timeout", "2",
                                            *args),
                                  check=False, capture_output=True, text=True, timeout=60)
        t0 = time.monotonic()
        everything = doctor_cmd()
        seconds = time.monotonic() - t0
        one = doctor_cmd("archive", "--json")
        unknown = doctor_cmd("nobody")
    out = everything.stdout
    assert everything.returncode == 1, out + everything.stderr
    assert "OK    listener   pacsd runs (pid" in out
    assert "node 'ghost' (config): GHOST at pacsd-doctor.invalid:104" in out
    assert "FAIL  dns        cannot resolve pacsd-doctor.invalid: check the name or use an IP " \
        "address" in out
    assert "FAIL  tcp" in out and "connection refused" in out
    assert "node 'archive' (admin): STORESCP at localhost:" in out
    assert "C-ECHO Success" in out
    assert "WARN  syntaxes   accepts only uncompressed transfer syntaxes" in out
    assert out.rstrip().endswith("3 node(s) checked: 1 passed, 2 failed: ghost, closed")
    assert seconds < 10
    assert one.returncode == 0, one.stdout + one.stderr
    report = json.loads(one.stdout)
    assert report["ok"] is True and [n["name"] for n in report["nodes"]] == ["archive"]
    levels = {c["check"]: c["level"] for c in report["nodes"][0]["checks"]}
    assert levels["echo"] == "OK" and levels["syntaxes"] == "WARN"
    assert unknown.returncode == 1 and "no node named 'nobody'" in unknown.stderr
