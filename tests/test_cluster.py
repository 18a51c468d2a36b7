"""Two `pacsd serve` nodes on one PostgreSQL index and one storage folder (issue 9).

Each node has a data folder of its own (lock, pidfile, node id, log) and shares the rest: the
index ([index] url, the `postgres_url` fixture: a fresh database per test) and the storage
folder ([storage] path). The peers are real: DCMTK's storescu and findscu, pynetdicom, HTTP.
Races are made, not hoped for: the nodes start at the same moment on an empty index, and the
same instances (or the first ones of the same series) reach both nodes in step.

What must hold, however the two nodes' work interleaves:
- whatever either node acknowledged is indexed once, and its file holds the bytes sent;
- either node finds and serves what the other stored (C-FIND, C-GET, WADO-URI);
- rows and files match one to one, and the counters agree with the rows;
- what one node deletes, another can store again (its cached series rows are gone);
- a node killed mid-storm loses nothing it acknowledged, the other keeps serving, and the killed
  one recovers on restart;
- housekeeping runs on one node at a time, and moves when that node dies.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests
from conftest import (
    LOCAL,
    Process,
    associate,
    c_find,
    c_get,
    dcmtk,
    run_peer,
    serve,
    store_files,
    wait_for,
    write_config,
)
from data import Sent, dataset_bytes, describe, write_series
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import _config, build_context
from reliability.storm import Storm

from pacsd.web.auth import hash_password

AET = "PACSD"
POLL = 0.02


# --- the cluster ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One node's own folder: its config, data folder (lock, pidfile, node-id) and log."""

    name: str
    config: Path
    data: Path

    @property
    def log(self) -> Path:
        return self.data.parent / "serve.log"

    def node_id(self) -> str:
        return (self.data / "node-id").read_text().strip()

    def serve(self, env: dict[str, str] | None = None):
        return serve(self.config, self.data, log_name="serve.log", env=env)


def make_nodes(tmp: Path, url: str, storage: Path, *names: str,
               users: list[dict] | None = None) -> list[Node]:
    nodes = []
    for name in names:
        folder = tmp / name
        folder.mkdir()
        data = folder / "data"
        config = write_config(folder / "pacsd.toml", data, users=users, index={"url": url},
                              storage={"path": str(storage), "min_free_mb": 0})
        nodes.append(Node(name, config, data))
    return nodes


def start_all(stack: ExitStack, nodes: list[Node], env: dict[str, str] | None = None
              ) -> list[Process]:
    """Start the nodes at the same moment (all migrate the empty index at once), each until
    ready; every one that started is stopped when `stack` closes."""
    managers = [n.serve(env) for n in nodes]
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
    procs, errors = [], []
    for manager, future in zip(managers, futures):
        try:
            procs.append(future.result())
            stack.push(manager)
        except BaseException as e:  # noqa: BLE001 - raised below, once all are accounted for
            errors.append(e)
    if errors:
        raise errors[0]
    return procs


def run_threads(targets: list[Callable[[], object]], timeout: float = 90) -> list[object]:
    """Run each target in a thread of its own, all released at once by a barrier; their
    results (an exception in a thread is raised here)."""
    barrier = threading.Barrier(len(targets))

    def go(target: Callable[[], object]) -> object:
        barrier.wait(timeout=30)
        return target()
    with ThreadPoolExecutor(len(targets)) as pool:
        futures = [pool.submit(go, t) for t in targets]
        return [f.result(timeout=timeout) for f in futures]


# --- what is in the index and in storage ------------------------------------------------------

def sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(query, params).fetchall()


def stored_files(storage: Path) -> set[str]:
    return {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")
            if not {".tmp", ".trash"} & set(p.relative_to(storage).parts)}


def temp_files(storage: Path) -> list[Path]:
    return [p for p in (storage / ".tmp").rglob("*") if p.is_file()]


