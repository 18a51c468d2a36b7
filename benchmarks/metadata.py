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
  first     GET /dicom-web/studies/{s}/series/{se}/metadata once, once the study is stable
            (pacsd, [hooks] study_stable_after = 2: its metadata cached by then, [storage]
            warm_metadata); with --cold, right after storing instead (pacsd builds each
            instance's cached metadata then)
  median    the same request --runs times, the servers taking turns, median ms
Each answer is checked: as many instances as stored, each with its SOP Instance UID.
Both servers and their data folders are removed at exit.
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

from common import LOCAL, pacsd, store  # noqa: E402  (benchmarks/ is on sys.path when run)
from data import write_series  # noqa: E402
from orthanc import BINARIES, DICOMWEB_PLUGIN, orthanc  # noqa: E402


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
    ap.add_argument("--cold", action="store_true",
                    help="the first request right after storing, before the study is stable")
    args = ap.parse_args(argv)
    if not (any(Path(b).exists() for b in BINARIES) and DICOMWEB_PLUGIN.exists()):
        raise SystemExit("Orthanc and its DICOMweb plugin are needed "
                         "(apt-get install orthanc orthanc-dicomweb)")
    work = Path(tempfile.mkdtemp(prefix="pacsd-bench-metadata-"))
    try:
        series = write_series(work / "series", seed=31, images=args.images, size=512)
        from pydicom import dcmread
        first = dcmread(series[0], stop_before_pixels=True)
        sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series}
        path = (f"/dicom-web/studies/{first.StudyInstanceUID}/series/"
                f"{first.SeriesInstanceUID}/metadata")
        stable = "60" if args.cold else "2"
        with orthanc(work / "orthanc", dicomweb=True,
                     DicomWeb={"Enable": True, "Root": "/dicom-web/"}) as peer, \
                pacsd(work, extra=f"[hooks]\nstudy_stable_after = {stable}\n") as server:
            orthanc_url = f"http://{LOCAL}:{peer.http_port}"
            for p in series:
                requests.post(orthanc_url + "/instances", data=p.read_bytes(),
                              timeout=60).raise_for_status()
            store(server.dicom_port, series)
            if not args.cold:   # until the stable watcher has cached every instance's metadata
                cache = work / "data" / "storage" / ".cache" / "metadata"
                deadline = time.monotonic() + 120
                while sum(1 for _ in cache.rglob("*.json")) < len(series):
                    if time.monotonic() > deadline:
                        raise SystemExit("pacsd did not cache the study's metadata in 120 s")
                    time.sleep(0.2)
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
        print(f"{'':10}{'first (ms)':>12}{'median (ms)':>13}   first: "
              + ("right after storing" if args.cold else "once the study is stable"))
        for name in urls:
            print(f"{name:10}{firsts[name] * 1000:12.0f}{med[name]:13.1f}")
        print(f"pacsd vs Orthanc (median): {med['Orthanc'] / med['pacsd']:.2f}x "
              f"({'faster' if med['pacsd'] <= med['Orthanc'] else 'slower'})")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
