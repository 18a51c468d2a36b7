#!/usr/bin/env python3
"""C-STORE with the audit trail off and on: does auditing slow the store path?

Not a test (pytest never collects it). From the repository, with the project's venv:

    .venv/bin/python benchmarks/audit.py                 # 600 CT images, 5 runs each way
    .venv/bin/python benchmarks/audit.py --images 300 --runs 3   # a quick look

Each run starts a fresh `pacsd serve` (its defaults: DICOM workers, fsync of every image and
its index row before Success; fresh data folder, ports 0) with `[audit] enabled = false` or
`true`, sends the N images of 512x512 16-bit CT (tests/data.py, cached in bench-data/) with
ONE storescu over ONE association (DCMTK, TCP_NODELAY=1; pynetdicom when DCMTK is missing),
process start included, after os.sync(). The runs alternate off, on, off, on... so that the
disk's and the machine's drift falls on both alike; the median of each is printed side by
side. With auditing on, the association makes one record per study when it ends (here 2),
written by the audit thread: the per-image cost is one dict update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, pacsd, store  # noqa: E402
from harness import ensure_data  # noqa: E402


def one_run(workdir: Path, images: list[Path], audit: bool) -> tuple[float, int]:
    """(images per second, audit records written) of one fresh server."""
    workdir.mkdir(parents=True)
    with pacsd(workdir, extra=f"[audit]\nenabled = {'true' if audit else 'false'}\n") as p:
        os.sync()
        t0 = time.perf_counter()
        store(p.dicom_port, images)
        elapsed = time.perf_counter() - t0
    records = 0
    for f in (workdir / "data" / "audit").glob("*.jsonl"):
        records += sum(1 for line in f.read_text().splitlines()
                       if json.loads(line).get("action") == "store")
    return len(images) / elapsed, records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600, help="images per run (a multiple of 150)")
    ap.add_argument("--runs", type=int, default=5, help="runs each way (interleaved)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    studies = max(1, args.images // 150)
    images, _ = ensure_data(args.workdir, patients=1, studies=studies, series=3, images=50,
                            size=512, find_studies=0)
    rates: dict[bool, list[float]] = {False: [], True: []}
    records: dict[bool, list[int]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="audit-") as tmp:
        for run in range(args.runs):
            for audit in (False, True):
                rate, n = one_run(Path(tmp) / f"{run}-{int(audit)}", images, audit)
                rates[audit].append(rate)
                records[audit].append(n)
                print(f"run {run + 1} audit {'on ' if audit else 'off'}: {rate:7.1f} img/s "
                      f"({n} store records)", file=sys.stderr, flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\nC-STORE, {len(images)} images of 512x512 CT over 1 association (storescu), "
          f"median of {args.runs} fresh servers each, interleaved")
    print(f"{'':24}{'audit off':>12}{'audit on':>12}")
    print(f"{'img/s':24}{off:12.1f}{on:12.1f}")
    print(f"{'on / off':24}{'':12}{on / off:12.3f}")
    for audit in (False, True):
        print(f"runs, audit {'on ' if audit else 'off'} (img/s): "
              + " ".join(f"{r:.0f}" for r in rates[audit]))
    print(f"store records per run: {max(records[False])} off, {min(records[True])} on")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": len(images), "runs": args.runs,
                                               "off": rates[False], "on": rates[True]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
