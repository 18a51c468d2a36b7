"""Attack: who may use DICOM (pacsd.dimse.access.AssociationGuard).

Before: any host calling as the server's own AE title got past `allowed_calling_aets`; any
unknown AE title could C-FIND, C-GET and C-MOVE the whole archive; one host could take all the
associations. Wanted (Orthanc's defaults): C-ECHO and C-STORE open to any caller; C-FIND, C-GET,
C-MOVE only for nodes, each with its own switches; `[dicom] open_query_retrieve` restores the
open behaviour; our own AE title exempt from the allow-list only from this machine; a cap on
associations per peer address. Real server, real pynetdicom and DCMTK clients, on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack
from pathlib import Path

from conftest import (LOCAL, dcmtk, pacsd_cmd, run_peer, serve, wait_for,
                      write_config)
from data import sample
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage, StudyRootQueryRetrieveInformationModelFind as FIND,
    StudyRootQueryRetrieveInformationModelGet as GET,
    StudyRootQueryRetrieveInformationModelMove as MOVE, Verification)

from reliability.report import record

CT = sample("CT_small.dcm")
NOT_AUTHORIZED = 0x0124


def _ae(aet: str) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def accepted(port: int, aet: str, syntaxes: list[str]) -> set[str]:
    """The abstract syntaxes pacsd accepts from `aet` (empty set: nothing accepted or the
    association was refused)."""
    ae = _ae(aet)
    for s in syntaxes:
        ae.add_requested_context(s)
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    try:
        if not assoc.is_established:
            return set()
        return {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def find(port: int, aet: str) -> tuple[int | None, int]:
    """(final status or None if the context was refused, matches) of a STUDY C-FIND."""
    ae = _ae(aet)
    ae.add_requested_context(FIND)
    ae.add_requested_context(Verification)   # so that the association itself is accepted
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    try:
        assert assoc.is_established, f"association as {aet} refused"
        if not any(cx.abstract_syntax == FIND for cx in assoc.accepted_contexts):
            return None, 0
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", ""
        out = list(assoc.send_c_find(q, FIND))
        return int(out[-1][0].Status), sum(1 for st, _ in out if st and st.Status == 0xFF00)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def store(port: int, aet: str) -> int:
    ae = _ae(aet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    try:
        assert assoc.is_established, f"association as {aet} refused"
        return int(assoc.send_c_store(dcmread(CT)).Status)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def echo(port: int, aet: str) -> int | None:
    ae = _ae(aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    try:
        return int(assoc.send_c_echo().Status) if assoc.is_established else None
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_query_retrieve_is_for_nodes_only(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, qr_clients=False, nodes=[
        {"name": "ws", "aet": "WS", "host": LOCAL, "port": 104}])
    qr = [str(FIND), str(GET), str(MOVE)]
    with serve(cfg, data) as srv:
        # Anyone may echo and store.
        assert echo(srv.port, "STRANGER") == 0
        assert store(srv.port, "STRANGER") == 0
        # A stranger may not query or retrieve: the Q/R contexts are refused at negotiation,
        # with one log line naming the caller.
        assert accepted(srv.port, "STRANGER", qr + [str(Verification)]) == {str(Verification)}
        wait_for(lambda: "C-FIND/C-GET/C-MOVE refused to 'STRANGER' from 127.0.0.1" in
                 srv.output(), 5, "the refusal's log line")
        assert "not a node" in srv.output()
        assert find(srv.port, "STRANGER") == (None, 0)
        # A node may.
        assert accepted(srv.port, "WS", qr) == set(qr)
        assert find(srv.port, "WS") == (0, 1)

        # DCMTK: what the person at the workstation sees.
        findscu = run_peer([dcmtk("findscu"), "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", "StudyInstanceUID", "-aet", "STRANGER", "-aec", "PACSD",
                            LOCAL, str(srv.port)], timeout=60, check=False)
        told = findscu.stdout + findscu.stderr
        assert findscu.returncode != 0 and "No Acceptable Presentation Contexts" in told, told
        movescu = run_peer([dcmtk("movescu"), "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", "StudyInstanceUID=1.2.3", "-aet", "STRANGER", "-aem", "WS",
                            "-aec", "PACSD", LOCAL, str(srv.port)], timeout=60, check=False)
        told = movescu.stdout + movescu.stderr
        assert movescu.returncode != 0 and "No Acceptable Presentation Contexts" in told, told
        getscu = run_peer([dcmtk("getscu"), "-S", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", "StudyInstanceUID=1.2.3", "-aet", "STRANGER", "-aec", "PACSD",
                           LOCAL, str(srv.port)], timeout=60, check=False)
        told = getscu.stdout + getscu.stderr
        assert getscu.returncode != 0 and "No adequate Presentation Contexts" in told, told
        # The same tools as a node work.
        ok = run_peer([dcmtk("findscu"), "-S", "-k", "QueryRetrieveLevel=STUDY",
                       "-k", "StudyInstanceUID", "-aet", "WS", "-aec", "PACSD", LOCAL,
                       str(srv.port)], timeout=60)
        assert ok.returncode == 0
    record("test_query_retrieve_is_for_nodes_only", bad_inputs=6)


def test_each_node_has_its_switches(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, qr_clients=False, nodes=[
        {"name": "getonly", "aet": "GETONLY", "host": LOCAL, "port": 104,
         "allow_find": False, "allow_move": False},
        {"name": "noput", "aet": "NOPUT", "host": LOCAL, "port": 104, "allow_store": False}])
    qr = [str(FIND), str(GET), str(MOVE)]
    with serve(cfg, data) as srv:
        assert accepted(srv.port, "GETONLY", qr) == {str(GET)}
        assert "node 'getonly' has allow_find/move = false" in srv.output()
        assert accepted(srv.port, "NOPUT", qr) == set(qr)
        # A node that may not store gets 0x0124 "Refused: Not Authorized" for its C-STORE.
        assert store(srv.port, "NOPUT") == NOT_AUTHORIZED
        assert "C-STORE from 'NOPUT' (127.0.0.1) refused (0x0124" in srv.output()
        assert store(srv.port, "GETONLY") == 0


def test_open_query_retrieve_restores_the_old_behaviour(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    cfg = write_config(tmp_path / "pacsd.toml", data, qr_clients=False,
                       dicom={"open_query_retrieve": True},
                       nodes=[{"name": "nofind", "aet": "NOFIND", "host": LOCAL, "port": 104,
                               "allow_find": False}])
    with serve(cfg, data) as srv:
        assert store(srv.port, "STRANGER") == 0
        assert find(srv.port, "STRANGER") == (0, 1)
        assert find(srv.port, "NOFIND") == (None, 0)   # a node's own switch still holds


def test_nodes_added_on_the_admin_page_carry_their_switches(make_server) -> None:
    import requests
    server = make_server(qr_clients=False)
    port, api = server.dicom_port, f"{server.http_url}/api/nodes"
    h = {"X-Requested-With": "pacsd"}   # what the admin page sends (tests/test_api.py)
    assert find(port, "LATER") == (None, 0)
    r = requests.post(api, json={"name": "later", "aet": "LATER", "host": LOCAL, "port": 104,
                                 "allow_get": False}, headers=h, timeout=10)
    assert r.status_code == 201, r.text
    assert find(port, "LATER")[0] == 0   # at once, without a restart
    assert accepted(port, "LATER", [str(FIND), str(GET), str(MOVE)]) == {str(FIND), str(MOVE)}
    listed = {n["name"]: n for n in requests.get(api, timeout=10).json()}["later"]
    assert listed["allow_get"] is False and "allow_find" not in listed   # absent: true
    r = requests.post(api, json={"name": "bad", "aet": "BAD", "host": LOCAL, "port": 104,
                                 "allow_find": "yes"}, headers=h, timeout=10)
    assert r.status_code == 400 and "allow_find must be true or false" in r.text
    r = requests.put(f"{api}/later", json={**listed, "allow_find": False}, headers=h,
                     timeout=10)
    assert r.status_code == 200, r.text
    assert find(port, "LATER") == (None, 0)
    # What the admin page sends when the host changes: the switches are kept.
    r = requests.put(f"{api}/later", json={"name": "later", "aet": "LATER", "host": "localhost",
                                           "port": 104}, headers=h, timeout=10)
    assert r.status_code == 200, r.text
    assert accepted(port, "LATER", [str(FIND), str(GET), str(MOVE)]) == {str(MOVE)}


def test_own_ae_title_is_exempt_only_from_this_machine(make_server, monkeypatch) -> None:
    """From loopback, our own AE title passes the allow-list (`pacsd status`, the watchdog);
    seen as coming from another host, it is refused like any name not on the list."""
    server = make_server(dicom={"allowed_calling_aets": ["CT1"]})
    port = server.dicom_port
    assert echo(port, "CT1") == 0
    assert echo(port, "INTRUDER") is None
    assert echo(port, "PACSD") == 0   # from this machine
    status = subprocess.run(pacsd_cmd("status", "--config", str(server.cfg.source)),
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    # Now 127.0.0.1 counts as another host: what a machine elsewhere calling as PACSD is.
    import pacsd.dimse.access as access
    monkeypatch.setattr(access, "from_this_machine", lambda address, local: False,
                        raising=False)
    assert echo(port, "PACSD") is None, "our own AE title from another host was let in"
    assert echo(port, "CT1") == 0


def test_associations_per_host_are_capped(tmp_path: Path) -> None:
    data = tmp_path / "pacsd"
    cap = 16   # [dicom] max_associations_per_host's default, of max_associations = 64
    cfg = write_config(tmp_path / "pacsd.toml", data)
    with serve(cfg, data) as srv, ExitStack() as stack:
        held = []
        for i in range(cap):
            ae = _ae(f"HOG{i}")
            ae.add_requested_context(Verification)
            assoc = ae.associate(LOCAL, srv.port, ae_title="PACSD")
            assert assoc.is_established, f"association {i + 1} of {cap} refused"
            held.append(assoc)
            stack.callback(ae.shutdown)
            stack.callback(lambda a=assoc: a.is_established and a.release())
        ae = _ae("HOGMORE")
        ae.add_requested_context(Verification)
        extra = ae.associate(LOCAL, srv.port, ae_title="PACSD")
        stack.callback(ae.shutdown)
        assert extra.is_rejected, "one host got more than max_associations_per_host"
        rj = extra.acceptor.primitive
        # PS3.8 9.3.4: rejected-transient, service-provider (presentation), local-limit-exceeded
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        wait_for(lambda: "max_associations_per_host" in srv.output(), 5, "the log line")
        proc = run_peer([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PACSD", LOCAL,
                         str(srv.port)], timeout=30, check=False)
        assert proc.returncode != 0 and "Local Limit Exceeded" in proc.stdout + proc.stderr, \
            proc.stdout + proc.stderr
        # One given back: the host may associate again.
        held[0].release()
        wait_for(lambda: echo(srv.port, "AGAIN") == 0, 10, "a new association after one ended")
    record("test_associations_per_host_are_capped", associations=cap + 3, bad_inputs=2)
