"""Kill storm of the DICOM workers: with `[dicom] workers = 2`, the worker processes (not the
server's own process, their supervisor) are SIGKILLed at random moments under concurrent C-STORE
clients (tests/reliability/storm.py); scaled by PACSD_SOAK_SCALE (report.py).

After each kill the supervisor starts another worker (pacsd.daemon.workers: at once, or after a
pause if workers keep dying young), the server goes on accepting, and every instance
acknowledged so far is indexed with the very bytes that were sent, while it runs. The log has
one "ended unexpectedly" line per kill. Stopped with SIGTERM the server exits 0 but keeps its
pidfile (a worker died: the run was not clean), so the next start checks the files the killed
workers may have left (stored, not committed); after it, the archive holds exactly what was sent,
byte for byte, and nothing temporary.

And the other way round: the supervisor SIGKILLed while its workers store. They stop on their
own within seconds (their pipe to it closes), a new `pacsd serve` on the same data folder waits
for the lock they hold, recovers, and every instance acknowledged (also those the workers
answered after their supervisor died) is there.

Processes are seen through Linux's /proc: a worker is a descendant of the server holding its
DICOM listening socket.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import peer_missing, write_config
from data import write_series
from pynetdicom import _config
from reliability.report import record, scaled
from reliability.storm import (
    Storm,
    age,
    alive,
    assert_archive_sound,
    assert_indexed,
    assert_retrievable,
    descendants,
    ended,
    dicom_workers,
    holders,
    indexed_rows,
    launch,
    lost,
    sop_of,
    start,
    wait_for,
)

from pacsd.daemon.workers import EARLY_DEATH_S, MAX_PAUSE_S


@pytest.fixture(autouse=True)
def _proc() -> None:
    if not Path("/proc/self/stat").exists():
        peer_missing("processes are followed through Linux's /proc, which is missing")


WORKERS = 2
KILLS = scaled(12)
CLIENTS = scaled(4)        # concurrent associations, one thread each
IMAGES = scaled(100)       # per client (one series each), 64x64 pixels; ~20 used per kill
# Seconds for the whole storm: a bound, not a target. Kills wait for workers to age (see
# `victims`), which makes about 12 kills a minute however fast the machine is.
DEADLINE = 240.0 * max(1.0, KILLS / 12)
RESTART_S = 15.0           # from a worker's death (and the supervisor's pause) to its successor
AFTER_KILL = 3             # acknowledgements the server must give after each kill
# A worker killed younger than EARLY_DEATH_S is restarted after a pause that doubles with each
# such death in a row (pacsd.daemon.workers._watch). The killer knows a worker's age from /proc
# (its fork), the supervisor from a moment after: only workers clearly on one side are killed.
YOUNG_S = EARLY_DEATH_S - 2.0
OLD_S = EARLY_DEATH_S + 1.0
MAX_YOUNG_IN_A_ROW = 2     # pauses of 1 s then 2 s; then an old worker is waited for
ORPHAN_EXIT_S = 10.0       # a killed supervisor's workers stop within this (a start waits 15 s)


def pause_after(young_in_a_row: int) -> float:
    """The supervisor's pause before restarting, after this many young deaths in a row."""
    return min(MAX_PAUSE_S, 2.0 ** (young_in_a_row - 1)) if young_in_a_row else 0.0


def victims(workers: set[int], young_in_a_row: int) -> dict[int, bool]:
    """The workers that may be killed now, each with whether it dies young."""
    out = {}
    for pid in workers:
        a = age(pid)
        if a >= OLD_S:
            out[pid] = False
        elif a <= YOUNG_S and young_in_a_row < MAX_YOUNG_IN_A_ROW:
            out[pid] = True
    return out


def series(tmp_path: Path, seed: int) -> dict[int, list[tuple[str, Path]]]:
    sent = {}
    for c in range(CLIENTS):
        paths = write_series(tmp_path / f"src{c}", seed=seed + c, images=IMAGES, size=64)
        sent[c] = [(sop_of(p), p) for p in paths]
    return sent


def config(tmp_path: Path, data: Path) -> Path:
    # No per-host cap: the storm's clients, all on this host, stand for many modalities.
    return write_config(tmp_path / "pacsd.toml", data,
                        dicom={"workers": WORKERS, "max_associations_per_host": 0})


