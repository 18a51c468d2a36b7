#!/usr/bin/env python3
"""WADO-URI latency of one instance: a generated 512x512 CT, against `pacsd serve`.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/wado_uri.py              # 50 requests per case
    .venv/bin/python benchmarks/wado_uri.py --runs 200

A fresh `pacsd serve` subprocess (DICOM and HTTP on 127.0.0.1, ports 0, read back from
DATA/pacsd.json) gets the image by C-STORE (pynetdicom); then each case is requested --runs
times over one keep-alive HTTP connection (after 5 warm-up requests) and the median, 90th
percentile and minimum of the client-side latency are printed. The data folder is removed
and the server stopped at exit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import requests

from common import LOCAL, pacsd, store  # noqa: E402  (benchmarks/ is on sys.path)
from data import ct_slice  # noqa: E402


def measure(session: requests.Session, url: str, params: dict, runs: int) -> tuple[list[float],
                                                                                   int]:
    size = 0
    for _ in range(5):   # warm-up: imports, caches, the connection
        session.get(url, params=params, timeout=30).raise_for_status()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = session.get(url, params=params, timeout=30)
        r.raise_for_status()
        size = len(r.content)
        times.append(time.perf_counter() - t0)
    return times, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pacsd-wado-bench-"))
    try:
        ds = ct_slice(seed=1, patient=1, study=1, series=1, number=1, size=512)
        path = workdir / "ct.dcm"
        ds.save_as(path, enforce_file_format=True)
        with pacsd(workdir) as server:
            store(server.dicom_port, [path])
            run(server.http_url + "/wado", ds, path, args.runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(url: str, ds, path: Path, runs: int) -> None:
    base = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
    cases = [("application/dicom", {"contentType": "application/dicom"}),
             ("image/jpeg 512x512", {"contentType": "image/jpeg"}),
             ("image/jpeg rows=128", {"contentType": "image/jpeg", "rows": 128}),
             ("image/png 512x512", {"contentType": "image/png"})]
    print(f"WADO-URI, one 512x512 16-bit CT ({path.stat().st_size} bytes), "
          f"{runs} requests per case, one keep-alive connection, {LOCAL}")
    print(f"{'case':22} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'bytes':>9}")
    with requests.Session() as session:
        for label, extra in cases:
            times, size = measure(session, url, {**base, **extra}, runs)
            times.sort()
            p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
            print(f"{label:22} {statistics.median(times) * 1000:10.2f} {p90 * 1000:8.2f} "
                  f"{times[0] * 1000:8.2f} {size:9d}")


if __name__ == "__main__":
    main()
