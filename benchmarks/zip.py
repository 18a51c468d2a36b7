#!/usr/bin/env python3
"""Throughput of pacsd.imaging.media.zip_stream: a series as a ZIP with a DICOMDIR, in process.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/zip.py                  # 250 CT images of 512x512
    .venv/bin/python benchmarks/zip.py --images 1000 --runs 5

The series is generated (tests/data.write_series) into a temporary folder, removed at exit;
its files are then in the page cache, so the figures are of pacsd's CPU, not of a disk. Each
case consumes the whole stream --runs times (bytes counted, not kept) and prints the median:

  zip + DICOMDIR   zip_stream(paths): every header read and recorded, the DICOMDIR at the end
  zip only         zip_stream(paths, dicomdir=False): copying and CRC-32 only
  first byte       until zip_stream yields its first chunk
  DICOMDIR         from the headers (already read): records for every instance, then encoding
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402

from data import write_series  # noqa: E402
from pacsd.imaging.media import Directory, zip_stream  # noqa: E402


def consume(paths: list[Path], dicomdir: bool) -> tuple[float, float, int]:
    """(seconds to the first chunk, seconds in all, bytes) of one archive."""
    t0 = time.perf_counter()
    first = 0.0
    size = 0
    for chunk in zip_stream(paths, dicomdir=dicomdir):
        if not size:
            first = time.perf_counter() - t0
        size += len(chunk)
    return first, time.perf_counter() - t0, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--size", type=int, default=512, help="rows and columns")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pacsd-zip-bench-"))
    try:
        t0 = time.perf_counter()
        paths = write_series(work, images=args.images, size=args.size)
        total = sum(p.stat().st_size for p in paths)
        print(f"{len(paths)} images of {args.size}x{args.size}, {total / 1e6:.1f} MB "
              f"(generated in {time.perf_counter() - t0:.1f} s)")
        for label, dicomdir in (("zip + DICOMDIR", True), ("zip only", False)):
            consume(paths, dicomdir)   # warm-up
            runs = [consume(paths, dicomdir) for _ in range(args.runs)]
            seconds = statistics.median(r[1] for r in runs)
            print(f"{label:15s} {total / 1e6 / seconds:8.0f} MB/s   {seconds:.3f} s   "
                  f"first byte {statistics.median(r[0] for r in runs) * 1e3:.1f} ms   "
                  f"archive {runs[0][2] / 1e6:.1f} MB")
        headers = [dcmread(p, stop_before_pixels=True) for p in paths]
        times, encode_times, size = [], [], 0
        for _ in range(args.runs):
            t0 = time.perf_counter()
            directory = Directory()
            for ds in headers:
                directory.add(ds)
            t1 = time.perf_counter()
            size = len(directory.encode())
            times.append(time.perf_counter() - t0)
            encode_times.append(time.perf_counter() - t1)
        t0 = time.perf_counter()
        for p in paths:
            dcmread(p, stop_before_pixels=True)
        read = time.perf_counter() - t0
        print(f"{'DICOMDIR':15s} {statistics.median(times) * 1e3:8.0f} ms for {len(paths)} "
              f"records ({statistics.median(encode_times) * 1e3:.0f} ms of it encoding), "
              f"{size / 1e3:.0f} kB; reading the headers: {read * 1e3:.0f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