def assert_sound(url: str, storage: Path, expected: dict[str, Sent]) -> dict[str, str]:
    """The shared index holds exactly `expected`, each once, with the counters its rows give
    and no duplicate patient, study or series; rows and stored files match one to one, each
    file holds the data set bytes sent, and no temporary file is left. SOP UID -> path."""
    rows = sql(url, "SELECT sop_instance_uid, path, size, transfer_syntax_uid FROM instance")
    sops = Counter(r[0] for r in rows)
    assert [s for s, n in sops.items() if n > 1] == [], "an instance indexed twice"
    assert set(sops) == set(expected), (f"{len(set(expected) - set(sops))} missing, "
                                        f"{len(set(sops) - set(expected))} unexpected")
    for table, key in (("patient", "patient_id, issuer_of_patient_id"),
                       ("study", "study_instance_uid"), ("series", "series_instance_uid"),
                       ("instance", "path")):
        dup = sql(url, f"SELECT {key}, COUNT(*) FROM {table} GROUP BY {key} HAVING COUNT(*) > 1")
        assert dup == [], f"duplicate {table} rows: {dup[:3]}"
    # The counters (C-FIND's Number of ... Related ...) agree with the rows.
    assert sql(url, "SELECT s.series_instance_uid FROM series s WHERE s.number_of_instances <> "
                    "(SELECT COUNT(*) FROM instance i WHERE i.series_id = s.id)") == []
    assert sql(url, "SELECT st.study_instance_uid FROM study st WHERE "
                    "st.number_of_series <> (SELECT COUNT(*) FROM series s "
                    "WHERE s.study_id = st.id) OR st.number_of_instances <> "
                    "(SELECT COUNT(*) FROM instance i JOIN series s ON s.id = i.series_id "
                    "WHERE s.study_id = st.id) OR st.modalities_in_study <> 'CT'") == []
    assert sql(url, "SELECT p.patient_id FROM patient p WHERE "
                    "p.number_of_studies <> (SELECT COUNT(*) FROM study st "
                    "WHERE st.patient_id = p.id) OR p.number_of_series <> "
                    "(SELECT COUNT(*) FROM series s JOIN study st ON st.id = s.study_id "
                    "WHERE st.patient_id = p.id) OR p.number_of_instances <> "
                    "(SELECT COUNT(*) FROM instance i JOIN series s ON s.id = i.series_id "
                    "JOIN study st ON st.id = s.study_id WHERE st.patient_id = p.id)") == []
    assert {r[0] for r in sql(url, "SELECT series_instance_uid FROM series")} == \
        {s.series for s in expected.values()}
    assert {r[0] for r in sql(url, "SELECT study_instance_uid FROM study")} == \
        {s.study for s in expected.values()}
    paths = {r[0]: r[1] for r in rows}
    on_disk = stored_files(storage)
    assert set(paths.values()) - on_disk == set(), "index rows pointing at no file"
    assert on_disk - set(paths.values()) == set(), "stored files without an index row"
    for sop, rel, size, ts in rows:
        stored = storage / rel
        assert stored.stat().st_size == size
        assert dataset_bytes(stored) == dataset_bytes(expected[sop].path), f"{sop} differs"
        assert ts == ExplicitVRLittleEndian
    assert temp_files(storage) == [], "temporary files left behind"
    return paths


# --- queries ----------------------------------------------------------------------------------

def find_all(port: int, level: str, **keys: str) -> list:
    status, matches = c_find(port, level, **keys)
    assert status == 0x0000, f"C-FIND {level}: 0x{status:04X}"
    return matches


