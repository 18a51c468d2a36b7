"""The index on its own, on each backend (SQLite, PostgreSQL): group commit, the statements one
C-STORE costs, counters, duplicates, leases; and what several nodes sharing one PostgreSQL index
rely on: two processes adding the same instances at once, batches run again after a deadlock
or a lost connection.

One Index binds the process's one database proxy, so "another node" is another process: `Peer`
runs an Index of its own in a subprocess and answers JSON commands on its stdin.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from data import ct_slice, uid
from peewee import SqliteDatabase
from psycopg import pq

from pacsd.imaging.header import check_and_extract
from pacsd.index import Index
from pacsd.index.models import Patient, Series, Study, database

TS = "1.2.840.10008.1.2.1"
SEED = 21
TESTS = Path(__file__).parent


def record(n: int, series: int = 1, study: int = 1, patient: int = 1, modality: str = "CT"):
    return check_and_extract(ct_slice(seed=SEED, patient=patient, study=study, series=series,
                                      number=n, size=2, modality=modality))


Rows = Callable[[str], list[tuple]]


def index_rows(sql: str) -> list[tuple]:
    """Rows through this process's open Index (either backend)."""
    with database.connection_context():
        return [tuple(r) for r in database.execute_sql(sql).fetchall()]


def pg_rows(url: str) -> Rows:
    """Rows through a connection of our own (the index is another process's)."""
    def rows(sql: str) -> list[tuple]:
        with psycopg.connect(url, connect_timeout=10) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    return rows


def counter_errors(rows: Rows) -> list[str]:
    """Each counter (PS3.4 C.3.4 Number of ... Related ...) that is not the COUNT(*) of the
    rows it counts, and each ModalitiesInStudy that is not the set of its series' modalities."""
    errors = []
    for sid, n, real in rows("SELECT s.id, s.number_of_instances, (SELECT count(*) FROM "
                             "instance i WHERE i.series_id = s.id) FROM series s"):
        if n != real:
            errors.append(f"series {sid}: counts {n} instances, has {real}")
    modalities: dict[int, list[str]] = {}
    for study_id, modality in rows("SELECT study_id, modality FROM series"):
        modalities.setdefault(study_id, []).append(modality)
    for sid, n_inst, n_series, mods, inst, series in rows(
            "SELECT t.id, t.number_of_instances, t.number_of_series, t.modalities_in_study, "
            "(SELECT count(*) FROM instance i JOIN series s ON s.id = i.series_id "
            " WHERE s.study_id = t.id), "
            "(SELECT count(*) FROM series s WHERE s.study_id = t.id) FROM study t"):
        if (n_inst, n_series) != (inst, series):
            errors.append(f"study {sid}: counts {n_inst} instances / {n_series} series, "
                          f"has {inst} / {series}")
        listed = mods.split("\\") if mods else []
        if len(listed) != len(set(listed)) or set(listed) != set(modalities.get(sid, [])):
            errors.append(f"study {sid}: ModalitiesInStudy {mods!r}, series have "
                          f"{sorted(set(modalities.get(sid, [])))}")
    for pid, n_st, n_se, n_in, st, se, inst in rows(
            "SELECT p.id, p.number_of_studies, p.number_of_series, p.number_of_instances, "
            "(SELECT count(*) FROM study t WHERE t.patient_id = p.id), "
            "(SELECT count(*) FROM series s JOIN study t ON t.id = s.study_id "
            " WHERE t.patient_id = p.id), "
            "(SELECT count(*) FROM instance i JOIN series s ON s.id = i.series_id "
            " JOIN study t ON t.id = s.study_id WHERE t.patient_id = p.id) FROM patient p"):
        if (n_st, n_se, n_in) != (st, se, inst):
            errors.append(f"patient {pid}: counts {n_st}/{n_se}/{n_in} studies/series/"
                          f"instances, has {st}/{se}/{inst}")
    # The index's totals (pacsd_totals, what /status shows) against a count of every row.
    kept = rows("SELECT patients, studies, series, instances, bytes FROM pacsd_totals")
    real = rows("SELECT (SELECT count(*) FROM patient), (SELECT count(*) FROM study), "
                "(SELECT count(*) FROM series), (SELECT count(*) FROM instance), "
                "(SELECT COALESCE(SUM(size), 0) FROM instance)")
    if [tuple(map(int, r)) for r in kept] != [tuple(map(int, r)) for r in real]:
        errors.append(f"totals: kept {kept}, counted {real}")
    return errors


# --- one process ------------------------------------------------------------------------------