@pytest.mark.timeout(120 + 2 * DEADLINE)
def test_killed_workers_are_replaced_and_lose_nothing_acknowledged(tmp_path: Path):
    _config.STORE_SEND_CHUNKED_DATASET = True   # send the files' bytes as they are
    seed = int(os.environ.get("PACSD_STORM_SEED", time.time_ns() % 1_000_000))
    print(f"PACSD_STORM_SEED={seed}")   # shown on failure: rerun with the same choices
    rng = random.Random(seed)
    data = tmp_path / "pacsd"
    log = tmp_path / "serve.log"
    cfg = config(tmp_path, data)
    sent = series(tmp_path, 400)
    by_sop = {sop: p for files in sent.values() for sop, p in files}

    storm = Storm(DEADLINE)
    threads = storm.start_clients(sent)
    proc = start(cfg, data, log)
    server = proc.proc.pid
    killed: list[int] = []
    restarts: list[tuple[float, float]] = []   # (pause expected, seconds to the new worker)
    young_in_a_row = 0
    try:
        workers = wait_for_workers(server, proc.port, set(), 30)
        seen = set(workers)
        storm.port = proc.port
        for kill in range(KILLS):
            # Wait (clients held) until some worker may be killed, then let the clients run
            # and pick a random moment: now and then at once, mostly with stores in flight.
            for _ in range(5):   # a worker may age past YOUNG_S while the moment comes
                storm.hold()
                assert wait_for(lambda: victims(workers, young_in_a_row),
                                OLD_S + 5), f"kill {kill}: no worker to kill among {workers}"
                storm.resume()
                target = storm.ack_count() + (0 if rng.random() < 0.2 else rng.randint(2, 10))
                assert wait_for(lambda t=target: storm.ack_count() >= t, 60), \
                    f"kill {kill}: the storm made no progress"
                time.sleep(rng.uniform(0, 0.05))
                now = victims(workers, young_in_a_row)
                if now:
                    break
            else:
                pytest.fail(f"kill {kill}: no moment to kill a worker of {workers}")
            assert any(t.is_alive() for t in threads), \
                f"kill {kill}: the clients ran out of files before it (raise IMAGES)"
            victim = rng.choice(sorted(now))
            young_in_a_row = young_in_a_row + 1 if now[victim] else 0
            at_kill = storm.ack_count()
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

            # The server goes on accepting (the other worker at once, the new one later) ...
            assert wait_for(lambda: storm.ack_count() >= at_kill + AFTER_KILL, 60), \
                f"kill {kill}: no C-STORE acknowledged after worker {victim} was killed"
            storm.hold()
            # ... and the supervisor starts another worker, after the pause it owes.
            pause = pause_after(young_in_a_row)
            workers = wait_for_workers(server, proc.port, seen, pause + RESTART_S,
                                       f"kill {kill}: no worker replaced {victim}")
            took = time.monotonic() - killed_at
            restarts.append((pause, took))
            assert victim not in workers and not alive(victim)
            assert took >= pause - 0.05, \
                f"kill {kill}: restarted after {took:.2f} s, before the {pause:.0f} s pause"
            seen |= workers
            assert proc.proc.poll() is None, "the supervisor died with its worker"
            # Acknowledged means indexed: nothing waits for the next start.
            with storm.lock:
                acked_now = dict(storm.acked)
            assert_indexed(data, set(acked_now))
            assert lost(data, acked_now) == set(), f"kill {kill}: acknowledged data lost"

        storm.resume()
        acked = ended(storm, threads)
        assert set(acked) == set(by_sop), \
            f"the server did not store everything: {len(acked)} of {len(by_sop)}"
        # Checked while it runs, with its workers replaced: rows, files, bytes, C-GET.
        workers = wait_for_workers(server, proc.port, set(), 5)
        assert holders(str(data / "pacsd.lock"), workers) == workers, \
            "a restarted worker does not hold the data folder's lock"
        assert lost(data, acked) == set()
        assert_retrievable(proc.port, sent)
        assert proc.stop() == 0, proc.output()
        proc = None
    finally:
        storm.stop.set()
        storm.resume()
        if proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)

    text = log.read_text()
    for pid in killed:
        lines = re.findall(rf"DICOM worker \d+ \(pid {pid}\) ended unexpectedly "
                           r"\(killed by signal 9\)", text)
        assert len(lines) == 1, f"worker {pid}: {len(lines)} 'ended unexpectedly' line(s)"
    assert text.count("ended unexpectedly") == KILLS, text[-3000:]
    # A worker died: the run was not clean, whatever its stop. The pidfile says so to the next
    # start, which checks the files the killed workers may have stored but not committed.
    assert (data / "pacsd.pid").exists(), "pidfile removed after a run whose workers died"
    assert "did not stop cleanly" not in text
    proc = start(cfg, data, log)
    try:
        assert lost(data, acked) == set()
    finally:
        assert proc.stop() == 0, proc.output()
    text = log.read_text()
    assert text.count("did not stop cleanly") == 1, text[-3000:]
    assert not (data / "pacsd.pid").exists(), "a clean run kept its pidfile"
    # Beyond what was acknowledged (here: everything sent), only what was sent may be indexed.
    extra = set(indexed_rows(data)) - set(acked)
    assert extra <= set(by_sop), f"{len(extra)} instance(s) indexed that nobody sent"
    assert_archive_sound(data, acked, set(acked) | extra)

    record("kill_workers", associations=storm.associations, stored=len(acked), kills=KILLS,
           lost=0)
    recovered = sum(int(m) for m in re.findall(r"recovered (\d+) stored file", text))
    copies = sum(int(m) for m in re.findall(r"removed (\d+) second cop", text))
    tmp_removed = sum(int(m) for m in re.findall(r"removed (\d+) unfinished", text))
    print(f"worker kill storm: {KILLS} kills ({sum(1 for p, _ in restarts if p)} young), "
          f"{storm.associations} associations, {storm.attempts} C-STOREs, {storm.aborted} "
          f"interrupted, {len(acked)} stored; restarts (pause, s): "
          f"{[(p, round(t, 2)) for p, t in restarts]}; at the next start: recovered "
          f"{recovered} file(s), removed {copies} second copy(ies) and {tmp_removed} "
          f"temporary file(s); {text.count('duplicate SOP Instance')} duplicate(s)")


