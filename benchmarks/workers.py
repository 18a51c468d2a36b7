#!/usr/bin/env python3
"""How pacsd's C-STORE rate scales with DICOM worker processes (`[dicom] workers`).

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/workers.py                      # 1, 4, 16 associations, 3 runs
    .venv/bin/python benchmarks/workers.py --associations 16 --runs 1     # a quick look
    .venv/bin/python benchmarks/workers.py --workers 1,2,4,all --json workers.json --keep

Servers: `python -m pacsd serve` exactly as benchmarks/run.py starts it (its Pacsd: ports 0,
127.0.0.1, fsync of every file and folder, synchronous SQLite index, no per-host cap on
associations), plus `[dicom] workers = N` in the TOML it writes:
  workers=1     no worker processes: DICOM in the server's own process
  workers=N     N worker processes accepting on the one DICOM port (pacsd.daemon.workers),
                the server's process supervising them
  workers=all   one per core this process may run on (os.sched_getaffinity, what pacsd's
                default `workers = 0` gives); a count that equals another column (2 on a
                2-core machine) is measured once, and the table says so
Every run is into a FRESH pacsd (a new data folder); the count of its worker processes is
checked once it is up.

Data: run.py's, cached in --workdir (default <repo>/bench-data, shared with run.py): 2 patients
x 2 studies x (N / 200) series x 50 images of 512x512 16-bit CT (tests/data.py, deterministic).

Figures:
  C-STORE       N images with --associations DCMTK storescu side by side, as run.py's store_1,
                store_4 and store_16 (1: one storescu, +sd +r +sp '*.dcm' over the folder;
                K > 1: the files split among K storescu; /usr/bin/storescu, TCP_NODELAY=1),
                the wall time until the last one exits; images/s, median of --runs. os.sync()
                before each run; runs interleaved (run k of every association count and worker
                count, then run k + 1). A run counts only if every storescu exited 0, every
                file is on disk and the index holds each image exactly once with its file and
                its series/study/patient counters adding up (benchmarks/cluster.py's check,
                read-only on the live SQLite index)
  speed-up      the median images/s over workers=1's, same association count
  PSS           proportional set size summed over every process of pacsd's tree (the server,
                its workers and any process they are forked from: /proc/PID/smaps_rollup
                through psutil, harness.Sampler with the tree), fresh and idle, median over
                every fresh instance of that worker count
  CPU, RSS      server CPU seconds per run (the process tree) and its peak RSS (tree, psutil
                every 20 ms), per association count
  pacsd log     WARNING and ERROR lines, tracebacks, refused associations, workers that ended
                unexpectedly, starts (more than one per instance: a failed start tried again),
                summed over every run of a worker count
  load          the 1-minute load average before and after: other work on the machine (a test
                suite, another server) shows there, and in the figures

A run that fails is shown as "fails [k]", the reason under the table; the other figures are
still made (exit status 1 then). Every subprocess is stopped at exit, Ctrl-C included; each
run's data folders and logs go to a run-workers-* folder in --workdir, removed at exit unless
--keep (or a run failed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from cluster import check, expected_counts
from harness import (
    MiB,
    PROCS,
    REPO,
    BenchError,
    ensure_data,
    first_line,
    grid,
    log_tail,
    run_bench,
    say,
    tool,
)
from run import PATIENTS, STUDIES, Pacsd, check_data_args, machine, store

FIND_STUDIES = 40   # run.py's default: its cached images are these very files
NO_MOVE_PORT = 104  # run.py's config names a C-MOVE destination; nothing is moved here
# pacsd's log lines worth counting (pacsd.dimse.access, pacsd.dimse, pacsd.daemon.workers)
LOG_PATTERNS = {"warnings": re.compile(r" WARNING "), "errors": re.compile(r" ERROR "),
                "tracebacks": re.compile(r"^Traceback"),
                "refused_associations": re.compile(r"\) refused: "),
                "worker_died": re.compile(r"ended unexpectedly"),
                # more than one a run: run.py's Server.start tried again after a failed start
                "starts": re.compile(r" pacsd\.daemon[.\w]*: pacsd \S+ ready: ")}
# "association from AET (host) ended: 63 stored, 0 duplicate, 0 refused"
ENDED = re.compile(r"ended: (\d+) stored, (\d+) duplicate, (\d+) refused")


def cores() -> int:
    """The cores this process may run on (what pacsd's `workers = 0` counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# "DICOM listener PACSD on 127.0.0.1:4242, 2 worker processes (pids 101, 102)"
WORKER_PIDS = re.compile(r"(\d+) worker processes \(pids ([\d, ]+)\)")


def source_digest() -> str:
    """A digest of pacsd/'s Python files: a tree edited while the benchmark ran is said so."""
    h = hashlib.sha256()
    for path in sorted((REPO / "pacsd").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


class WorkerPacsd(Pacsd):
    """run.py's pacsd with `[dicom] workers`; memory and CPU summed over its process tree
    (the workers are its descendants, with whatever helps start them)."""

    tree = True

    def __init__(self, run_dir: Path, workers: int, keep: bool) -> None:
        super().__init__(run_dir, NO_MOVE_PORT, keep, dicom={"workers": workers})
        self.workers = workers
        self.name = f"pacsd-w{workers}"
        self.label = f"workers={workers}"

    def descendants(self) -> list[int]:
        import psutil
        assert self.proc is not None
        try:
            return sorted(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            return []

    def worker_pids(self) -> list[int]:
        """The workers, as the server names them in its log ([] without workers)."""
        found = WORKER_PIDS.findall(log_tail(self.log, 1 << 24))
        return [int(p) for p in found[-1][1].split(",")] if found else []

    def cpu_by_process(self, workers: list[int]) -> list[float]:
        """CPU seconds (user + system) so far of the server's other processes together (the
        server's own, and any helper such as a process the workers are forked from), then of
        each worker."""
        import psutil
        assert self.proc is not None

        def cpu(pid: int) -> float:
            try:
                t = psutil.Process(pid).cpu_times()
                return float(t.user + t.system)
            except psutil.Error:
                return 0.0
        others = [p for p in [self.proc.pid, *self.descendants()] if p not in workers]
        return [round(sum(map(cpu, others)), 2), *(round(cpu(p), 2) for p in workers)]

    def check_index(self, want: dict[str, int]) -> None:
        db = self.data / "index.sqlite3"
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
                check(conn, self.data / "storage", want)
        except sqlite3.Error as e:
            raise BenchError(f"index {db}: {e}") from None


def log_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """How many lines of a pacsd log match each of LOG_PATTERNS, the images its associations
    said they stored, took as duplicates and refused, and its first WARNING/ERROR lines
    (patient data is logged at DEBUG only)."""
    lines = log_tail(path, 1 << 30).splitlines()
    counts = {k: sum(bool(rx.search(line)) for line in lines) for k, rx in LOG_PATTERNS.items()}
    ended = [tuple(map(int, m.groups())) for line in lines if (m := ENDED.search(line))]
    counts["associations"] = len(ended)
    for i, key in enumerate(("stored", "duplicates", "refused_images")):
        counts[key] = sum(e[i] for e in ended)
    worst = [line.strip()[:300] for line in lines
             if " WARNING " in line or " ERROR " in line or line.startswith("Traceback")]
    return counts, worst[:5]


def one_run(s: WorkerPacsd, images: list[Path], image_dir: Path, assocs: int, logs: Path,
            tag: str, want: dict[str, int], timeout: float, mem: dict[str, Any]) -> float:
    """A fresh pacsd, `assocs` storescu side by side, every image checked; wall seconds."""
    metric = f"store_{assocs}"
    s.start(tag)
    assert s.sampler is not None and s.proc is not None
    tree = [s.proc.pid, *s.descendants()]
    mem["processes"].append(len(tree))
    mem["idle_pss"].append(s.sampler.pss())
    workers = s.worker_pids()
    expected = s.workers if s.workers > 1 else 0
    if len(workers) != expected or not set(workers) <= set(tree):
        mem["notes"].append(f"{tag}: pacsd's log names worker pids {workers}, expected "
                            f"{expected} in its process tree {tree}")
    os.sync()
    cpu0 = s.cpu_by_process(workers)
    with s.phase(metric):
        seconds = store(s, images, image_dir, assocs, logs, tag, timeout)
    cpu1 = s.cpu_by_process(workers)
    got = s.wait_stored(len(images))
    if got != len(images):   # every storescu exited 0: all acknowledged
        raise BenchError(f"{got} of {len(images)} images stored, all acknowledged")
    s.check_index(want)   # each image was indexed before its C-STORE was answered
    # How the run's work was shared out: the server's process, then each worker.
    mem["cpu_by_process"].setdefault(str(assocs), []).append(
        [round(b - a, 2) for a, b in zip(cpu0, cpu1)] if len(cpu0) == len(cpu1) else [])
    return seconds


def bench(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    digest = source_digest()
    load0 = round(os.getloadavg()[0], 2)
    series = args.images // (PATIENTS * STUDIES * args.series_images)
    images, _ = ensure_data(args.workdir, patients=PATIENTS, studies=STUDIES, series=series,
                            images=args.series_images, size=args.size,
                            find_studies=FIND_STUDIES)
    image_dir = images[0].parent
    want = expected_counts(images)
    mb = sum(p.stat().st_size for p in images) / 1e6
    timeout = max(600.0, args.images * 0.5)
    logs = run_dir / "logs"
    logs.mkdir()
    servers = [WorkerPacsd(run_dir, n, args.keep) for n in args.workers]
    values: dict[tuple[int, int], list[float]] = {}
    fails: dict[tuple[int, int], list[str]] = {}
    mem: dict[int, dict[str, Any]] = {n: {"processes": [], "idle_pss": [], "notes": [],
                                          "exit_codes": [], "stop_s": [],
                                          "cpu_by_process": {}}
                                      for n in args.workers}
    pacsd_log: dict[int, dict[str, int]] = {n: {} for n in args.workers}
    log_lines: dict[int, list[str]] = {n: [] for n in args.workers}
    for r in range(args.runs):
        for assocs in args.associations:
            for s in servers:
                k = (s.workers, assocs)
                tag = f"{assocs}-{r + 1}"
                say(f"run {r + 1}/{args.runs}: C-STORE {args.images} images into pacsd, "
                    f"workers={s.workers}, {assocs} association(s)")
                try:
                    seconds = one_run(s, images, image_dir, assocs, logs, tag, want, timeout,
                                      mem[s.workers])
                    values.setdefault(k, []).append(seconds)
                    say(f"  {args.images / seconds:.0f} img/s ({seconds:.2f} s)")
                except BenchError as e:
                    why = first_line(e)
                    if s.error_line():
                        why += f"; pacsd logged: {s.error_line()}"
                    fails.setdefault(k, []).append(f"run {r + 1}: {why}")
                    say(f"  failed: {why}")
                finally:
                    proc = s.proc
                    t0 = time.monotonic()
                    s.stop()
                    if proc is not None:
                        mem[s.workers]["exit_codes"].append(proc.returncode)
                        mem[s.workers]["stop_s"].append(round(time.monotonic() - t0, 2))
                    counts, lines = log_counts(s.log)
                    for key, n in counts.items():
                        pacsd_log[s.workers][key] = pacsd_log[s.workers].get(key, 0) + n
                    log_lines[s.workers] += [f"{tag}: {line}" for line in lines]
    cells: dict[str, dict[str, Any]] = {}
    for assocs in args.associations:
        base = None
        for n in args.workers:
            secs = values.get((n, assocs), [])
            rate = statistics.median(args.images / t for t in secs) if secs else None
            if n == 1:
                base = rate
            cells.setdefault(f"store_{assocs}", {})[str(n)] = {
                "value": round(rate, 1) if rate else None,
                "speedup": round(rate / base, 3) if rate and base else None,
                "runs": [round(args.images / t, 1) for t in secs],
                "seconds": [round(t, 3) for t in secs],
                "failures": fails.get((n, assocs), []), "attempted": args.runs}
    return {
        "run_dir": str(run_dir),
        "machine": {**machine(False), "cores": cores(), "cpu_model": cpu_model()},
        "params": {"images": args.images, "series_images": args.series_images,
                   "size": args.size, "runs": args.runs, "workers": args.workers,
                   "associations": args.associations, "all_cores": cores(),
                   "requested": args.requested},
        "images_mb": round(mb, 1), "series": series, "cells": cells,
        "load": {"before": load0, "after": round(os.getloadavg()[0], 2)},
        "memory": {str(s.workers): {
            "idle_pss_mb": round(statistics.median(mem[s.workers]["idle_pss"]) / MiB, 1)
            if mem[s.workers]["idle_pss"] else None,
            "idle_pss_mb_runs": [round(v / MiB, 1) for v in mem[s.workers]["idle_pss"]],
            "processes": sorted(set(mem[s.workers]["processes"])),
            "peak_rss_mb": {k: round(v / MiB, 1) for k, v in s.phase_rss.items()},
            "cpu_s_per_run": {k: round(v / max(1, s.phase_runs[k]), 3)
                              for k, v in s.phase_cpu.items()},
            "exit_codes": sorted(set(mem[s.workers]["exit_codes"]), key=str),
            "instances": len(mem[s.workers]["exit_codes"]),
            "stop_s_max": max(mem[s.workers]["stop_s"], default=None),
            "cpu_s_by_process": mem[s.workers]["cpu_by_process"],
            "notes": mem[s.workers]["notes"]} for s in servers},
        "pacsd_log": {str(n): c for n, c in pacsd_log.items()},
        "pacsd_log_lines": {str(n): v[:10] for n, v in log_lines.items()},
        "pacsd_source": {"before": digest, "after": source_digest()},
    }


def table(res: dict[str, Any]) -> str:
    p, m, cells, mem = res["params"], res["machine"], res["cells"], res["memory"]
    workers = [str(n) for n in p["workers"]]
    foot: list[str] = []

    def head(n: str) -> str:
        return f"workers={n}" + (" (all cores)" if int(n) == p["all_cores"] else "")

    def rate(c: dict[str, Any]) -> str:
        mark = ""
        if c["failures"]:
            foot.append(f"[{len(foot) + 1}] " + "; ".join(c["failures"]))
            mark = f" [{len(foot)}]"
        if c["value"] is None:
            return "fails" + mark
        up = f" ({c['speedup']:.2f}x)" if c["speedup"] is not None else ""
        return f"{c['value']:,.0f} img/s{up}{mark}"

    rows: list[tuple[str, ...]] = []
    for a in p["associations"]:
        row = cells[f"store_{a}"]
        rows.append((f"{a} association{'s' if a > 1 else ''}", *(rate(row[n]) for n in workers)))
    rows.append(("idle PSS, every pacsd process", *(
        f"{mem[n]['idle_pss_mb']:.0f} MiB ({'/'.join(map(str, mem[n]['processes']))} proc)"
        if mem[n]["idle_pss_mb"] is not None else "—" for n in workers)))

    def cpu(n: str, a: int) -> str:
        key = f"store_{a}"
        if key not in mem[n]["cpu_s_per_run"]:
            return "—"
        split = [r for r in mem[n]["cpu_s_by_process"].get(str(a), []) if r]
        parts = "+".join(f"{statistics.median(col):.1f}" for col in zip(*split)) \
            if split and len({len(r) for r in split}) == 1 else "?"
        return (f"{mem[n]['cpu_s_per_run'][key]:.1f} s"
                + (f" ({parts})" if int(n) > 1 else "")
                + f", {mem[n]['peak_rss_mb'][key]:.0f} MiB")
    cpu_rows = [(f"{a} association{'s' if a > 1 else ''}", *(cpu(n, a) for n in workers))
                for a in p["associations"]]
    git = m["git"]
    out = [(f"pacsd C-STORE by DICOM workers: {p['images']} CT images {p['size']}x{p['size']} "
            f"({res['images_mb']:.0f} MB; {PATIENTS} patients x {STUDIES} studies x "
            f"{res['series']} series x {p['series_images']}), a fresh pacsd each run, median of "
            f"{p['runs']} run(s); images/s (speed-up over workers=1)"),
           (f"machine: {m['cores']} cores usable (os.cpu_count {m['cpus']}), {m['cpu_model']}, "
            f"{m['platform']}; load {res['load']['before']} before, {res['load']['after']} "
            "after"),
           (f"Python {m['python']}, pynetdicom {m['pynetdicom']}, pydicom {m['pydicom']}, "
            f"DCMTK {m['dcmtk']}; pacsd at {git['commit'] or '?'}"
            + (f" + {len(git['pacsd_modified'])} uncommitted file(s) in pacsd/"
               if git["pacsd_modified"] else ""))]
    src = res["pacsd_source"]
    if src["before"] != src["after"]:
        out.append(f"WARNING: pacsd/ changed while the benchmark ran (sources {src['before']} "
                   f"-> {src['after']}): the runs did not all measure the same code")
    same = [n for n in p["requested"] if n != "all" and int(n) == p["all_cores"]]
    if "all" in p["requested"]:
        out.append(f"workers=all is {p['all_cores']} here (os.sched_getaffinity; pacsd's "
                   "default `workers = 0`)" + (f", the same as workers={same[0]}: one column"
                                                if same else ""))
    out += ["", *grid(("", *map(head, workers)), rows), *foot, "",
            "Server CPU seconds per run (process tree; with workers: the server's other "
            "processes + each worker, medians) and its peak RSS (process tree):",
            *grid(("", *map(head, workers)), cpu_rows), ""]
    for n in workers:
        lg, mm = res["pacsd_log"][n], mem[n]
        out.append(f"workers={n}: runs " + "; ".join(
            f"{a}: {cells[f'store_{a}'][n]['runs']}" for a in p["associations"])
            + f" img/s; pacsd exit codes {mm['exit_codes']}, slowest stop {mm['stop_s_max']} s;"
            f" log: {lg['warnings']} WARNING, {lg['errors']} ERROR, {lg['tracebacks']} "
            f"traceback(s), {lg['refused_associations']} association(s) refused, "
            f"{lg['worker_died']} worker(s) died, {lg['starts']} start(s) for "
            f"{mm['instances']} instance(s); {lg['associations']} associations said "
            f"{lg['stored']} stored, {lg['duplicates']} duplicate, {lg['refused_images']} "
            "refused")
        out += [f"    {line}" for line in mm["notes"] + res["pacsd_log_lines"][n]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 epilog="See the module docstring (or the top of this file).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,all",
                    help="comma-separated `[dicom] workers` counts; 'all': one per usable core "
                         "(default 1,2,all; counts that coincide are measured once)")
    ap.add_argument("--associations", default="1,4,16",
                    help="comma-separated numbers of storescu side by side (default 1,4,16)")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of each worker count and association count, each into a fresh "
                         "pacsd (default 3)")
    ap.add_argument("--images", type=int, default=1000,
                    help="images to store: 2 patients x 2 studies x series of --series-images "
                         "(default 1000)")
    ap.add_argument("--series-images", type=int, default=50, help="images per series (50)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data",
                    help="cache of generated images and run folders (default: <repo>/bench-data)")
    ap.add_argument("--keep", action="store_true",
                    help="keep this run's data folders and logs")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    n_cores = cores()
    try:
        args.requested = [w.strip() for w in args.workers.split(",") if w.strip()]
        args.workers = sorted({n_cores if w == "all" else int(w) for w in args.requested})
        args.associations = sorted({int(a) for a in args.associations.split(",") if a.strip()})
    except ValueError:
        ap.error("--workers: whole numbers or 'all'; --associations: whole numbers")
    if not args.workers or any(not 1 <= n <= 64 for n in args.workers):
        ap.error("--workers: each 1..64 (pacsd's bounds; 0 is what 'all' means)")
    if not args.associations or any(not 1 <= a <= 64 for a in args.associations):
        ap.error("--associations: each 1..64")
    check_data_args(ap, args)
    if not 1 <= args.runs <= 100:
        ap.error("--runs must be 1..100")
    args.workdir = args.workdir.expanduser().absolute()
    tool("storescu")
    if "all" in args.requested:
        say(f"workers=all: {n_cores} usable cores here (os.sched_getaffinity)")

    t0 = time.monotonic()
    failed = False

    def report(res: dict[str, Any]) -> None:
        nonlocal failed
        res["wall_s"] = round(time.monotonic() - t0, 1)
        failed = any(c["failures"] for row in res["cells"].values() for c in row.values())
        print(table(res))
        print(f"\n(benchmark wall time {res['wall_s'] / 60:.1f} min)")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        if failed and not args.keep:   # run_bench removes the run folder: its logs are the why
            kept = Path(res["run_dir"] + "-failed")
            shutil.copytree(res["run_dir"], kept)
            print(f"a run failed: its logs are kept in {kept}", file=sys.stderr)
    rc = run_bench(args.workdir, args.keep, "run-workers", lambda run_dir: bench(args, run_dir),
                   report, PROCS.stop_all)
    return 1 if rc == 0 and failed else rc


if __name__ == "__main__":
    sys.exit(main())
