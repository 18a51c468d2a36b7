"""Disk full: `pacsd serve` with its storage on a small real filesystem (a tmpfs, mounted here).

Below the free-space floor ([storage] min_free_mb) C-STORE answers 0xA700 (Out of Resources)
and STOW-RS 507, with one WARNING when storing stops (not one per image) and one line when it
resumes; no partial or temporary file stays, the index is unchanged, nothing is deleted to make
room, C-ECHO answers throughout, and storing resumes without a restart once space is freed.
With no floor (0), a data set bigger than the space left meets the real ENOSPC: the same answers
and nothing partial left.

Mounting needs root (CI runs as root): without it the tests skip, or fail under
PACSD_REQUIRE_PEERS=1 as the peer tests do.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from conftest import Process, associate, peer_missing, serve, store_files, write_config
from data import write_series
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.sop_class import Verification
from reliability.report import PeakMemory, record, scaled
from reliability.storm import indexed_rows
from test_dicomweb import multipart_body

MiB = 2**20
FULL = "is full ("            # the WARNING logged when storing stops
RESUMED = "accepts new images again"


@contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        peer_missing(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=30)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(volume: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `volume`."""
    filler = volume / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free(volume) - leave))   # tmpfs: written pages are taken
    assert free(volume) <= leave + MiB
    return filler


def echo(port: int) -> int:
    with associate(port, [(Verification,)]) as assoc:
        return int(assoc.send_c_echo().Status)


def stow(proc: Process, paths: list[Path]) -> requests.Response:
    body, ctype = multipart_body([p.read_bytes() for p in paths])
    return requests.post(proc.http_url + "/dicom-web/studies", data=body, timeout=30,
                         headers={"Content-Type": ctype})


def stow_failures(r: requests.Response) -> list[int]:
    return [int(i.FailureReason) for i in Dataset.from_json(r.json()).get("FailedSOPSequence", [])]


def store_until(port: int, paths: list[Path], want: int, timeout: float = 10) -> list[Path]:
    """C-STORE `paths` one by one, an association each, until one is answered `want`: the
    guard reads free space at most once a second, so the state may lag that long. Returns the
    paths answered Success on the way (with the last if `want` is Success); fails if `want`
    never came."""
    ok: list[Path] = []
    deadline = time.monotonic() + timeout
    for p in paths:
        status = store_files(port, [p])[0]
        if status == want:
            return ok + [p] if want == 0x0000 else ok
        assert status == 0x0000, f"0x{status:04X}"
        ok.append(p)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)   # poll interval
    raise AssertionError(f"no 0x{want:04X} within {timeout} s or {len(paths)} images")


def leftovers(volume: Path, data: Path) -> tuple[set[str], set[str], list[str]]:
    """(stored .dcm files, indexed paths, temporary files) on the storage volume."""
    on_disk = {p.relative_to(volume).as_posix() for p in volume.rglob("*.dcm")
               if ".tmp" not in p.relative_to(volume).parts}
    return on_disk, set(indexed_rows(data).values()), \
        [p.name for p in (volume / ".tmp").rglob("*") if p.is_file()]


