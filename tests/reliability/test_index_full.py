"""A full *index* volume (the database's own disk, apart from storage): `pacsd serve` with its
SQLite index on a small tmpfs (`[index] url`), filled behind its back.

C-STORE answers 0xA700 (Out of Resources) and STOW-RS 507, never 0x0110; ONE log line says the
index volume is full (not one per image) and one that storing resumed; no stored file is left
without its row; C-ECHO and queries go on; `/testdbalive` answers 507 "index volume full", and
the watchdog, seeing that, logs that a restart would not help and does not kill. Storing resumes
without a restart once space is freed.

Mounting needs root (CI runs as root), as in test_disk_full.py.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import serve, store_files, write_config
from data import write_series
from pydicom import dcmread
from reliability.test_disk_full import echo, fill, stow, stow_failures, tmpfs
from test_watchdog import FAST, Watchdog

FULL = "the index volume is full"
RESUMED = "accepts writes again"


def indexed_rows(volume: Path) -> dict[str, str]:
    """SOP Instance UID -> stored path, read-only (safe while pacsd runs: WAL)."""
    db = sqlite3.connect(f"file:{volume / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instance"))
    finally:
        db.close()


def stored_files(storage: Path) -> set[str]:
    return {p.relative_to(storage).as_posix() for p in storage.rglob("*.dcm")
            if p.relative_to(storage).parts[0] not in (".tmp", ".conflicts")}


def store_until_full(port: int, paths: list[Path], limit: float = 20) -> list[Path]:
    """C-STORE one by one until one is refused 0xA700 (SQLite may still find a free page or
    two in its file after the volume fills); the paths stored on the way."""
    ok: list[Path] = []
    deadline = time.monotonic() + limit
    for p in paths:
        status = store_files(port, [p])[0]
        if status == 0xA700:
            return ok
        assert status == 0x0000, f"0x{status:04X}: a full index volume must answer 0xA700"
        ok.append(p)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no 0xA700 within {limit} s or {len(paths)} images")


@pytest.mark.timeout(150)
def test_full_index_volume_answers_out_of_resources_and_is_not_killed_for(tmp_path: Path):
    files = write_series(tmp_path / "src", seed=41, images=60, size=64)
    data = tmp_path / "pacsd"
    with tmpfs(tmp_path / "ixvol", 4) as volume:
        cfg = write_config(tmp_path / "pacsd.toml", data,
                           index={"url": f"sqlite:///{volume}/index.sqlite3"},
                           storage={"min_free_mb": 0},
                           watchdog={**FAST, "log_file": str(tmp_path / "watchdog.log")})
        with serve(cfg, data) as proc:
            assert store_files(proc.port, files[:2]) == [0, 0]
            stored = files[:2]
            filler = fill(volume, 0)   # the index's volume: nothing left
            stored += store_until_full(proc.port, files[2:])
            pending = files[len(stored) + 1:]

            refused = pending[:3]
            assert store_files(proc.port, refused) == [0xA700] * 3
            r = stow(proc, pending[3:5])
            assert r.status_code == 507, r.text
            assert stow_failures(r) == [0xA700, 0xA700]
            assert echo(proc.port) == 0x0000
            alive = requests.get(proc.http_url + "/testdbalive", timeout=10)
            assert alive.status_code == 507 and "index volume full" in alive.text, alive.text
            # Every file in storage has its row: the refused images left nothing behind.
            rows = indexed_rows(volume)
            assert set(rows) == {str(dcmread(p).SOPInstanceUID) for p in stored}
            assert stored_files(data / "storage") == set(rows.values())
            text = proc.log.read_text()
            assert text.count(FULL) == 1, "one line when it begins, not one per image"
            assert "ERROR" in text[:text.index(FULL)].rsplit("\n", 1)[-1]
            assert "a restart would not help" in text
            assert "refused with 0x0110" not in text and "index commit failed" not in text

            # The watchdog sees /testdbalive fail with 507 and does not kill: a restart cannot
            # free the volume.
            dog = Watchdog(cfg, tmp_path / "watchdog.log", tmp_path / "watchdog.out")
            try:
                m = dog.wait(r"NOT killing pacsd pid (\d+): restarting cannot help: the index "
                             r"volume is full", 30)
                assert int(m.group(1)) == proc.proc.pid
                assert not dog.find(r"killing pacsd pid \d+: (?!restarting)")
                assert psutil.pid_exists(proc.proc.pid) and proc.proc.poll() is None
            finally:
                dog.stop()

            # Space back: storing resumes without a restart.
            filler.unlink()
            more = pending[5:8]
            deadline = time.monotonic() + 10
            while store_files(proc.port, more[:1]) != [0]:
                assert time.monotonic() < deadline, "storing did not resume"
                time.sleep(0.1)
            assert store_files(proc.port, more[1:]) == [0, 0]
            assert requests.get(proc.http_url + "/testdbalive", timeout=10).status_code == 200
            text = proc.log.read_text()
            assert text.count(RESUMED) == 1 and text.count(FULL) == 1
            assert len(indexed_rows(volume)) == len(stored) + 3
