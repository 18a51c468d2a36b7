"""Crash durability: `pacsd serve` SIGKILLed again and again under a concurrent C-STORE storm.

The promise under test: C-STORE answers Success only once the file and its index row are
durable. So whatever the moment of the kill, after a restart every acknowledged instance is
indexed, its file exists and holds exactly the bytes that were sent, and it can be retrieved;
the index is sound, rows and files match one to one (files written but not indexed before the
kill are recovered at start), and no temporary file is left behind.

Clients behave like a modality's store-and-forward queue: an instance not acknowledged (the
association aborted or was refused) is sent again once the server is back, so some resends
arrive as duplicates of instances that were stored but not acknowledged.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Process, write_config
from data import write_series
from pynetdicom import _config
from reliability.storm import (
    Storm,
    assert_archive_sound,
    assert_indexed,
    assert_retrievable,
    sop_of,
    start,
    wait_for,
)

ROUNDS = 5            # SIGKILLs
CLIENTS = 4           # concurrent associations, one thread each
IMAGES = 48           # per client (one series each), 64x64 pixels
DEADLINE = 50.0       # seconds for the whole storm, restarts included


@pytest.mark.timeout(120)
def test_sigkill_during_store_storm_loses_nothing_acknowledged(tmp_path: Path):
    _config.STORE_SEND_CHUNKED_DATASET = True   # send the files' bytes as they are
    seed = int(os.environ.get("PACSD_STORM_SEED", time.time_ns() % 1_000_000))
    print(f"PACSD_STORM_SEED={seed}")   # shown on failure: rerun with the same kill points
    rng = random.Random(seed)
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data)
    log = tmp_path / "serve.log"

    # One patient/study/series per client, so that a C-GET per study checks each client.
    sent: dict[int, list[tuple[str, Path]]] = {}
    for c in range(CLIENTS):
        paths = write_series(tmp_path / f"src{c}", seed=100 + c, images=IMAGES, size=64)
        sent[c] = [(sop_of(p), p) for p in paths]
    by_sop = {sop: p for files in sent.values() for sop, p in files}
    assert len(by_sop) == CLIENTS * IMAGES

    storm = Storm(DEADLINE)
    threads = storm.start_clients(sent)
    proc: Process | None = None
    kills = []
    try:
        acked_at_kill: set[str] = set()
        for rnd in range(ROUNDS):
            proc = start(config, data, log)
            # Recovery is done once the server is ready: what the killed run acknowledged is
            # indexed and on disk before anyone sends again.
            assert_indexed(data, acked_at_kill)
            storm.port = proc.port
            before = storm.ack_count()
            target = before + rng.randint(8, 30)
            assert wait_for(lambda: storm.ack_count() >= target
                            or not any(t.is_alive() for t in threads),
                            storm.deadline - time.monotonic()), "storm made no progress"
            time.sleep(rng.uniform(0, 0.1))   # a random moment, stores in flight
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
            storm.port = 0
            with storm.lock:
                acked_at_kill = set(storm.acked)
            kills.append(len(acked_at_kill) - before)
            # An unclean stop leaves pacsd.json behind: the next start recovers.
            assert (data / "pacsd.json").exists()

        # The last life: let every client finish.
        proc = start(config, data, log)
        assert_indexed(data, acked_at_kill)
        storm.port = proc.port
        for t in threads:
            t.join(max(0.0, storm.deadline - time.monotonic()))
        storm.stop.set()
        assert not any(t.is_alive() for t in threads), "clients did not finish in time"
        assert not storm.errors, storm.errors
        assert storm.bad_status == [], f"unexpected C-STORE statuses: {storm.bad_status[:5]}"
        assert storm.aborted >= 1, "no store was interrupted: the kills hit nothing in flight"
        acked = dict(storm.acked)
        assert set(acked) == set(by_sop), "the surviving server did not store everything"

        # Retrievable, byte for byte, through the server that survived.
        assert_retrievable(proc.port, sent)

        # A clean stop now: exit 0 and the run files gone.
        assert proc.stop() == 0, proc.output()
        assert not (data / "pacsd.json").exists()
        proc = None
    finally:
        storm.stop.set()
        if proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)

    text = log.read_text()
    assert text.count("did not stop cleanly") == ROUNDS, text[-3000:]

    # The files and the index, read directly.
    assert_archive_sound(data, acked, set(by_sop))
    recovered = sum(int(m) for m in re.findall(r"recovered (\d+) stored file", text))
    tmp_removed = sum(int(m) for m in re.findall(r"removed (\d+) unfinished", text))
    print(f"storm: {storm.attempts} C-STOREs, {storm.aborted} interrupted, acks per life "
          f"before the kill: {kills}; recovered {recovered} unindexed file(s), removed "
          f"{tmp_removed} temporary file(s), {text.count('duplicate SOP Instance')} duplicate(s)")


@pytest.mark.timeout(60)
def test_second_copy_left_by_a_kill_is_settled_at_restart(tmp_path: Path):
    """A kill between writing a duplicate's file and deleting it (Archive.put: the index said
    "already stored") leaves a second copy of an indexed instance. The next start must not keep
    a file that no row points at: the indexed copy stays, the stray one goes."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    data = tmp_path / "pacsd"
    config = write_config(tmp_path / "pacsd.toml", data)
    log = tmp_path / "serve.log"
    paths = write_series(tmp_path / "src", seed=9, images=3, size=32)
    from conftest import store_files
    proc = start(config, data, log)
    try:
        assert store_files(proc.port, paths) == [0, 0, 0]
    finally:
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
    storage = data / "storage"
    first = sorted(storage.rglob("*.dcm"))[0]
    stray = first.with_name("0" * 32 + ".dcm")   # what the killed server would have left
    stray.write_bytes(first.read_bytes())

    proc = start(config, data, log)
    try:
        on_disk = {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")}
    finally:
        assert proc.stop() == 0
    db = sqlite3.connect(data / "index.sqlite3")
    try:
        indexed = {p for (p,) in db.execute("SELECT path FROM instance")}
    finally:
        db.close()
    assert len(indexed) == 3
    assert on_disk == indexed, f"files without a row: {on_disk - indexed}"
    assert first.is_file()
