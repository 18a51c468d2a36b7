"""Kill storm: `pacsd serve`, its process and its DICOM workers at once, SIGKILLed at random
moments (as a crash would), again and again, under concurrent C-STORE clients
(tests/reliability/storm.py); scaled by PACSD_SOAK_SCALE (report.py). The workers alone, and
the server's process alone: tests/reliability/test_kill_workers.py.

After each restart, before anyone sends again: every instance acknowledged so far is indexed,
its file exists and holds the very bytes that were sent, and the index passes integrity_check.
Now and then, while the server is dead, an orphan (a complete stored file with no index row, as
a kill between rename and commit leaves) and a temporary file (a write cut short) are planted:
the next start indexes the orphan and removes the temporary file. At the end the whole archive
is checked with the server stopped: exactly the acknowledged instances plus the orphans, byte
for byte, rows and files one to one, nothing temporary left.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import Process, write_config
from data import write_series
from pynetdicom import _config
from reliability.report import PeakMemory, record, scaled
from reliability.storm import (
    Storm,
    assert_archive_sound,
    assert_indexed,
    assert_retrievable,
    ended,
    indexed_rows,
    kill_tree,
    lost,
    sop_of,
    start,
    wait_for,
)

KILLS = scaled(20)
CLIENTS = scaled(4)        # concurrent associations, one thread each
IMAGES = scaled(60)        # per client (one series each), 64x64 pixels
# Seconds for the whole storm, restarts included: a bound, not a target (a quiet run takes a
# fraction of it; with six other test runs on the two cores, 100 s was not enough).
DEADLINE = 240.0 * max(1.0, KILLS / 20)
PLANT_EVERY = 7            # plant an orphan and a temporary file before every 7th restart


def plant(storage: Path, source: Path) -> tuple[str, Path]:
    """What a kill can leave: `source` as a stored file without a row (named and placed as
    a Store's NewFile does), and an unfinished temporary file. Returns (orphan's path, temp file)."""
    name = secrets.token_hex(16)
    rel = time.strftime("%Y/%m/%d/") + f"{name[:2]}/{name}.dcm"
    (storage / rel).parent.mkdir(parents=True, exist_ok=True)
    (storage / rel).write_bytes(source.read_bytes())
    tmp = storage / ".tmp" / f"{secrets.token_hex(16)}.dcm.part"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(source.read_bytes()[:3000])   # cut short
    return rel, tmp


def integrity(data: Path) -> str:
    db = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


@pytest.mark.timeout(60 + 2 * DEADLINE)
def test_kill_storm_loses_nothing_acknowledged(tmp_path: Path):
    _config.STORE_SEND_CHUNKED_DATASET = True   # send the files' bytes as they are
    seed = int(os.environ.get("PACSD_STORM_SEED", time.time_ns() % 1_000_000))
    print(f"PACSD_STORM_SEED={seed}")   # shown on failure: rerun with the same kill points
    rng = random.Random(seed)
    data = tmp_path / "pacsd"
    # No per-host cap: the storm's clients, all on this host, stand for many modalities (at
    # soak scale there are more of them than [dicom] max_associations_per_host).
    config = write_config(tmp_path / "pacsd.toml", data, dicom={"max_associations_per_host": 0})
    log = tmp_path / "serve.log"
    storage = data / "storage"

    sent: dict[int, list[tuple[str, Path]]] = {}
    for c in range(CLIENTS):
        paths = write_series(tmp_path / f"src{c}", seed=200 + c, images=IMAGES, size=64)
        sent[c] = [(sop_of(p), p) for p in paths]
    by_sop = {sop: p for files in sent.values() for sop, p in files}
    orphans: dict[str, Path] = {}   # SOP Instance UID -> the planted file's source

    storm = Storm(DEADLINE)
    threads = storm.start_clients(sent)
    proc: Process | None = None
    peak = 0.0
    per_life: list[int] = []
    planted: tuple[str, str, Path] | None = None   # (SOP, rel, temp file) awaiting a restart
    try:
        acked_at_kill: dict[str, Path] = {}
        for life in range(KILLS + 1):
            proc = start(config, data, log)
            # Recovery is done once the server is ready, before anyone sends again.
            assert_indexed(data, set(acked_at_kill))
            assert lost(data, acked_at_kill) == set(), f"life {life}: acknowledged data lost"
            assert integrity(data) == "ok", f"life {life}: the index is damaged"
            if planted:
                sop, rel, tmp = planted
                assert indexed_rows(data).get(sop) == rel, "the orphan was not indexed"
                assert not tmp.exists(), "the temporary file was not removed at start"
                planted = None
            with PeakMemory(proc.proc.pid) as mem:
                storm.port = proc.port
                if life == KILLS:   # the last life: let every client finish
                    for t in threads:
                        t.join(max(0.0, storm.deadline - time.monotonic()))
                    break
                before = storm.ack_count()
                # A random moment: now and then at once (recovery barely done), mostly with
                # stores in flight.
                target = before + (0 if rng.random() < 0.2 else rng.randint(2, 10))
                assert wait_for(lambda t=target: storm.ack_count() >= t
                                or not any(th.is_alive() for th in threads),
                                storm.deadline - time.monotonic()), "storm made no progress"
                time.sleep(rng.uniform(0, 0.05))
                kill_tree(proc)   # the server and its DICOM workers at once: a crash
            peak = max(peak, mem.mb)
            storm.port = 0
            with storm.lock:
                acked_at_kill = dict(storm.acked)
            per_life.append(len(acked_at_kill) - before)
            assert (data / "pacsd.json").exists()   # unclean: the next start recovers
            if life % PLANT_EVERY == PLANT_EVERY // 2:
                source = write_series(tmp_path / f"orphan{life}", seed=900 + life, images=1,
                                      size=32)[0]
                rel, tmp = plant(storage, source)
                sop = sop_of(source)
                orphans[sop] = source
                planted = (sop, rel, tmp)
        peak = max(peak, mem.mb)
        acked = ended(storm, threads)
        assert time.monotonic() < storm.deadline or set(acked) == set(by_sop), \
            f"the storm ran out of time ({DEADLINE:.0f} s): {len(acked)} of {len(by_sop)} sent"
        assert set(acked) == set(by_sop), "the surviving server did not store everything"
        assert_retrievable(proc.port, sent)
        assert proc.stop() == 0, proc.output()
        proc = None
    finally:
        storm.stop.set()
        if proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)

    gone = lost(data, acked)
    record("kill_storm", associations=storm.associations, stored=len(acked), kills=KILLS,
           lost=len(gone), peak_rss_mb=peak)
    assert gone == set()
    text = log.read_text()
    assert text.count("did not stop cleanly") == KILLS, text[-3000:]
    assert orphans, "no orphan was planted"
    assert_archive_sound(data, {**acked, **orphans}, set(by_sop) | set(orphans))
    recovered = sum(int(m) for m in re.findall(r"recovered (\d+) stored file", text))
    tmp_removed = sum(int(m) for m in re.findall(r"removed (\d+) unfinished", text))
    print(f"kill storm: {KILLS} kills, {storm.associations} associations, {storm.attempts} "
          f"C-STOREs, {storm.aborted} interrupted, {len(acked)} stored, acks per life: "
          f"{per_life}; recovered {recovered} unindexed file(s) ({len(orphans)} planted), "
          f"removed {tmp_removed} temporary file(s), {text.count('duplicate SOP Instance')} "
          f"duplicate(s); peak RSS {peak} MB")
