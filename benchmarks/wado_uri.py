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
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
LOCAL = "127.0.0.1"

from data import ct_slice  # noqa: E402


def start(workdir: Path) -> tuple[subprocess.Popen, dict]:
    data = workdir / "data"
    config = workdir / "pacsd.toml"
    config.write_text(f'[server]\ndata = "{data}"\n[dicom]\nport = 0\nbind = "{LOCAL}"\n'
                      f'[http]\nport = 0\nbind = "{LOCAL}"\n[log]\nfile = "{workdir}/pacsd.log"\n')
    proc = subprocess.Popen([sys.executable, "-m", "pacsd", "serve", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pacsd exited {proc.returncode}; see {workdir}/pacsd.log")
        try:
            info = json.loads((data / "pacsd.json").read_text())
            if info["pid"] == proc.pid:
                return proc, info
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("pacsd was not ready within 30 s")


def store(port: int, path: Path) -> None:
    from pydicom import dcmread
    from pynetdicom import AE
    ds = dcmread(path)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOCAL, port, ae_title="PACSD")
    if not assoc.is_established:
        raise SystemExit("C-STORE association refused")
    try:
        status = assoc.send_c_store(ds)
        if not status or status.Status != 0:
            raise SystemExit(f"C-STORE failed: {status}")
    finally:
        assoc.release()
        ae.shutdown()


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
    proc = None
    try:
        ds = ct_slice(seed=1, patient=1, study=1, series=1, number=1, size=512)
        path = workdir / "ct.dcm"
        ds.save_as(path, enforce_file_format=True)
        proc, info = start(workdir)
        store(int(info["dicom_port"]), path)
        url = f"http://{LOCAL}:{info['http_port']}/wado"
        base = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
                "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID}
        cases = [("application/dicom", {"contentType": "application/dicom"}),
                 ("image/jpeg 512x512", {"contentType": "image/jpeg"}),
                 ("image/jpeg rows=128", {"contentType": "image/jpeg", "rows": 128}),
                 ("image/png 512x512", {"contentType": "image/png"})]
        print(f"WADO-URI, one 512x512 16-bit CT ({path.stat().st_size} bytes), "
              f"{args.runs} requests per case, one keep-alive connection, 127.0.0.1")
        print(f"{'case':22} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'bytes':>9}")
        with requests.Session() as session:
            for label, extra in cases:
                times, size = measure(session, url, {**base, **extra}, args.runs)
                times.sort()
                p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
                print(f"{label:22} {statistics.median(times) * 1000:10.2f} {p90 * 1000:8.2f} "
                      f"{times[0] * 1000:8.2f} {size:9d}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
