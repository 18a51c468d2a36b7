#!/usr/bin/env python3
"""WADO-RS series metadata, pacsd side by side with Orthanc (1.10, DICOMweb plugin 1.7).

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/metadata.py                  # 300 CT images of 512x512, 15 runs
    .venv/bin/python benchmarks/metadata.py --images 100 --runs 5

A fresh `pacsd serve` and a fresh Orthanc (both on 127.0.0.1, ports picked free, Orthanc with
its DICOMweb plugin and a JSON config of its folders and ports) receive the same --images
generated 512x512 16-bit CT slices of one series (pacsd by C-STORE with DCMTK's storescu,
Orthanc by its REST API). Then, on one keep-alive requests.Session per server, with
"Accept-Encoding: identity" (Orthanc would otherwise gzip its JSON):
  first     GET /dicom-web/studies/{s}/series/{se}/metadata once, right after storing
            (pacsd builds each instance's cached metadata then)
  median    the same request --runs times, the servers taking turns, median ms
Each answer is checked: as many instances as stored, each with its SOP Instance UID.
Both servers and their data folders are removed at exit.
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

from common import LOCAL, pacsd, store  # noqa: E402  (benchmarks/ is on sys.path when run)
from conftest import free_port, peer_env, terminate  # noqa: E402
from data import write_series  # noqa: E402

ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def start_orthanc(work: Path) -> tuple[subprocess.Popen, str]:
    http = free_port()
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "orthanc"),
        "IndexDirectory": str(work / "orthanc"), "DicomAet": "ORTHANC",
        "DicomPort": free_port(), "HttpPort": http, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    log = open(work / "orthanc.log", "w")
    proc = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=peer_env())
    url = f"http://{LOCAL}:{http}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(url + "/system", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            terminate(proc, 10)
            raise SystemExit(f"Orthanc did not start: {(work / 'orthanc.log').read_text()[-800:]}")
        time.sleep(0.1)


def timed(session: requests.Session, url: str, sops: set[str]) -> float:
    t = time.perf_counter()
    r = session.get(url, timeout=300, headers={"Accept": "application/dicom+json",
                                               "Accept-Encoding": "identity"})
    r.raise_for_status()
    items = r.json()
    elapsed = time.perf_counter() - t
    got = {i["00080018"]["Value"][0] for i in items}
    if len(items) != len(sops) or got != sops:
        raise SystemExit(f"{url}: {len(items)} instances answered, {len(sops)} expected")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args(argv)
    if not (ORTHANC.exists() and ORTHANC_DICOMWEB.exists()):
        raise SystemExit("Orthanc and its DICOMweb plugin are needed "
                         "(apt-get install orthanc orthanc-dicomweb)")
    work = Path(tempfile.mkdtemp(prefix="pacsd-bench-metadata-"))
    orthanc = None
    try:
        series = write_series(work / "series", seed=31, images=args.images, size=512)
        from pydicom import dcmread
        first = dcmread(series[0], stop_before_pixels=True)
        sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series}
        path = (f"/dicom-web/studies/{first.StudyInstanceUID}/series/"
                f"{first.SeriesInstanceUID}/metadata")
        orthanc, orthanc_url = start_orthanc(work)
        for p in series:
            requests.post(orthanc_url + "/instances", data=p.read_bytes(),
                          timeout=60).raise_for_status()
        with pacsd(work) as server:
            store(server.dicom_port, series)
            urls = {"pacsd": server.http_url + path, "Orthanc": orthanc_url + path}
            sessions = {name: requests.Session() for name in urls}
            firsts = {name: timed(sessions[name], url, sops) for name, url in urls.items()}
            times: dict[str, list[float]] = {name: [] for name in urls}
            for _ in range(args.runs):   # taking turns
                for name, url in urls.items():
                    times[name].append(timed(sessions[name], url, sops))
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        print(f"WADO-RS series metadata, {args.images} instances of 512x512 CT "
              f"(median of {args.runs}, keep-alive, no compression)")
        print(f"{'':10}{'first (ms)':>12}{'median (ms)':>13}")
        for name in urls:
            print(f"{name:10}{firsts[name] * 1000:12.0f}{med[name]:13.1f}")
        print(f"pacsd vs Orthanc (median): {med['Orthanc'] / med['pacsd']:.2f}x "
              f"({'faster' if med['pacsd'] <= med['Orthanc'] else 'slower'})")
        return 0
    finally:
        if orthanc is not None:
            terminate(orthanc, 10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