def findscu_studies(port: int, out: Path) -> list:
    """DCMTK findscu, Study Root, STUDY level, every study; its responses as data sets."""
    out.mkdir(parents=True)
    run_peer([dcmtk("findscu"), "-S", "-aec", AET, "-X", "-od", str(out),
              "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
              "-k", "NumberOfStudyRelatedSeries", "-k", "NumberOfStudyRelatedInstances",
              "-k", "ModalitiesInStudy", LOCAL, str(port)], timeout=60)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def assert_found_once(port: int, expected: dict[str, Sent], findscu_out: Path | None = None
                      ) -> None:
    """C-FIND at STUDY, SERIES and IMAGE level finds every instance exactly once, with the
    right Number of ... Related ... counts."""
    per_study = Counter(s.study for s in expected.values())
    per_series = Counter(s.series for s in expected.values())
    series_of_study = Counter(study for study in {(s.study, s.series): s.study
                                                  for s in expected.values()}.values())
    studies = find_all(port, "STUDY", StudyInstanceUID="", NumberOfStudyRelatedSeries="",
                       NumberOfStudyRelatedInstances="", ModalitiesInStudy="")
    if findscu_out is not None:
        dcmtk_studies = findscu_studies(port, findscu_out)
        assert sorted((str(d.StudyInstanceUID), int(d.NumberOfStudyRelatedInstances))
                      for d in dcmtk_studies) == \
            sorted((str(d.StudyInstanceUID), int(d.NumberOfStudyRelatedInstances))
                   for d in studies)
    assert Counter(str(d.StudyInstanceUID) for d in studies) == Counter(set(per_study))
    for d in studies:
        uid = str(d.StudyInstanceUID)
        assert int(d.NumberOfStudyRelatedInstances) == per_study[uid]
        assert int(d.NumberOfStudyRelatedSeries) == series_of_study[uid]
        assert d.ModalitiesInStudy == "CT"
    found_series: Counter[str] = Counter()
    found_images: Counter[str] = Counter()
    for study in per_study:
        for d in find_all(port, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="",
                          NumberOfSeriesRelatedInstances=""):
            found_series[str(d.SeriesInstanceUID)] += 1
            assert int(d.NumberOfSeriesRelatedInstances) == per_series[str(d.SeriesInstanceUID)]
        for d in find_all(port, "IMAGE", StudyInstanceUID=study, SeriesInstanceUID="",
                          SOPInstanceUID=""):
            found_images[str(d.SOPInstanceUID)] += 1
            assert expected[str(d.SOPInstanceUID)].series == str(d.SeriesInstanceUID)
    assert found_series == Counter(set(per_series))
    assert found_images == Counter(set(expected)), "C-FIND IMAGE: not every instance once"


def wado(http_url: str, s: Sent, into: Path) -> tuple[str, bytes]:
    """WADO-URI as application/dicom: (transfer syntax, data set bytes after the meta)."""
    url = (f"{http_url}/wado?requestType=WADO&studyUID={s.study}&seriesUID={s.series}"
           f"&objectUID={s.sop}&contentType=application/dicom")
    with urllib.request.urlopen(url, timeout=30) as rsp:
        assert rsp.status == 200
        assert rsp.headers["Content-Type"] == "application/dicom"
        into.write_bytes(rsp.read())
    return dataset_bytes(into)


def storescu_folder(port: int, folder: Path, n: int) -> None:
    """DCMTK storescu sends every file in `folder` (default proposals) over one association."""
    proc = run_peer([dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", AET, "+sd", "+r",
                     LOCAL, str(port), str(folder)], timeout=90)
    ok = (proc.stdout + proc.stderr).count("Received Store Response (Success)")
    assert ok == n, f"storescu: {ok} of {n} stored\n{proc.stderr[-3000:]}"