def test_concurrent_adds_share_commits(index_url):
    index = Index(index_url).open()
    try:
        errors = []

        def worker(k: int) -> None:
            try:
                # Threads k and k + 4 share a series: 4 series in 2 studies, each series filled
                # by two threads at once.
                for n in range(25):
                    index.add(record(k * 100 + n, series=k % 4, study=1 + k % 2),
                              path=f"p/{k}/{n}", size=1, transfer_syntax=TS)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert not any(t.is_alive() for t in threads)
        counts = index.counts()
        assert (counts["instances"], counts["series"], counts["studies"],
                counts["patients"]) == (200, 4, 2, 1)
        assert counter_errors(index_rows) == []
        assert sorted(index_rows("SELECT number_of_instances FROM series")) == [(50,)] * 4
        # One writer, group commit: fewer transactions than adds.
        assert index.commits < 200
        assert index.retries == 0
        assert index.integrity_check() == "ok"
    finally:
        index.close()


def test_the_totals_follow_every_add_overwrite_delete_and_clear(index_url):
    """/status reads the index's totals from one row (not a count of ten million rows): the
    writer keeps it in step with new patients, studies, series and instances, duplicates (not
    counted), a replaced file's size, deletes at each level (and what they leave empty), and a
    clear."""
    index = Index(index_url).open()
    try:
        def totals() -> dict[str, int]:
            assert counter_errors(index_rows) == []
            return index.counts()

        assert totals() == dict(patients=0, studies=0, series=0, instances=0, bytes=0)
        # 2 patients, 3 studies, 4 series, 7 instances of 10..16 bytes.
        layout = [(1, 1, 1, 1), (1, 1, 1, 2), (1, 1, 2, 3), (1, 2, 1, 4), (2, 1, 1, 5),
                  (2, 1, 1, 6), (2, 1, 1, 7)]
        recs = {n: record(n, series=se, study=st, patient=pt) for pt, st, se, n in layout}
        for n, r in recs.items():
            assert not index.add(r, path=f"t/{n}", size=9 + n, transfer_syntax=TS).duplicate
        assert totals() == dict(patients=2, studies=3, series=4, instances=7, bytes=sum(
            range(10, 17)))
        # The same instance again: a duplicate, nothing counted; replaced: its new size.
        assert index.add(recs[1], path="t/1-again", size=99, transfer_syntax=TS).duplicate
        assert totals()["bytes"] == sum(range(10, 17))
        index.add(recs[1], path="t/1-new", size=110, transfer_syntax=TS, overwrite=True)
        assert totals() == dict(patients=2, studies=3, series=4, instances=7,
                                bytes=sum(range(10, 17)) + 100)
        # Deletes: an instance (its series stays), a series (its study stays), the last series
        # of a study (the study goes), a patient's last study (the patient goes).
        index.delete("IMAGE", [recs[2].values["sop_instance_uid"]])
        assert totals() == dict(patients=2, studies=3, series=4, instances=6,
                                bytes=sum(range(10, 17)) + 100 - 11)
        index.delete("SERIES", [recs[3].values["series_instance_uid"]])
        assert totals()["series"] == 3 and totals()["studies"] == 3
        index.delete("STUDY", [recs[4].values["study_instance_uid"]])
        assert totals()["studies"] == 2 and totals()["patients"] == 2
        index.delete("STUDY", [recs[5].values["study_instance_uid"]])
        assert totals() == dict(patients=1, studies=1, series=1, instances=1, bytes=110)
        index.clear()
        assert totals() == dict(patients=0, studies=0, series=0, instances=0, bytes=0)
    finally:
        index.close()


@contextmanager
def statements_run() -> Iterator[list[str]]:
    """What this thread's connection runs inside the block, one entry per statement.
    SQLite: its own trace callback (each statement's text). PostgreSQL: libpq's trace of the
    wire protocol, from which each statement's completion tag ("INSERT 0 1", "UPDATE 1"):
    psycopg runs a statement it has prepared without sending its text again, and the server
    answers every statement with one CommandComplete (or an ErrorResponse)."""
    seen: list[str] = []
    conn = database.connection()
    if isinstance(database.obj, SqliteDatabase):
        conn.set_trace_callback(seen.append)
        try:
            yield seen
        finally:
            conn.set_trace_callback(None)
        return
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield seen
        finally:
            conn.pgconn.untrace()   # flushes the trace
            trace.seek(0)
            for line in trace.read().decode(errors="replace").splitlines():
                # B <length> CommandComplete "UPDATE 1"  (B: from the server)
                parts = line.split("\t")
                if len(parts) >= 4 and parts[0] == "B" and parts[2] in ("CommandComplete",
                                                                         "ErrorResponse"):
                    seen.append(parts[3].strip().strip('"') if parts[2] == "CommandComplete"
                                else "ERROR " + parts[3])