@pytest.mark.timeout(120)
def test_below_the_floor_store_is_refused_then_resumes(tmp_path: Path):
    files = write_series(tmp_path / "src", seed=31, images=scaled(40), size=64)
    data = tmp_path / "pacsd"
    stored: list[Path] = []
    associations = 0
    with tmpfs(tmp_path / "vol", 32) as volume, \
            serve(write_config(tmp_path / "pacsd.toml", data,
                               storage={"path": str(volume), "min_free_mb": 8}), data) as proc, \
            PeakMemory(proc.proc.pid) as mem:
        log = proc.log
        assert store_files(proc.port, files[:2]) == [0, 0]
        stored += files[:2]
        filler = fill(volume, 4 * MiB)   # 4 MiB free: below the 8 MiB floor
        pending = files[2:]
        lagged = store_until(proc.port, pending, 0xA700)   # at most a second of lag
        stored += lagged
        associations += 1 + len(lagged) + 1
        pending = pending[len(lagged) + 1:]   # the refused one is not in the index either

        # Full: every image refused, the same way on every front end; C-ECHO still answers.
        before = leftovers(volume, data)
        refused = pending[:scaled(5)]
        assert store_files(proc.port, refused) == [0xA700] * len(refused)
        r = stow(proc, pending[len(refused):len(refused) + 2])
        assert r.status_code == 507, r.text
        assert stow_failures(r) == [0xA700, 0xA700]
        assert echo(proc.port) == 0x0000
        associations += 2
        on_disk, indexed, temporary = leftovers(volume, data)
        assert (on_disk, indexed, temporary) == before, "a refused image left something"
        assert on_disk == indexed and temporary == []
        assert indexed_rows(data).keys() == {str(dcmread(p).SOPInstanceUID) for p in stored}
        text = log.read_text()
        assert text.count(FULL) == 1, "one WARNING when storing stops, not one per image"
        assert "WARNING" in text[:text.index(FULL)].rsplit("\n", 1)[-1]
        assert "below [storage] min_free_mb = 8" in text
        assert "refused with 0xA700" not in text and "STOW-RS: instance" not in text

        # Space back: storing resumes without a restart; nothing was deleted to make room.
        filler.unlink()
        rest = pending[len(refused) + 2:]
        resumed = store_until(proc.port, rest, 0x0000)
        stored += resumed
        associations += len(resumed) + 1
        more = rest[len(resumed):len(resumed) + 2]
        r = stow(proc, more)
        assert r.status_code == 200, r.text
        stored += more
        assert echo(proc.port) == 0x0000
        associations += 2
        on_disk, indexed, temporary = leftovers(volume, data)
        assert on_disk == indexed and temporary == []
        assert indexed_rows(data).keys() == {str(dcmread(p).SOPInstanceUID) for p in stored}
        text = log.read_text()
        assert text.count(RESUMED) == 1 and text.count(FULL) == 1
    record("disk_full_floor", associations=associations, stored=len(stored), kills=0, lost=0,
           peak_rss_mb=mem.mb)


@pytest.mark.timeout(120)
def test_real_enospc_leaves_nothing_partial(tmp_path: Path):
    """No floor: a 2 MiB image into 1 MiB of space fails in the middle of the write."""
    small = write_series(tmp_path / "small", seed=32, images=2, size=64)
    big = write_series(tmp_path / "big", seed=33, images=2, size=1024)   # 2 MiB each
    data = tmp_path / "pacsd"
    with tmpfs(tmp_path / "vol", 16) as volume, \
            serve(write_config(tmp_path / "pacsd.toml", data,
                               storage={"path": str(volume), "min_free_mb": 0}), data) as proc, \
            PeakMemory(proc.proc.pid) as mem:
        assert store_files(proc.port, small[:1]) == [0]
        filler = fill(volume, MiB)
        before = leftovers(volume, data)
        assert store_files(proc.port, big[:1]) == [0xA700]
        r = stow(proc, big[1:])
        assert r.status_code == 507, r.text
        assert stow_failures(r) == [0xA700]
        assert echo(proc.port) == 0x0000
        assert leftovers(volume, data) == before, "a partial file stayed"
        assert free(volume) >= MiB - 64 * 1024, "the failed write's space was not given back"
        text = proc.log.read_text()
        assert text.count(FULL) == 1 and "No space left on device" in text
        # A small image still fits: real ENOSPC is not a floor, storing goes on where it can.
        assert store_files(proc.port, small[1:]) == [0]
        assert RESUMED in proc.log.read_text()
        filler.unlink()
        assert store_files(proc.port, big) == [0, 0]
        on_disk, indexed, temporary = leftovers(volume, data)
        assert on_disk == indexed and len(indexed) == 4 and temporary == []
    record("disk_full_enospc", associations=6, stored=4, kills=0, lost=0, peak_rss_mb=mem.mb)
