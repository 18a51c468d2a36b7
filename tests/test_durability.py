"""Crash durability, one case the kill storm (tests/reliability/test_kill_storm.py: 20 SIGKILLs
under four store clients, everything acknowledged checked after each restart) is unlikely to hit:
a kill between writing a duplicate's file and deleting it."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from conftest import store_files, write_config
from data import write_series
from pynetdicom import _config
from reliability.storm import start


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