def wait_for_workers(server: int, port: int, seen: set[int], timeout: float,
                     what: str = "the DICOM workers did not start") -> set[int]:
    """The server's WORKERS workers, once they are all running and one is new (not in
    `seen`; any, if `seen` is empty)."""
    found: set[int] = set()

    def ready() -> bool:
        nonlocal found
        found = dicom_workers(server, port)
        return len(found) == WORKERS and (not seen or bool(found - seen))

    assert wait_for(ready, timeout), f"{what} within {timeout:.0f} s: {sorted(found)}"
    return found


def runfile_pid(data: Path) -> int | None:
    """The pid in DATA/pacsd.json, written once a server is ready."""
    try:
        return int(json.loads((data / "pacsd.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.timeout(240)
def test_workers_of_a_killed_server_stop_and_a_new_one_recovers(tmp_path: Path):
    _config.STORE_SEND_CHUNKED_DATASET = True
    rng = random.Random(int(os.environ.get("PACSD_STORM_SEED", time.time_ns() % 1_000_000)))
    data = tmp_path / "pacsd"
    log = tmp_path / "serve.log"
    cfg = config(tmp_path, data)
    sent = series(tmp_path, 500)
    by_sop = {sop: p for files in sent.values() for sop, p in files}
    lock = str(data / "pacsd.lock")

    storm = Storm(180)
    threads = storm.start_clients(sent)
    proc = start(cfg, data, log)
    new = None
    try:
        workers = wait_for_workers(proc.proc.pid, proc.port, set(), 30)
        old = descendants(proc.proc.pid)   # the workers, and whatever else it started
        assert workers <= old
        assert holders(lock, workers) == workers, "a worker does not hold the data folder's lock"
        storm.port = proc.port
        assert wait_for(lambda: storm.ack_count() >= 20, 60), "the storm made no progress"
        time.sleep(rng.uniform(0, 0.05))
        storm.port = 0   # who is cut off retries once the next server is up
        at_kill = storm.ack_count()
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
        killed_at = time.monotonic()
        held = holders(lock)   # whose lock a new start must wait for

        new = launch(cfg, data, log)
        # The killed server's processes stop on their own; the new one is not ready before.
        early: set[int] = set()

        def gone() -> bool:
            running = {p for p in old if alive(p)}
            if running and runfile_pid(data) == new.proc.pid:
                early.update(running)
            return not running

        assert wait_for(gone, ORPHAN_EXIT_S), \
            f"the killed server's processes {sorted(p for p in old if alive(p))} still run " \
            f"{ORPHAN_EXIT_S:.0f} s later"
        stopped_after = time.monotonic() - killed_at
        assert not early, f"a new server started while {sorted(early)} still ran"
        new.wait_ready(timeout=40)
        ready_after = time.monotonic() - killed_at
        assert holders(lock) <= {new.proc.pid} | descendants(new.proc.pid), \
            "a process of the killed server still holds the data folder"
        with storm.lock:
            acked_before_restart = dict(storm.acked)
        # Acknowledged before or after the supervisor died: recovered or committed, all there.
        assert_indexed(data, set(acked_before_restart))
        assert lost(data, acked_before_restart) == set(), "acknowledged data lost"

        storm.port = new.port
        acked = ended(storm, threads, interrupted=False)
        assert set(acked) == set(by_sop)
        assert lost(data, acked) == set()
        assert_retrievable(new.port, sent)
        assert new.stop() == 0, new.output()
        new = None
    finally:
        storm.stop.set()
        for p in (proc, new):
            if p is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(10)

    text = log.read_text()
    assert text.count("did not stop cleanly") == 1, text[-3000:]
    assert "ended unexpectedly" not in text   # the new server's workers all lived
    assert not (data / "pacsd.pid").exists()
    extra = set(indexed_rows(data)) - set(acked)
    assert extra <= set(by_sop)
    assert_archive_sound(data, acked, set(acked) | extra)
    after = len(acked_before_restart) - at_kill
    print(f"supervisor killed after {at_kill} acknowledgements; {after} more acknowledged by "
          f"its workers after it died; lock held by {sorted(held)} at the "
          f"kill; its processes gone {stopped_after:.2f} s after, the new server ready "
          f"{ready_after:.2f} s after; {storm.aborted} interrupted, {len(acked)} stored")