def store_in_step(port: int, files: list[Path], step: threading.Barrier, aet: str) -> list[int]:
    """C-STORE the files' bytes unchanged over one association, each only once every sender
    sharing `step` is ready to send it too; the statuses."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses = []
    with associate(port, [build_context(CTImageStorage, [ExplicitVRLittleEndian])],
                   aet=aet) as assoc:
        for path in files:
            step.wait(timeout=30)
            rsp = assoc.send_c_store(path)
            statuses.append(int(rsp.Status) if rsp else -1)
    return statuses


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.peers
@pytest.mark.timeout(180)
def test_two_nodes_store_at_once_and_each_finds_everything_once(tmp_path, postgres_url):
    storage = tmp_path / "storage"
    a, b = make_nodes(tmp_path, postgres_url, storage, "a", "b")
    # To A by storescu: 2 patients x 1 study x 2 series x 15; to B by two pynetdicom
    # associations, one patient's study each; and 2 studies x 2 series x 20 of one patient
    # split between the nodes (odd instances to B, even to A) and sent in step, so that both
    # nodes create the same patient, study and series rows at the same moment.
    to_a = write_series(tmp_path / "to-a", seed=11, patients=2, series=2, images=15, size=64)
    to_b = write_series(tmp_path / "to-b", seed=12, patients=2, series=2, images=15, size=64)
    split = write_series(tmp_path / "split", seed=13, studies=2, series=2, images=20, size=64)
    split_a = [p for p in split if int(p.stem[-4:]) % 2 == 0]
    split_b = [p for p in split if int(p.stem[-4:]) % 2 == 1]
    sent = describe(to_a + to_b + split)
    assert len(sent) == 200
    via_a = describe(to_a + split_a)

    with ExitStack() as stack:
        began = time.monotonic()
        node_a, node_b = start_all(stack, [a, b])
        started = time.monotonic() - began
        # Started at once on an empty index: one of them made the tables, the other waited.
        made = [n.name for n in (a, b) if "created the tables" in n.log.read_text()]
        assert len(made) == 1, f"tables created by {made}"
        began = time.monotonic()
        step = threading.Barrier(2)
        results = run_threads([
            lambda: storescu_folder(node_a.port, tmp_path / "to-a", len(to_a)),
            lambda: store_files(node_b.port, to_b[:30], aet="B1"),
            lambda: store_files(node_b.port, to_b[30:], aet="B2"),
            lambda: store_in_step(node_a.port, split_a, step, "SPLITA"),
            lambda: store_in_step(node_b.port, split_b, step, "SPLITB")])
        stored = time.monotonic() - began
        assert results[1:] == [[0] * 30, [0] * 30, [0] * 40, [0] * 40]

        # Each node finds everything, including what only the other was sent.
        assert_found_once(node_b.port, sent, tmp_path / "findscu-b")
        assert_found_once(node_a.port, sent, tmp_path / "findscu-a")

        # C-GET from each node of a study stored through both.
        split_study = next(iter(describe(split_a[:1]).values())).study
        wanted = {s.sop: s for s in sent.values() if s.study == split_study}
        assert len(wanted) == 40
        for node in (node_a, node_b):
            status, got = c_get(node.port, {"QueryRetrieveLevel": "STUDY",
                                            "StudyInstanceUID": split_study},
                                CTImageStorage, ExplicitVRLittleEndian)
            assert status == 0x0000
            assert set(got) == set(wanted)
            for sop, s in wanted.items():
                assert got[sop] == dataset_bytes(s.path), f"C-GET from {node.port}: {sop}"

        # WADO-URI: each instance from the node it was not sent to.
        for i, s in enumerate(sent.values()):
            node = node_b if s.sop in via_a else node_a
            assert wado(node.http_url, s, tmp_path / "wado.dcm") == dataset_bytes(s.path)

        assert_sound(postgres_url, storage, sent)
    print(f"two nodes: started in {started:.1f} s, 200 instances stored in {stored:.1f} s")


@pytest.mark.timeout(120)
def test_same_instance_sent_to_both_nodes_at_once_is_stored_once(tmp_path, postgres_url):
    storage = tmp_path / "storage"
    a, b = make_nodes(tmp_path, postgres_url, storage, "a", "b")
    files = write_series(tmp_path / "same", seed=21, images=30, size=64)
    sent = describe(files)
    with ExitStack() as stack:
        node_a, node_b = start_all(stack, [a, b])
        # Instance by instance in step: both nodes receive each one at the same moment.
        step = threading.Barrier(2)
        statuses = run_threads([lambda: store_in_step(node_a.port, files, step, "TOA"),
                                lambda: store_in_step(node_b.port, files, step, "TOB")])
        assert statuses == [[0] * 30, [0] * 30]
        paths = assert_sound(postgres_url, storage, sent)
        assert len(paths) == len(stored_files(storage)) == 30
        for node in (node_a, node_b):
            assert len(find_all(node.port, "IMAGE", StudyInstanceUID="", SOPInstanceUID="")) \
                == 30
        (study,) = {s.study for s in sent.values()}
        assert sql(postgres_url, "SELECT number_of_series, number_of_instances FROM study "
                                 "WHERE study_instance_uid = %s", (study,)) == [(1, 30)]
    # Every instance: one node kept its copy, the other found it indexed and dropped its own.
    logs = a.log.read_text() + b.log.read_text()
    dropped = Counter(re.findall(r"duplicate SOP Instance (\S+) from", logs))
    assert dropped == Counter(set(sent)), "each instance is a duplicate on exactly one node"


@pytest.mark.timeout(180)
def test_sigkill_one_node_mid_storm_the_other_keeps_serving_and_nothing_acknowledged_is_lost(
        tmp_path, postgres_url):
    storage = tmp_path / "storage"
    a, b = make_nodes(tmp_path, postgres_url, storage, "a", "b")
    # Two studies of 3 series, one client per series: series 1 to A, series 2 to B, series 3
    # to B again while A restarts (A's recovery walks the shared storage as B writes to it).
    images = 50
    files = write_series(tmp_path / "storm", seed=31, studies=2, series=3, images=images,
                         size=64)
    sent = describe(files)
    clients: dict[str, list[tuple[str, Path]]] = {}
    for s in sent.values():   # files named p1s1r1i0001.dcm: patient, study, series, image
        clients.setdefault(s.path.name[:6], []).append((s.sop, s.path))

    def wave(series: str, first: int) -> dict[int, list[tuple[str, Path]]]:
        return {first + i: v for i, (k, v) in enumerate(sorted(clients.items()))
                if k.endswith(series)}
    storms = {name: Storm(deadline=90) for name in ("a", "b", "b-again")}
    _config.STORE_SEND_CHUNKED_DATASET = True   # the storm sends the files' bytes as they are

    def acked(name: str) -> int:
        return storms[name].ack_count()

    with ExitStack() as stack:
        for storm in storms.values():
            stack.callback(storm.stop.set)
        node_a, node_b = start_all(stack, [a, b])
        storms["a"].port, storms["b"].port = node_a.port, node_b.port
        threads = storms["a"].start_clients(wave("r1", 0)) + \
            storms["b"].start_clients(wave("r2", 10))

        wait_for(lambda: acked("a") >= 20, 30, "node A to acknowledge 20 instances")
        node_a.proc.kill()
        killed_at = time.monotonic()
        storms["a"].port = 0   # A's clients wait, their unacknowledged instance pending
        node_a.proc.wait(10)
        acked_by_a = dict(storms["a"].acked)
        b_at_kill = acked("b")
        assert b_at_kill < 2 * images, "node B's clients finished before the kill"

        # B keeps serving: queries answered while its clients store, and every store acked.
        assert len(find_all(node_b.port, "STUDY", StudyInstanceUID="",
                            NumberOfStudyRelatedInstances="")) == 2
        wait_for(lambda: acked("b") == 2 * images, 60, "node B to acknowledge its share")
        print(f"killed A with {len(acked_by_a)} acknowledged by A, {b_at_kill} by B; B took "
              f"the rest {time.monotonic() - killed_at:.1f} s after")

        # Nothing either node acknowledged is lost: indexed, found through B, bytes as sent.
        acked_now = {**acked_by_a, **storms["b"].acked}
        rows = dict(sql(postgres_url, "SELECT sop_instance_uid, path FROM instance"))
        assert set(acked_now) - set(rows) == set(), "acknowledged instances lost"
        for sop, path in acked_now.items():
            assert dataset_bytes(storage / rows[sop]) == dataset_bytes(path), sop
        found = {str(d.SOPInstanceUID) for d in find_all(
            node_b.port, "IMAGE", StudyInstanceUID="", SOPInstanceUID="")}
        assert set(acked_now) <= found

        # A restarts on the same data folder and recovers, while B stores more; A's clients
        # then finish (an instance A stored but never acknowledged comes again: a duplicate).
        storms["b-again"].port = node_b.port
        threads += storms["b-again"].start_clients(wave("r3", 20))
        wait_for(lambda: acked("b-again") >= 5, 30, "node B's second wave to begin")
        began = time.monotonic()
        node_a = stack.enter_context(a.serve())
        restarted = time.monotonic() - began
        b_again_at_restart = acked("b-again")
        assert "the previous run did not stop cleanly" in a.log.read_text()
        storms["a"].port = node_a.port
        for name in storms:
            wait_for(lambda n=name: acked(n) == 2 * images, 60, f"storm {name} to finish")
        for t in threads:
            t.join(timeout=10)
        for storm in storms.values():
            assert storm.bad_status == [] and storm.errors == []
        assert set(storms["a"].acked) >= set(acked_by_a)

        # Both nodes agree, on everything sent, each once.
        counts = []
        for node in (node_a, node_b):
            studies = find_all(node.port, "STUDY", StudyInstanceUID="",
                               NumberOfStudyRelatedInstances="")
            found_images = find_all(node.port, "IMAGE", StudyInstanceUID="", SOPInstanceUID="")
            counts.append((sorted((str(d.StudyInstanceUID), int(d.NumberOfStudyRelatedInstances))
                                  for d in studies),
                           Counter(str(d.SOPInstanceUID) for d in found_images)))
        assert counts[0] == counts[1]
        assert counts[0][1] == Counter(set(sent))
        assert_sound(postgres_url, storage, sent)
    print(f"A restarted in {restarted:.1f} s while B's second wave stored "
          f"({b_again_at_restart} of {2 * images} done by then); A's clients: "
          f"{storms['a'].attempts} attempts, {storms['a'].aborted} cut off by the kill")


@pytest.mark.timeout(120)
def test_study_deleted_through_one_node_can_be_stored_again_through_the_other(tmp_path,
                                                                             postgres_url):
    """Node A remembers the series it stored (its series cache); node B deletes the study;
    the same instances sent to A again are stored anew, not refused for a series that is gone."""
    storage = tmp_path / "storage"
    a, b = make_nodes(tmp_path, postgres_url, storage, "a", "b")
    files = write_series(tmp_path / "again", seed=51, series=2, images=10, size=64)
    sent = describe(files)
    (study,) = {s.study for s in sent.values()}
    with ExitStack() as stack:
        node_a, node_b = start_all(stack, [a, b])
        assert store_files(node_a.port, files) == [0] * 20
        assert len(stored_files(storage)) == 20
        req = urllib.request.Request(f"{node_b.http_url}/api/studies/{study}", method="DELETE",
                                     headers={"X-Requested-With": "pacsd"})
        with urllib.request.urlopen(req, timeout=30) as rsp:
            assert json.load(rsp) == {"deleted": 20}
        assert sql(postgres_url, "SELECT COUNT(*) FROM study") == [(0,)]
        assert stored_files(storage) == set()
        assert len(list((storage / ".trash").rglob("*.dcm"))) == 20   # in the recycle bin
        assert find_all(node_a.port, "STUDY", StudyInstanceUID="") == []

        assert store_files(node_a.port, files) == [0] * 20
        assert_sound(postgres_url, storage, sent)
        assert len(find_all(node_b.port, "IMAGE", StudyInstanceUID=study,
                            SOPInstanceUID="")) == 20


@pytest.mark.timeout(120)
def test_a_login_on_one_node_is_good_on_the_other(tmp_path, postgres_url):
    """Behind an HTTP load balancer without sticky sessions the next request of a logged-in
    user may reach another node: the session key lives in the shared index."""
    users = [{"name": "reader", "password_hash": hash_password("reader-password")}]
    nodes = make_nodes(tmp_path, postgres_url, tmp_path / "storage", "a", "b", users=users)
    with ExitStack() as stack:
        node_a, node_b = start_all(stack, nodes)
        session = requests.Session()
        assert session.get(f"{node_b.http_url}/api/me", timeout=10).status_code == 401
        r = session.post(f"{node_a.http_url}/app/login",
                         json={"name": "reader", "password": "reader-password"}, timeout=10)
        assert r.status_code == 200
        # The cookie was issued for A's address; present it to B as a browser would to the
        # load balancer's one address.
        cookie = session.cookies.get("pacsd_session")
        assert cookie
        me = requests.get(f"{node_b.http_url}/api/me", cookies={"pacsd_session": cookie},
                          timeout=10)
        assert me.status_code == 200 and me.json()["user"] == "reader"
    assert len(sql(postgres_url, "SELECT value FROM pacsd_meta WHERE key = 'session_key'")) == 1


@pytest.mark.timeout(120)
def test_housekeeping_lease_runs_on_one_node_and_moves_when_it_dies(tmp_path, postgres_url):
    interval = 0.3
    storage = tmp_path / "storage"
    nodes = make_nodes(tmp_path, postgres_url, storage, "a", "b")
    env = {"PACSD_SERVER_HOUSEKEEPING_INTERVAL": str(interval)}

    def holder() -> str | None:
        rows = sql(postgres_url, "SELECT holder FROM pacsd_lease WHERE name = 'tmp-sweep'")
        return rows[0][0] if rows else None

    def plant(age_s: float) -> Path:
        dead = storage / ".tmp" / "some-dead-node"
        dead.mkdir(parents=True, exist_ok=True)
        path = dead / f"{os.urandom(8).hex()}.dcm.part"
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    with ExitStack() as stack:
        procs = start_all(stack, nodes, env=env)
        ids = [n.node_id() for n in nodes]
        assert len(set(ids)) == 2
        first = wait_for(holder, 10 * interval + 5, "a holder of the tmp-sweep lease")
        assert first in ids
        # It stays with its holder, renewed every interval, over several intervals.
        deadline = time.monotonic() + 6 * interval
        polls = 0
        while time.monotonic() < deadline:
            assert holder() == first
            polls += 1
            time.sleep(POLL)
        assert polls > 10

        # The holder sweeps old temporary files of a node that never came back; fresh stay.
        fresh, old = plant(0), plant(2 * 24 * 3600)
        wait_for(lambda: not old.exists(), 3 * interval + 5, "the old temporary file to go")
        assert fresh.exists()
        h = ids.index(first)
        other = 1 - h
        assert "housekeeping tmp-sweep: 1 cleaned up" in nodes[h].log.read_text()
        assert "housekeeping tmp-sweep" not in nodes[other].log.read_text()

        # SIGKILL the holder: the lease passes to the other once it expires (two intervals
        # after its last renewal), at the other's next round.
        procs[h].proc.kill()
        killed = time.monotonic()
        wait_for(lambda: holder() == ids[other], 3 * interval + 2,
                 "the other node to take the lease")
        moved = time.monotonic() - killed
        assert moved <= 3 * interval + 1.0, f"the lease took {moved:.2f} s to move"
        old = plant(2 * 24 * 3600)
        wait_for(lambda: not old.exists(), 3 * interval + 5, "the new holder to sweep")
        assert fresh.exists()
        assert "housekeeping tmp-sweep: 1 cleaned up" in nodes[other].log.read_text()
    print(f"the lease moved {moved:.2f} s after the kill (interval {interval} s)")