def test_an_instance_of_a_known_series_costs_few_statements(index_url):
    index = Index(index_url).open(writer=False)
    try:
        index.add(record(1), path="a", size=1, transfer_syntax=TS)
        with database.connection_context(), statements_run() as statements:
            index.add(record(2), path="b", size=1, transfer_syntax=TS)
        assert statements, "nothing was traced"
        work = [s for s in statements
                if s.split()[0].upper() not in ("BEGIN", "SAVEPOINT", "RELEASE", "COMMIT")]
        # duplicate check, insert, three counter updates, the index's totals, the study's last
        # activity (for the study-stable hooks and routes); the counters, the totals and the
        # activity are per batch
        assert len(work) <= 7, work
        with database.connection_context():
            assert Series.get().number_of_instances == 2
            assert (Study.get().number_of_instances, Study.get().number_of_series) == (2, 1)
            assert Patient.get().number_of_instances == 2
    finally:
        index.close()


def test_duplicate_is_reported_not_added(index_url):
    index = Index(index_url).open()
    try:
        first = index.add(record(1), path="a", size=1, transfer_syntax=TS)
        again = index.add(record(1), path="b", size=1, transfer_syntax=TS)
        same_file = index.add(record(1), path="a", size=1, transfer_syntax=TS)
        assert (first.duplicate, again.duplicate, same_file.duplicate) == (False, True, False)
        assert index.counts()["instances"] == 1
        assert index_rows("SELECT path FROM instance") == [("a",)]
        assert counter_errors(index_rows) == []
    finally:
        index.close()


# --- another process: another node -----------------------------------------------------------

PEER = r"""
import json, sys, traceback
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, sys.argv[3])
from data import ct_slice
from pacsd.imaging.header import check_and_extract
from pacsd.index import Index

index = Index(sys.argv[1], node=sys.argv[2]).open()
prepared = []

def run(cmd):
    global prepared
    op = cmd["op"]
    if op == "lease":
        return index.lease(cmd["name"], cmd["seconds"])
    if op == "release":
        return index.release(cmd["name"])
    if op == "holder":
        return index.lease_holder(cmd["name"])
    if op == "prepare":   # build the records beforehand, so that "add" starts at once
        prepared = [(check_and_extract(ct_slice(seed=21, patient=p, study=st, series=se,
                                                number=n, size=2, modality=mod)), path)
                    for p, st, se, n, mod, path in cmd["items"]]
        return len(prepared)
    if op == "add":   # from 8 threads, as 8 associations would: the writer groups them
        def add(item):
            rec, path = item
            added = index.add(rec, path=path, size=1, transfer_syntax="1.2.840.10008.1.2.1")
            return rec.values["sop_instance_uid"], added.duplicate
        with ThreadPoolExecutor(8) as pool:
            duplicate = dict(pool.map(add, prepared))
        return {"duplicate": duplicate, "commits": index.commits, "retries": index.retries}
    raise ValueError(op)

print(json.dumps({"ok": "ready"}), flush=True)
for line in sys.stdin:
    try:
        print(json.dumps({"ok": run(json.loads(line))}), flush=True)
    except Exception:
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
if not index.close():
    sys.exit(1)
"""


