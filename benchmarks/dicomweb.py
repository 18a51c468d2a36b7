#!/usr/bin/env python3
"""Benchmark pacsd's DICOMweb side: WADO-RS series throughput and QIDO-RS /studies latency.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/dicomweb.py                    # 250 CT images of 512x512
    .venv/bin/python benchmarks/dicomweb.py --images 100 --studies 20

A fresh `pacsd serve` (127.0.0.1, ports 0, read back from DATA/pacsd.json) receives one series
of --images generated 512x512 16-bit CT slices and --studies small one-image studies, sent with
DCMTK's storescu (TCP_NODELAY=1) when installed, else with pynetdicom. Then:
  WADO-RS   GET /studies/{s}/series/{se}, all parts streamed and counted, median of --runs (5)
  metadata  GET /studies/{s}/series/{se}/metadata (every file's header read), median of 3
  QIDO-RS   GET /studies (every study, default attributes), keep-alive, median of --queries (30)
The server and its data folder are removed at exit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import pacsd, store  # noqa: E402  (benchmarks/ is on sys.path when run)
from data import write_series  # noqa: E402


def wado_series(url: str, expected_parts: int) -> tuple[float, int]:
    """Seconds and bytes for one WADO-RS retrieve, the body read to its end."""
    t0 = time.perf_counter()
    with requests.get(url, stream=True, timeout=120, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as r:
        r.raise_for_status()
        boundary = r.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
        n = parts = 0
        tail = b""
        for chunk in r.iter_content(1 << 20):
            n += len(chunk)
            parts += (tail + chunk).count(b"--" + boundary + b"\r\n")
            tail = chunk[-len(boundary) - 4:]
    elapsed = time.perf_counter() - t0
    if parts != expected_parts:
        raise SystemExit(f"WADO-RS returned {parts} parts, expected {expected_parts}")
    return elapsed, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=250)
    ap.add_argument("--studies", type=int, default=40, help="extra one-image studies")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--queries", type=int, default=30)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pacsd-bench-dicomweb-"))
    try:
        series = write_series(work / "series", seed=11, images=args.images, size=512)
        others = write_series(work / "others", seed=12, patients=args.studies, images=1,
                              size=64)
        with pacsd(work) as server:
            return run(args, server, series, others)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, server, series: list[Path], others: list[Path]) -> int:
    t0 = time.perf_counter()
    store(server.dicom_port, series)
    store_s = time.perf_counter() - t0
    store(server.dicom_port, others)
    from pydicom import dcmread
    first = dcmread(series[0], stop_before_pixels=True)
    dw = server.http_url + "/dicom-web"
    url = f"{dw}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
    wado_series(url, args.images)   # warm-up: page cache, connections
    runs = [wado_series(url, args.images) for _ in range(args.runs)]
    secs = statistics.median(t for t, _ in runs)
    size = runs[0][1]
    meta = []
    for _ in range(3):
        t = time.perf_counter()
        r = requests.get(url + "/metadata", timeout=120)
        r.raise_for_status()
        meta.append(time.perf_counter() - t)
        if len(r.json()) != args.images:
            raise SystemExit("WADO-RS metadata: wrong number of instances")
    session = requests.Session()
    lat, found = [], 0
    for _ in range(args.queries + 1):
        t = time.perf_counter()
        r = session.get(dw + "/studies", timeout=30)
        r.raise_for_status()
        lat.append(time.perf_counter() - t)
        found = len(r.json())
    qido_ms = statistics.median(lat[1:]) * 1000
    print(f"stored {args.images} images of 512x512 in {store_s:.1f} s "
          f"({args.images / store_s:.0f} img/s), plus {args.studies} one-image studies")
    print(f"WADO-RS series ({args.images} instances, {size / 1e6:.1f} MB): "
          f"{size / 1e6 / secs:.0f} MB/s, {args.images / secs:.0f} img/s "
          f"(median of {args.runs}: {secs * 1000:.0f} ms)")
    print(f"WADO-RS series metadata ({args.images} headers read): "
          f"{statistics.median(meta) * 1000:.0f} ms (median of 3)")
    print(f"QIDO-RS /studies ({found} studies): {qido_ms:.1f} ms (median of {args.queries})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
