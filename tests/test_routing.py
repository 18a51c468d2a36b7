"""Auto-routing ([[routes]]) and its durable queue (pacsd.nodes.routing, pacsd.index.outbox), with real
peers: DCMTK's storescp as the destination where bytes on disk are what counts, and pynetdicom
storage SCPs written here where the destination must misbehave (refuse associations, answer
0xA700 Out of Resources, hold each C-STORE) or say who sent what on which association.

What must hold:
- a `when = "stored"` rule sends exactly the instances it matches (calling AE, any attribute,
  DICOM wildcards) as they arrive; a `when = "stable"` rule sends each study once, whole, after
  it has been quiet for [hooks] study_stable_after, and not before; the bytes arrive unchanged;
- a failed try waits retry_delay, doubled each time; after max_attempts the job is dead, listed
  by GET /api/queue and `pacsd queue`, queued again by POST /api/queue/retry, forgotten by
  `pacsd queue forget`;
- at most [routing] concurrency associations at once to one destination, one study each;
- a SIGKILL loses no job: queued ones (and studies not yet stable) are sent after the restart,
  and the claims of a node killed while sending are given back when it starts again;
- two nodes on one PostgreSQL share the queue: each job sent once, by one of them.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import (
    LOCAL,
    dcmtk,
    free_port,
    pacsd_cmd,
    peer_env,
    run_peer,
    serve,
    store_files,
    wait_for,
    write_config,
)
from data import Sent, dataset_bytes, describe, write_series
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import Verification

HEADERS = {"X-Requested-With": "pacsd"}


# --- what was sent ----------------------------------------------------------------------------

def series(folder: Path, seed: int, images: int, **kw) -> list[Path]:
    """One small study of one series (64 x 64: the pixels do not matter here)."""
    return write_series(folder, seed=seed, images=images, size=64, **kw)


def retag(paths: list[Path], **values: str) -> list[Path]:
    """Change attributes of written files in place (a description, a modality)."""
    for p in paths:
        ds = dcmread(p)
        for k, v in values.items():
            setattr(ds, k, v)
        ds.save_as(p, enforce_file_format=True)
    return paths


# --- DCMTK storescp as a destination ----------------------------------------------------------

class StoreScp:
    """DCMTK's storescp writing exactly what it receives (+B), one file per C-STORE even for
    the same instance twice (+uf), so that duplicates can be counted."""

    def __init__(self, folder: Path, aet: str, port: int) -> None:
        self.folder, self.aet, self.port = folder, aet, port
        self.out = folder / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreScp:
        with open(self.folder / "storescp.log", "ab") as log:
            self.proc = subprocess.Popen(
                [dcmtk("storescp"), "-od", str(self.out), "+xa", "+B", "+uf", "-aet", self.aet,
                 str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=peer_env())
        wait_for(lambda: echo(self.port, self.aet), 15, f"storescp {self.aet} listening")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def node(self, name: str) -> dict:
        return {"name": name, "aet": self.aet, "host": LOCAL, "port": self.port}

    def copies(self) -> dict[str, list[tuple[Path, float]]]:
        """SOP Instance UID -> (file, when it was last written) of every copy received."""
        out: dict[str, list[tuple[Path, float]]] = defaultdict(list)
        for p in sorted(self.out.iterdir()):
            try:
                sop = str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            except Exception:  # noqa: BLE001, S112 - a file still being written: next poll
                continue
            out[sop].append((p, p.stat().st_mtime))
        return out


def echo(port: int, aet: str) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 2
    assoc = ae.associate(LOCAL, port, ae_title=aet)
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def arrived(scp: StoreScp, wanted: dict[str, Sent]) -> bool:
    """Every wanted instance has a copy at `scp` holding the bytes sent."""
    have = scp.copies()
    return all(any(same(p, s.path) for p, _ in have.get(sop, [])) for sop, s in wanted.items())


def same(received: Path, original: Path) -> bool:
    try:
        return dataset_bytes(received) == dataset_bytes(original)
    except Exception:  # noqa: BLE001 - still being written
        return False


def assert_received_once(scp: StoreScp, wanted: dict[str, Sent]) -> dict[str, list]:
    have = scp.copies()
    assert set(have) == set(wanted), (f"{scp.aet}: {len(set(have) - set(wanted))} unexpected, "
                                      f"{len(set(wanted) - set(have))} missing")
    for sop, s in wanted.items():
        assert len(have[sop]) == 1, f"{scp.aet}: {sop} received {len(have[sop])} times"
        assert dataset_bytes(have[sop][0][0]) == dataset_bytes(s.path)
    return have


# --- a pynetdicom storage SCP that misbehaves on demand ---------------------------------------

@dataclass(frozen=True)
class Received:
    assoc: int          # number of the association that carried it (from 1)
    calling: str
    sop: str
    study: str
    data: tuple[str, bytes]   # (transfer syntax, data set bytes)
    at: float


class Scp:
    """A storage SCP whose `policy(n)` says what to do with the n-th association (from 1):
    "refuse" it (A-ASSOCIATE-RJ, calling AE not recognised), "fail" its C-STOREs (0xA700), or
    "accept". Each accepted C-STORE is held `hold` seconds. Counts associations open at once
    (from acceptance to the A-RELEASE-RQ) and C-STOREs in progress at once."""

    def __init__(self, aet: str, hold: float = 0.0,
                 policy: Callable[[int], str] = lambda n: "accept") -> None:
        self.aet, self.hold, self.policy = aet, hold, policy
        self.lock = threading.Lock()
        self.requested: list[float] = []        # when each association was asked for
        self.actions: list[str] = []            # what was done with it
        self.number: dict[object, int] = {}
        self.open: set[object] = set()
        self.open_now = self.open_most = 0
        self.storing_now = self.storing_most = 0
        self.failed = 0
        self.received: list[Received] = []
        self.ae = AE(ae_title=aet)
        self.ae.maximum_associations = 20
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        # The acceptor's order picks the syntax: the stored one first, so that pacsd sends the
        # files as they are (with Implicit VR first it would transcode, and rightly so).
        syntaxes = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES
                                               if ts != ExplicitVRLittleEndian]
        for cx in StoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, syntaxes)
        self.server = self.ae.start_server((LOCAL, 0), block=False, evt_handlers=[
            (evt.EVT_REQUESTED, self._requested), (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_PDU_RECV, self._pdu), (evt.EVT_ABORTED, self._closed),
            (evt.EVT_CONN_CLOSE, self._closed), (evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def node(self, name: str) -> dict:
        return {"name": name, "aet": self.aet, "host": LOCAL, "port": self.port}

    def close(self) -> None:
        self.server.shutdown()

    def _requested(self, event) -> None:
        # Runs before pynetdicom negotiates: the AE's calling AE list decides acceptance.
        with self.lock:
            self.requested.append(time.time())
            n = len(self.requested)
            action = self.policy(n)
            self.actions.append(action)
            self.number[event.assoc] = n
            self.ae.require_calling_aet = ["NOT-YOU"] if action == "refuse" else []

    def _established(self, event) -> None:
        with self.lock:
            self.open.add(event.assoc)
            self.open_now += 1
            self.open_most = max(self.open_most, self.open_now)

    def _pdu(self, event) -> None:
        if isinstance(event.pdu, A_RELEASE_RQ):   # before our A-RELEASE-RP can be sent
            self._closed(event)

    def _closed(self, event) -> None:
        with self.lock:
            if event.assoc in self.open:
                self.open.discard(event.assoc)
                self.open_now -= 1

    def _store(self, event) -> int:
        with self.lock:
            n = self.number[event.assoc]
            if self.actions[n - 1] == "fail":
                self.failed += 1
                return 0xA700
            self.storing_now += 1
            self.storing_most = max(self.storing_most, self.storing_now)
        try:
            time.sleep(self.hold)
            data = (str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
            ds = event.dataset
            with self.lock:
                self.received.append(Received(n, event.assoc.requestor.ae_title,
                                              str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                              data, time.time()))
        finally:
            with self.lock:
                self.storing_now -= 1
        return 0x0000

    def copies(self) -> Counter:
        with self.lock:
            return Counter(r.sop for r in self.received)

    def has(self, wanted: dict[str, Sent]) -> bool:
        with self.lock:
            got = {r.sop: r.data for r in self.received}
        return all(got.get(sop) == dataset_bytes(s.path) for sop, s in wanted.items())


@contextmanager
def scps(*made: Scp) -> Iterator[tuple[Scp, ...]]:
    try:
        yield made
    finally:
        for s in made:
            s.close()


# --- the queue, through the admin API, the CLI and the database file --------------------------

def queue(url: str, state: str = "all") -> dict:
    rsp = requests.get(f"{url}/api/queue", params={"state": state, "limit": 1000}, timeout=30)
    assert rsp.status_code == 200, rsp.text
    return rsp.json()


def post(url: str, path: str, body: dict) -> dict:
    rsp = requests.post(f"{url}{path}", json=body, headers=HEADERS, timeout=30)
    assert rsp.status_code == 200, rsp.text
    return rsp.json()


def cli_queue(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(pacsd_cmd("queue", "--config", str(config), *args),
                          capture_output=True, text=True, timeout=60, check=False)


def db_jobs(data: Path) -> list[dict]:
    """The rows of pacsd_route_job, read straight from the SQLite file (the server may be
    running or dead)."""
    con = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM pacsd_route_job ORDER BY id")]
    finally:
        con.close()


def db_rows(data: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def by_route(jobs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for j in jobs:
        out[j["route"]].append(j)
    return out


# --- 1. matching, and both whens --------------------------------------------------------------

@pytest.mark.peers
@pytest.mark.timeout(60)
def test_rules_match_per_instance_when_stored_and_per_study_when_stable(tmp_path, make_server):
    """CT from CT1 described *CHEST* goes to `ai` as it is stored; everything goes to
    ARCHIVE2 (named by its AE title in the rule) once its study is stable."""
    with ExitStack() as stack:
        ai = StoreScp(tmp_path / "ai", "AI", free_port()).start()
        stack.callback(ai.stop)
        archive = StoreScp(tmp_path / "archive2", "ARCHIVE2", free_port()).start()
        stack.callback(archive.stop)
        server = make_server(
            nodes=[ai.node("ai"), archive.node("archive2")],
            hooks={"study_stable_after": 0.5},
            routes=[{"name": "chest-ct", "to": "ai", "when": "stored", "calling_aet": "CT1",
                     "match": {"Modality": "CT", "StudyDescription": "*CHEST*"}},
                    {"name": "everything", "to": "ARCHIVE2", "when": "stable"}])

        # a: CT CHEST from CT1, stored in two associations 0.1 s apart (one study, one stable
        # job); b: CT CHEST from CT1 with a second series of MR: only the CT series matches;
        # c: the same from CT2; d: CT HEAD from CT1.
        a = series(tmp_path / "a", 31, 6)
        b = series(tmp_path / "b-ct", 32, 3) + retag(
            write_series(tmp_path / "b-mr", seed=32, images=2, size=64, series=2)[-2:],
            Modality="MR")
        c = series(tmp_path / "c", 33, 3)
        d = retag(series(tmp_path / "d", 34, 3), StudyDescription="CT HEAD")
        sent = {k: describe(v) for k, v in (("a", a), ("b", b), ("c", c), ("d", d))}
        assert len({s.study for v in sent.values() for s in v.values()}) == 4
        b_ct = {sop: s for sop, s in sent["b"].items() if s.path.parent.name == "b-ct"}
        assert len(b_ct) == 3

        began = time.time()
        acked: dict[str, float] = {}
        assert store_files(server.dicom_port, a[:3], aet="CT1") == [0] * 3
        time.sleep(0.1)   # well within study_stable_after: still one study arriving
        for key, paths, aet in (("a", a[3:], "CT1"), ("b", b, "CT1"), ("c", c, "CT2")):
            assert store_files(server.dicom_port, paths, aet=aet) == [0] * len(paths)
            acked[key] = time.time()
        # d from DCMTK's storescu, as a modality would send it.
        run_peer([dcmtk("storescu"), "-aet", "CT1", "-aec", "PACSD", LOCAL,
                  str(server.dicom_port), *map(str, d)])
        acked["d"] = time.time()

        to_ai = {**sent["a"], **b_ct}
        everything = {sop: s for v in sent.values() for sop, s in v.items()}
        wait_for(lambda: arrived(ai, to_ai), 20, "the chest CTs at ai")
        at_ai = time.time() - began
        wait_for(lambda: arrived(archive, everything), 20, "every study at archive2")
        at_archive = time.time() - began

        assert_received_once(ai, to_ai)
        have = assert_received_once(archive, everything)
        # Stable means quiet for 0.5 s: no study reached archive2 sooner after its last
        # instance was acknowledged (0.1 s of slack for the clocks' granularity).
        for key, v in sent.items():
            first = min(have[sop][0][1] for sop in v)
            assert first >= acked[key] + 0.4, f"study {key} sent {first - acked[key]:.2f} s " \
                                              "after its last instance: not stable yet"
        # ...while the stored rule sent study a before it was stable.
        assert max(m for sop in sent["a"] for _, m in ai.copies()[sop]) < \
            min(have[sop][0][1] for sop in sent["a"])

        jobs = queue(server.http_url)
        assert jobs["counts"] == {"queued": 0, "done": 9 + 4, "dead": 0}
        routes = by_route(jobs["jobs"])
        assert sorted(j["sop_uid"] for j in routes["chest-ct"]) == sorted(to_ai)
        assert Counter(j["study_uid"] for j in routes["everything"]) == Counter(
            {next(iter(v.values())).study: 1 for v in sent.values()})
        assert all(j["destination"] == "ARCHIVE2" and j["sop_uid"] == ""
                   for j in routes["everything"])
        assert all(j["state"] == "done" and j["attempts"] == 0 for j in jobs["jobs"])
    print(f"routing: 9 of 17 instances at ai after {at_ai:.2f} s, 4 studies at archive2 after "
          f"{at_archive:.2f} s")


# --- 2. retries with back-off, dead letters ---------------------------------------------------

@pytest.mark.timeout(60)
def test_failed_tries_back_off_then_go_dead_and_can_be_retried_or_forgotten(tmp_path,
                                                                            make_server):
    # flaky refuses its first association and answers 0xA700 on the next two: the fourth and
    # last allowed try succeeds. broken answers 0xA700 until told otherwise.
    flaky_plan = {1: "refuse", 2: "fail", 3: "fail"}
    broken_ok = threading.Event()
    with scps(Scp("FLAKY", policy=lambda n: flaky_plan.get(n, "accept")),
              Scp("BROKEN", policy=lambda n: "accept" if broken_ok.is_set() else "fail")
              ) as (flaky, broken):
        server = make_server(
            nodes=[flaky.node("flaky"), broken.node("broken")],
            hooks={"study_stable_after": 0.5},
            routing={"retry_delay": 0.5, "max_attempts": 4},
            routes=[{"name": "to-flaky", "to": "flaky", "when": "stable", "calling_aet": "MOD1"},
                    {"name": "to-broken", "to": "broken", "when": "stable",
                     "calling_aet": "MOD2"}])
        f = describe(series(tmp_path / "f", 41, 3))
        x = describe(series(tmp_path / "x", 42, 2))
        y = describe(series(tmp_path / "y", 43, 2))
        began = time.time()
        assert store_files(server.dicom_port, [s.path for s in f.values()], aet="MOD1") == [0] * 3
        for study in (x, y):
            assert store_files(server.dicom_port, [s.path for s in study.values()],
                               aet="MOD2") == [0] * 2

        wait_for(lambda: flaky.has(f), 30, "the study at flaky after its failed tries")
        assert flaky.actions == ["refuse", "fail", "fail", "accept"]
        assert flaky.copies() == Counter(list(f))
        # Waits of 0.5, 1 and 2 s (the sender also looks only once a second, POLL_S).
        gaps = [b - a for a, b in zip(flaky.requested, flaky.requested[1:])]
        for i, gap in enumerate(gaps):
            assert 0.5 * 2 ** i - 0.05 <= gap <= 0.5 * 2 ** i + 2.5, \
                f"try {i + 2} came {gap:.2f} s after try {i + 1}"

        dead = wait_for(lambda: (q := queue(server.http_url, "dead"))["counts"]["dead"] == 2
                        and q, 30, "both broken jobs dead")
        took = time.time() - began
        assert len(broken.requested) == 2 * 4 and broken.failed == 2 * 4 * 2
        assert not broken.received
        jobs = {j["study_uid"]: j for j in dead["jobs"]}
        x_study, y_study = next(iter(x.values())).study, next(iter(y.values())).study
        assert set(jobs) == {x_study, y_study}
        for j in jobs.values():
            assert (j["state"], j["attempts"], j["route"], j["destination"]) == \
                ("dead", 4, "to-broken", "broken")
            assert "not accepted by BROKEN" in j["last_error"]
        flaky_job = [j for j in queue(server.http_url)["jobs"] if j["route"] == "to-flaky"]
        assert [(j["state"], j["attempts"]) for j in flaky_job] == [("done", 3)]

        # The CLI, a second process on the same SQLite index, lists the same dead letters.
        listed = cli_queue(Path(server.cfg.source), "--json")
        assert listed.returncode == 0, listed.stderr
        assert {j["id"] for j in json.loads(listed.stdout)["jobs"]} == \
            {j["id"] for j in jobs.values()}

        # Changes need the CSRF header; then x is queued again, from zero tries, and sent.
        rsp = requests.post(f"{server.http_url}/api/queue/retry", timeout=30,
                            json={"ids": [jobs[x_study]["id"]]})
        assert rsp.status_code == 403
        broken_ok.set()
        assert post(server.http_url, "/api/queue/retry", {"ids": [jobs[x_study]["id"]]}) == \
            {"queued": 1}
        wait_for(lambda: broken.has(x), 20, "study x at broken after the retry")
        wait_for(lambda: {j["id"]: (j["state"], j["attempts"])
                          for j in queue(server.http_url)["jobs"]}[jobs[x_study]["id"]]
                 == ("done", 0), 10, "x's job done")
        assert broken.copies() == Counter(list(x))

        # y is forgotten by the CLI: gone from the list, never sent.
        gone = cli_queue(Path(server.cfg.source), "forget", str(jobs[y_study]["id"]))
        assert gone.returncode == 0 and "1 job(s) forgotten" in gone.stdout, gone.stderr
        after = queue(server.http_url)
        assert jobs[y_study]["id"] not in {j["id"] for j in after["jobs"]}
        assert after["counts"] == {"queued": 0, "done": 2, "dead": 0}
        assert broken.copies() == Counter(list(x))
    print(f"retries: flaky delivered after gaps of {', '.join(f'{g:.2f}' for g in gaps)} s; "
          f"2 dead letters after {took:.1f} s")


# --- 3. associations per destination ----------------------------------------------------------

@pytest.mark.timeout(60)
def test_at_most_concurrency_associations_to_a_destination_one_study_each(tmp_path,
                                                                         make_server):
    with scps(Scp("SLOW", hold=0.15)) as (slow,):
        server = make_server(nodes=[slow.node("slow")], hooks={"study_stable_after": 0.5},
                             routing={"concurrency": 2},
                             routes=[{"name": "all", "to": "slow", "when": "stable"}])
        studies = [describe(series(tmp_path / f"s{i}", 50 + i, 3)) for i in range(5)]
        everything = {sop: s for st in studies for sop, s in st.items()}
        # One association, five studies: they turn stable together.
        assert store_files(server.dicom_port, [s.path for s in everything.values()]) == [0] * 15
        wait_for(lambda: slow.has(everything), 30, "five studies at slow")
        took = max(r.at for r in slow.received) - slow.requested[0]
        assert slow.copies() == Counter(list(everything))
        assert slow.storing_most == 2, f"{slow.storing_most} C-STOREs at once"
        assert slow.open_most == 2, f"{slow.open_most} associations at once"
        per_assoc: dict[int, set[str]] = defaultdict(set)
        for r in slow.received:
            per_assoc[r.assoc].add(r.study)
        assert len(slow.requested) == 5
        assert sorted(len(v) for v in per_assoc.values()) == [1] * 5
        assert {next(iter(v)) for v in per_assoc.values()} == \
            {next(iter(st.values())).study for st in studies}
    print(f"concurrency 2: 5 studies of 3 images held 0.15 s each sent in {took:.2f} s "
          "(one at a time: 2.25 s)")


# --- 4. durability across SIGKILL -------------------------------------------------------------

def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.peers
@pytest.mark.timeout(90)
def test_jobs_queued_for_a_down_destination_survive_sigkill(tmp_path):
    data = tmp_path / "data"
    now_port, later_port = free_port(), free_port()
    config = write_config(
        tmp_path / "pacsd.toml", data,
        nodes=[{"name": "now", "aet": "NOW", "host": LOCAL, "port": now_port},
               {"name": "later", "aet": "LATER", "host": LOCAL, "port": later_port}],
        hooks={"study_stable_after": 0.5}, routing={"retry_delay": 0.2, "max_attempts": 50},
        routes=[{"name": "now", "to": "now", "when": "stored"},
                {"name": "later", "to": "later", "when": "stable"}])
    studies = [describe(series(tmp_path / f"s{i}", 60 + i, 4)) for i in range(3)]
    last = describe(series(tmp_path / "last", 69, 2))
    everything = {sop: s for st in [*studies, last] for sop, s in st.items()}
    uids = {next(iter(st.values())).study for st in studies}
    last_uid = next(iter(last.values())).study

    with serve(config, data) as pacsd:
        for st in studies:
            assert store_files(pacsd.port, [s.path for s in st.values()]) == [0] * 4
        # Nothing listens at either destination: every try fails and the jobs wait.
        wait_for(lambda: len([j for j in db_jobs(data) if j["state"] == "queued"]) == 12 + 3,
                 20, "12 stored and 3 stable jobs queued")
        wait_for(lambda: all(j["attempts"] >= 1 for j in db_jobs(data)), 20, "every job tried")
        # The last study is acknowledged, then pacsd killed before it can turn stable.
        assert store_files(pacsd.port, [s.path for s in last.values()]) == [0] * 2
        kill(pacsd.proc)

    jobs = db_jobs(data)
    stable = by_route(jobs)["later"]
    assert {j["study_uid"] for j in stable} == uids
    assert sorted(j["sop_uid"] for j in by_route(jobs)["now"]) == sorted(everything)
    assert all(j["state"] == "queued" for j in jobs)
    assert db_rows(data, "SELECT study_uid FROM pacsd_study_activity") == [(last_uid,)]

    now = StoreScp(tmp_path / "now", "NOW", now_port).start()
    later = StoreScp(tmp_path / "later", "LATER", later_port).start()
    try:
        began = time.time()
        with serve(config, data, log_name="serve2.log") as pacsd:
            wait_for(lambda: arrived(now, everything), 30, "every instance at `now`")
            wait_for(lambda: arrived(later, everything), 30, "every study at `later`")
            took = time.time() - began
            done = wait_for(lambda: (r := cli_queue(config, "--state", "all", "--json"))
                            .returncode == 0 and (q := json.loads(r.stdout))["counts"]["done"]
                            == 12 + 2 + 4 and q, 20, "every job done")
        assert done["counts"] == {"queued": 0, "done": 18, "dead": 0}
        dups = {}
        for scp in (now, later):
            have = scp.copies()
            assert set(have) == set(everything)
            for sop, copies in have.items():
                assert all(dataset_bytes(p) == dataset_bytes(everything[sop].path)
                           for p, _ in copies)
            dups[scp.aet] = sum(len(c) - 1 for c in have.values())
    finally:
        now.stop()
        later.stop()
    print(f"after SIGKILL: 14 instances and 4 studies delivered {took:.1f} s after the restart; "
          f"duplicates: {dups}")
    assert dups == {"NOW": 0, "LATER": 0}


@pytest.mark.timeout(90)
def test_claims_of_a_node_killed_while_sending_are_released_at_restart(tmp_path):
    with scps(Scp("SLOWPOKE", hold=0.1)) as (slow,):
        data = tmp_path / "data"
        config = write_config(tmp_path / "pacsd.toml", data, nodes=[slow.node("slow")],
                              hooks={"study_stable_after": 0.5},
                              routes=[{"name": "all", "to": "slow", "when": "stable"}])
        study = describe(series(tmp_path / "s", 70, 20))
        with serve(config, data) as pacsd:
            assert store_files(pacsd.port, [s.path for s in study.values()]) == [0] * 20
            wait_for(lambda: len(slow.received) >= 4, 20, "the send under way")
            kill(pacsd.proc)
        # A C-STORE being held when pacsd died still completes here (its response is lost).
        wait_for(lambda: slow.storing_now == 0 and slow.open_now == 0, 10, "the SCP idle")
        before = len(slow.received)
        assert before < 20
        [job] = db_jobs(data)
        node = (data / "node-id").read_text().strip()
        # Claimed by the dead node for LEASE_S (600 s): without the release at restart the
        # study would wait ten minutes.
        assert (job["state"], job["claimed_by"]) == ("queued", node)
        assert job["claimed_until"] > time.time() + 500

        slow.hold = 0.0
        began = time.time()
        with serve(config, data, log_name="serve2.log") as pacsd:
            wait_for(lambda: slow.has(study), 30, "the whole study after the restart")
            took = time.time() - began
            wait_for(lambda: db_jobs(data)[0]["state"] == "done", 10, "the job done")
            assert "claimed before a restart are queued again" in pacsd.output()
        copies = slow.copies()
        assert set(copies) == set(study)
        dups = sum(copies.values()) - len(study)
        assert dups == before   # the first try's instances, sent again with the rest
    print(f"killed after {before} of 20 sent; all 20 there {took:.1f} s after the restart "
          f"({dups} duplicates)")


def test_a_stop_during_a_send_ends_after_the_image_under_way_and_keeps_the_job(tmp_path):
    """SIGTERM while a big study goes out over a slow link: pacsd stops at once, without
    counting a failed try, and gives the job back to the queue; the next start sends it."""
    with scps(Scp("SLOWLINK", hold=0.2)) as (slow,):
        data = tmp_path / "data"
        config = write_config(tmp_path / "pacsd.toml", data, nodes=[slow.node("slow")],
                              hooks={"study_stable_after": 0.5},
                              routes=[{"name": "all", "to": "slow", "when": "stable"}])
        study = describe(series(tmp_path / "s", 71, 30))
        with serve(config, data) as pacsd:
            assert store_files(pacsd.port, [s.path for s in study.values()]) == [0] * 30
            wait_for(lambda: len(slow.received) >= 3, 20, "the send under way")
            began = time.monotonic()
            assert pacsd.stop() == 0
            stopped = time.monotonic() - began
        assert stopped < 3, f"the stop took {stopped:.1f} s"   # 30 x 0.2 s would be 6 s
        sent = len(slow.received)
        assert sent < 30
        [job] = db_jobs(data)
        assert (job["state"], job["attempts"], job["claimed_by"]) == ("queued", 0, "")
        slow.hold = 0.0
        with serve(config, data, log_name="serve2.log"):
            wait_for(lambda: slow.has(study), 30, "the whole study after the restart")
            wait_for(lambda: db_jobs(data)[0]["state"] == "done", 10, "the job done")


# --- 5. two nodes, one queue ------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_two_nodes_on_one_postgresql_share_the_queue_each_job_sent_once(tmp_path, postgres_url):
    """Jobs queued by node A are taken by A or B (one association at a time each): every
    instance and every study reaches its destination exactly once, one study per
    association."""
    with scps(Scp("EACH", hold=0.05), Scp("WHOLE", hold=0.02)) as (each, whole), \
            ExitStack() as stack:
        storage = tmp_path / "storage"
        nodes = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            data = tmp_path / name / "data"
            config = write_config(
                tmp_path / f"{name}.toml", data, dicom={"aet": f"NODE{name.upper()}"},
                index={"url": postgres_url}, storage={"path": str(storage), "min_free_mb": 0},
                nodes=[each.node("each"), whole.node("whole")],
                hooks={"study_stable_after": 0.5}, routing={"concurrency": 1},
                routes=[{"name": "each", "to": "each", "when": "stored"},
                        {"name": "whole", "to": "whole", "when": "stable"}])
            nodes.append(stack.enter_context(serve(config, data, log_name=f"{name}.log")))
        a, _ = nodes
        studies = [describe(series(tmp_path / f"s{i}", 80 + i, 4)) for i in range(6)]
        everything = {sop: s for st in studies for sop, s in st.items()}
        assert store_files(a.port, [s.path for s in everything.values()]) == [0] * 24
        wait_for(lambda: each.has(everything) and whole.has(everything), 60,
                 "every instance at `each` and every study at `whole`")
        url = a.http_url
        wait_for(lambda: queue(url)["counts"]["done"] == 24 + 6, 10, "every job done")
        assert queue(url)["counts"] == {"queued": 0, "done": 30, "dead": 0}
        senders = {}
        for scp in (each, whole):
            assert scp.copies() == Counter(list(everything)), f"{scp.aet}: duplicates"
            per_assoc: dict[int, set[str]] = defaultdict(set)
            callers: dict[int, str] = {}
            for r in scp.received:
                per_assoc[r.assoc].add(r.study)
                callers[r.assoc] = r.calling
            assert all(len(v) == 1 for v in per_assoc.values())
            senders[scp.aet] = Counter(callers.values())
        assert set(senders["WHOLE"]) <= {"NODEA", "NODEB"}
        assert sum(senders["WHOLE"].values()) == 6   # one association per study
        # A's sender is busy one study at a time: B, looking every second, takes some.
        assert set(senders["EACH"]) == {"NODEA", "NODEB"}, senders
    print(f"two nodes: associations by sender {senders}")