class Peer:
    """Another node: an Index of its own in a subprocess, driven by JSON lines."""

    def __init__(self, url: str, node: str, folder: Path) -> None:
        self.node = node
        self.stderr_path = folder / f"peer-{node}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", PEER, url, node, str(TESTS)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True)
        assert self.answer() == "ready"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-5000:]

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 60) -> Any:
        assert self.proc.stdout is not None
        # One line per command, so nothing waits in the text buffer while select() says no.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"{self.node}: no answer within {timeout} s\n{self.stderr()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"{self.node} exited {self.proc.returncode}\n{self.stderr()}")
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError(f"{self.node}: {reply['error']}")
        return reply["ok"]

    def ask(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        return self.answer()

    def close(self) -> int:
        """End of input: the peer closes its Index (flushing its writer) and exits."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@contextmanager
def peers(url: str, folder: Path, *nodes: str) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    try:
        for node in nodes:
            started.append(Peer(url, node, folder))
        yield started
    finally:
        codes = [p.close() for p in started]
    assert codes == [0] * len(started), [p.stderr() for p in started]


def test_two_nodes_add_the_same_instances_at_once(postgres_url, tmp_path):
    # PostgreSQL only: an SQLite index is one node's (a second process's write transaction
    # that began with a read fails at once with SQLITE_BUSY, whatever the busy timeout).
    #
    # 5 new patients x 2 studies, each study with one series of 5 instances that both nodes
    # receive (50 SOP Instance UIDs), 1 instance more of that series and a new series of its
    # own (MR on node a, US on node b: ModalitiesInStudy merges) that only one node receives.
    # Every other shared instance comes in the same file name on both nodes (a file both
    # indexed: stored once, by either), the others under each node's own name (one of them
    # is the duplicate). Node b receives everything in the opposite order.
    shared = [(p, st, 1, n) for p in range(1, 6) for st in (1, 2) for n in range(1, 6)]
    shared_uid = [uid(SEED, p, st, se, n, "sop") for p, st, se, n in shared]

    def items(node: str, number: int, series: int, modality: str) -> list[list]:
        out: list[list] = []
        for i, (p, st, se, n) in enumerate(shared):
            out.append([p, st, se, n, "CT", f"shared/{i}" if i % 2 == 0 else f"{node}/{i}"])
            if n == 5:   # the study's last shared instance: this node's own ones
                out.append([p, st, 1, number, "CT", f"{node}/{p}-{st}-{number}"])
                out.append([p, st, series, 1, modality, f"{node}/{p}-{st}-{series}"])
        return out

    with peers(postgres_url, tmp_path, "node-a", "node-b") as (a, b):
        assert a.ask("prepare", items=items("node-a", 100, 2, "MR")) == 70
        assert b.ask("prepare", items=items("node-b", 200, 3, "US")[::-1]) == 70
        a.send("add")
        b.send("add")
        got_a, got_b = a.answer(), b.answer()
    for peer in (a, b):
        assert "Traceback" not in peer.stderr() and "failed" not in peer.stderr(), \
            peer.stderr()

    rows = pg_rows(postgres_url)
    paths = dict(rows("SELECT sop_instance_uid, path FROM instance"))
    assert len(paths) == 50 + 4 * 10 == rows("SELECT count(*) FROM instance")[0][0]
    for i, sop in enumerate(shared_uid):
        dup_a, dup_b = got_a["duplicate"][sop], got_b["duplicate"][sop]
        if i % 2 == 0:   # the same file: indexed once, and neither node is told to drop it
            assert (dup_a, dup_b, paths[sop]) == (False, False, f"shared/{i}"), i
        else:   # one node's file wins; the other is told it holds a duplicate
            assert dup_a != dup_b, (i, dup_a, dup_b)
            assert paths[sop] == (f"node-b/{i}" if dup_a else f"node-a/{i}"), i
    # They did run at the same moment: each node's file won some of the races.
    won_by_a = sum(1 for i, sop in enumerate(shared_uid) if i % 2 and not got_a["duplicate"][sop])
    assert 0 < won_by_a < 25, won_by_a
    own = [u for u in {**got_a["duplicate"], **got_b["duplicate"]} if u not in shared_uid]
    assert len(own) == 40
    assert not any({**got_a["duplicate"], **got_b["duplicate"]}[u] for u in own)
    assert rows("SELECT count(*) FROM patient")[0][0] == 5
    assert rows("SELECT count(*) FROM study")[0][0] == 10
    assert rows("SELECT count(*) FROM series")[0][0] == 30
    assert {frozenset(m.split("\\")) for (m,) in rows("SELECT modalities_in_study FROM study")} \
        == {frozenset({"CT", "MR", "US"})}
    assert counter_errors(rows) == []
    # Group commit on both nodes. (A batch that met the other node's in a deadlock, which the
    # opposite orders make likely but not certain, ran again: got_*["retries"].)
    assert got_a["commits"] < 70 and got_b["commits"] < 70, (got_a, got_b)


LEASE_S = 1.0


def test_a_lease_passes_only_once_expired_or_released(index_url, tmp_path):
    a = Index(index_url, node="node-a").open()
    try:
        with peers(index_url, tmp_path, "node-b") as (b,):
            assert a.lease("sweep", 60)
            assert not b.ask("lease", name="sweep", seconds=60)
            assert b.ask("holder", name="sweep") == a.lease_holder("sweep") == "node-a"
            renewing = time.monotonic()
            assert a.lease("sweep", LEASE_S)   # the holder renews, for a second only
            # b polls: it gets the lease once a's has expired by the database's clock, not
            # before, and its failed tries neither extend nor take a's lease.
            tries = 0
            while not b.ask("lease", name="sweep", seconds=60):
                tries += 1
                assert time.monotonic() - renewing < LEASE_S + 10, "the lease never expired"
                if tries == 1:
                    assert a.lease_holder("sweep") == "node-a"
                time.sleep(0.05)
            assert time.monotonic() - renewing >= LEASE_S - 0.01
            assert a.lease_holder("sweep") == "node-b"
            assert not a.lease("sweep", LEASE_S)
            a.release("sweep")   # not a's: nothing happens
            assert b.ask("holder", name="sweep") == "node-b"
            # Released: free at once, not in a minute.
            b.ask("release", name="sweep")
            assert a.lease_holder("sweep") is None
            assert a.lease("sweep", 60)
            assert not b.ask("lease", name="sweep", seconds=60)
    finally:
        a.close()


# --- a batch run again (PostgreSQL: row locks, a server that can drop us) ----------------------

def wait_for_lock_wait(url: str, timeout: float = 30) -> int:
    """The pid of pacsd's backend once it waits for a row lock."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                               "current_database() AND application_name = 'pacsd' AND "
                               "wait_event_type = 'Lock'").fetchone()
            if row is not None:
                return row[0]
            time.sleep(0.01)
    raise AssertionError(f"the index writer did not wait for a lock within {timeout} s")


