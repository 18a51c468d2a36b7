#!/usr/bin/env python3
"""What the integrity checks and the lossless compression at rest cost, on the benchmark CT
series (benchmarks/run.py's images: tests/data.py CT slices, 512x512 by default) and on a real
CT (pydicom's CT_small.dcm, copied --real times).

Not a test (pytest never collects it). Run it from the repository with the project's venv, on a
quiet machine:

    .venv/bin/python benchmarks/integrity.py                 # 200 images of 512x512
    .venv/bin/python benchmarks/integrity.py --images 1000

The images are imported (`pacsd import`) into a throw-away data folder, then, each timed as a
real command run:

  verify     `pacsd verify --all`: every file read back and hashed (the scrubber's work, without
             its rate bound: [storage] scrub_mb_per_s caps it at 20 MiB/s by default)
  compress   `pacsd compress`: each image encoded as JPEG-LS Lossless, decoded again and
             compared, written durably, re-indexed: the ratio and MB/s read
  verify     again, on the compressed files

The files are in the page cache (just written): the figures are pacsd's CPU, not a disk's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import ensure_data, say  # noqa: E402


def pacsd(config: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pacsd", *args, "--config", str(config)],
                         capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        raise SystemExit(f"pacsd {args[0]} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return seconds, out.stdout


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.dcm")
               if not {".trash", ".tmp"} & set(p.relative_to(folder).parts))


def run_case(label: str, files: list[Path], work: Path) -> list[str]:
    data = work / label
    config = work / f"{label}.toml"
    config.write_text(f'[server]\ndata = "{data}"\n[log]\nfile = "-"\n[dicom]\nport = 0\n'
                      f'[http]\nport = 0\n[[compression]]\nname = "all"\n')
    src = work / f"{label}-src"
    src.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, src / f"{i:06d}.dcm")
    pacsd(config, "import", str(src))
    storage = data / "storage"
    before = size_of(storage)
    t_verify, _ = pacsd(config, "verify", "--all")
    t_compress, said = pacsd(config, "compress")
    after = size_of(storage)
    t_verify2, _ = pacsd(config, "verify", "--all")
    m = re.search(r"compressed (\d+) image", said)
    n = int(m.group(1)) if m else 0
    mb = before / 1e6
    return [f"{label}: {len(files)} images, {mb:.1f} MB stored",
            f"  verify --all        {t_verify:6.1f} s  {mb / t_verify:7.1f} MB/s  "
            f"{len(files) / t_verify:7.0f} files/s (command start-up included)",
            f"  compress (JPEG-LS)  {t_compress:6.1f} s  {mb / t_compress:7.1f} MB/s read  "
            f"{n} compressed, ratio {before / max(after, 1):.2f} ({mb:.1f} -> {after / 1e6:.1f} MB)",
            f"  verify, compressed  {t_verify2:6.1f} s  {after / 1e6 / t_verify2:7.1f} MB/s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200, help="benchmark CT images (512x512)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--real", type=int, default=200, help="copies of pydicom's CT_small.dcm")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data")
    a = ap.parse_args()
    from data import sample, write_series
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    series = max(1, a.images // 4)
    images, _ = ensure_data(a.workdir, patients=2, studies=2, series=1, images=series,
                            size=a.size, find_studies=0)
    work = Path(tempfile.mkdtemp(prefix="pacsd-integrity-"))
    try:
        real = []
        ct = dcmread(sample("CT_small.dcm"))
        study, series_uid = generate_uid(), generate_uid()
        for i in range(a.real):
            ct.StudyInstanceUID, ct.SeriesInstanceUID = study, series_uid
            ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = work / f"real-{i}.dcm"
            ct.save_as(path)
            real.append(path)
        del write_series
        lines = run_case("benchmark-ct", images, work) + run_case("CT_small", real, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say("results")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