def hold(conn: psycopg.Connection, study_id: int) -> None:
    """Lock a study row as a counter update does (FOR NO KEY UPDATE: rows that reference the
    study can still be inserted)."""
    conn.execute("UPDATE study SET number_of_series = number_of_series WHERE id = %s",
                 (study_id,))


def test_a_batch_that_meets_a_deadlock_is_run_again(postgres_url, postgres_server):
    # The writer's session checks for a deadlock 2 s after it begins to wait (the server's
    # default is 1 s): time enough for `other` to close the cycle on a busy machine.
    database_name = postgres_url.rsplit("/", 1)[1]
    with postgres_server.admin() as admin:
        admin.execute(f"ALTER DATABASE {database_name} SET deadlock_timeout = '2s'")
    index = Index(postgres_url, node="node-a").open()
    try:
        index.add(record(1, study=1), path="1/1", size=1, transfer_syntax=TS)
        index.add(record(1, study=2), path="2/1", size=1, transfer_syntax=TS)
        s1, s2 = [r[0] for r in index_rows("SELECT id FROM study ORDER BY id")]
        with psycopg.connect(postgres_url, connect_timeout=10) as other:
            other.execute("SET statement_timeout = 30000")
            hold(other, s2)
            done: dict[str, Any] = {}
            # One transaction that updates the counters of study 1, then of study 2 (id order).
            t = threading.Thread(target=lambda: done.update(n=index.add_many([
                (record(2, study=1), "1/2", 1, TS), (record(2, study=2), "2/2", 1, TS)])))
            t.start()
            wait_for_lock_wait(postgres_url)   # the writer holds study 1, waits for study 2
            # Close the cycle. The writer has waited longer, so its deadlock check finds it
            # first: PostgreSQL aborts the writer's transaction, and this statement goes
            # through.
            hold(other, s1)
            other.commit()
            t.join(30)
        assert done == {"n": 2}
        assert index.retries == 1
        assert index.counts()["instances"] == 4
        assert sorted(index_rows("SELECT number_of_instances FROM study")) == [(2,), (2,)]
        assert counter_errors(index_rows) == []
    finally:
        index.close()


def test_a_batch_that_loses_its_connection_is_run_again(postgres_url, postgres_server):
    index = Index(postgres_url, node="node-a").open()
    try:
        index.add(record(1), path="1", size=1, transfer_syntax=TS)
        (study_id,), = index_rows("SELECT id FROM study")
        with psycopg.connect(postgres_url, connect_timeout=10) as other:
            hold(other, study_id)
            done: dict[str, Any] = {}
            t = threading.Thread(target=lambda: done.update(added=index.add(
                record(2), path="2", size=1, transfer_syntax=TS)))
            t.start()
            pid = wait_for_lock_wait(postgres_url)
            with postgres_server.admin() as admin:   # as a server restart or failover would
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            other.commit()
            t.join(30)
        assert done["added"].duplicate is False
        assert index.retries == 1
        assert index.counts()["instances"] == 2
        assert counter_errors(index_rows) == []
    finally:
        index.close()
