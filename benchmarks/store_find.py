#!/usr/bin/env python3
"""Benchmark pacsd against DCMTK clients, with a bare DCMTK storescp as the ceiling.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/store_find.py                # 1000 CT images of 512x512
    .venv/bin/python benchmarks/store_find.py --images 200 --json results.json
    .venv/bin/python benchmarks/store_find.py --py-spy /tmp/pyspy-venv/bin/py-spy

What it measures (DCMTK command-line clients, TCP_NODELAY=1, 127.0.0.1 only):
  C-ECHO        echoscu round trip, median of --echo-runs (process start included)
  C-STORE       N images over one storescu association, and over 4 parallel associations
                (the files split in 4), each into a fresh pacsd and into a fresh `storescp -od`
                (the ceiling: no index, no fsync); --store-runs of each, interleaved, the page
                cache flushed (sync) before each; the median run is shown
  C-FIND        findscu, Study Root: STUDY level all studies, STUDY level one PatientID,
                IMAGE level one series; median of --find-runs
  C-GET         getscu of one series (N/4 images) into a temporary folder, median of
                --retrieve-runs
  C-MOVE        movescu of the same series to a separate storescp, median of --retrieve-runs
  pacsd         peak RSS (psutil, sampled every 20 ms) and CPU seconds per phase; counts of
                telling log lines (images converted on the way out, DIMSE messages lost to
                pynetdicom's reactor race, failed sub-operations)

Generated images are cached in --workdir (default: <repo>/bench-data, git-ignored) and reused
when the parameters match. Each run's pacsd data folders, logs and received files go to a
run-* folder there, removed at exit unless --keep. Every subprocess is stopped at exit,
Ctrl-C included. With --py-spy PATH, py-spy samples pacsd during each phase and the script
prints where pacsd spent its time (the figures of such a run are perturbed by the sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"
CACHE_VERSION = 1
SERIES_PER_STUDY = 4
PACSD_AET = "PACSD"
MOVE_AET = "MOVEDEST"
CEILING_AET = "STORESCP"
# Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 (see shared/PEERS.md).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
MiB = 1 << 20


class BenchError(Exception):
    """A measurement could not be made (a peer failed, a count is wrong, a timeout)."""


def tool(name: str) -> str:
    """DCMTK's own program: pynetdicom installs look-alikes named storescu etc. into venvs."""
    for folder in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"):
        path = Path(folder) / name
        if path.exists():
            return str(path)
    raise SystemExit(f"DCMTK's {name} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- subprocesses: every one registered, every one stopped ------------------------------------

class Procs:
    """Each child runs in its own session (its own process group: storescp --fork children
    included), so that a Ctrl-C reaches only us, and we stop them in order."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        with open(log, "ab") as out:
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env or PEER_ENV,
                                 start_new_session=True)
        self.live.append(p)
        return p

    @staticmethod
    def _killpg(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, p: subprocess.Popen, grace: float = 20.0) -> int | None:
        """SIGTERM the process (pacsd stops cleanly on it), SIGKILL its group after `grace`."""
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill(p)   # the leader if still there, and forked children
        return p.returncode

    def kill(self, p: subprocess.Popen) -> None:
        self._killpg(p, signal.SIGKILL)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.live)):
            self.stop(p, grace=10.0)


PROCS = Procs()


def run_clients(commands: list[list[str]], logs: list[Path], timeout: float) -> float:
    """Start the client commands together, wait for all; wall seconds. Raises BenchError.

    Each process is reaped by a thread blocked in waitpid(): Popen.wait(timeout) polls with
    sleeps of up to 50 ms, which would show up in every figure below 100 ms."""
    ends: dict[int, float] = {}

    def reap(p: subprocess.Popen) -> None:
        p.wait()
        ends[p.pid] = time.perf_counter()

    t0 = time.perf_counter()
    names = [Path(cmd[0]).name for cmd in commands]
    started = [PROCS.start(cmd, log) for cmd, log in zip(commands, logs, strict=True)]
    waiters = [threading.Thread(target=reap, args=(p,), daemon=True) for p in started]
    deadline = t0 + timeout
    try:
        for w in waiters:
            w.start()
        for name, w in zip(names, waiters, strict=True):
            w.join(max(0.0, deadline - time.perf_counter()))
            if w.is_alive():
                raise BenchError(f"{name} did not finish within {timeout:.0f} s")
        elapsed = max(ends.values()) - t0
    finally:
        for p in started:
            if p.poll() is None:
                PROCS.kill(p)
            elif p in PROCS.live:
                PROCS.live.remove(p)
    for name, p, log in zip(names, started, logs, strict=True):
        if p.returncode != 0:
            raise BenchError(f"{name} exited {p.returncode}:\n{log_tail(log)}")
    return elapsed


def run_client(cmd: list[str], log: Path, timeout: float) -> float:
    log.write_bytes(b"")
    return run_clients([cmd], [log], timeout)


def count_files(folder: Path, suffix: str | None = None) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        n += sum(1 for f in filenames if not f.startswith(".") and
                 (suffix is None or f.endswith(suffix)))
    return n


def wait_count(folder: Path, expected: int, suffix: str | None = None, timeout: float = 10.0
               ) -> int:
    """Receivers write each file before answering, but allow a short, bounded settle."""
    deadline = time.monotonic() + timeout
    n = count_files(folder, suffix)
    while n < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        n = count_files(folder, suffix)
    return n


# --- test data --------------------------------------------------------------------------------

def ensure_data(workdir: Path, n: int, size: int, find_studies: int
                ) -> tuple[list[Path], list[Path]]:
    """N images (1 patient x 1 study x 4 series) and `find_studies` one-image studies of other
    patients, generated once with tests/data.py and reused while the parameters match."""
    sys.path.insert(0, str(REPO / "tests"))
    from data import write_series  # tests/data.py

    key = {"version": CACHE_VERSION, "images": n, "size": size, "series": SERIES_PER_STUDY,
           "find_studies": find_studies}
    folder = workdir / f"ct-{n}x{size}-f{find_studies}"
    manifest = folder / "manifest.json"
    try:
        saved = json.loads(manifest.read_text())
        if saved["key"] == key:
            images = [folder / p for p in saved["images"]]
            extras = [folder / p for p in saved["extras"]]
            if all(p.is_file() for p in images + extras):
                print(f"reusing {len(images)} + {len(extras)} cached images in {folder}",
                      file=sys.stderr)
                return images, extras
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # Generate into a scratch folder and rename: an interrupted run leaves nothing reusable.
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".gen-"))
    try:
        t0 = time.perf_counter()
        print(f"generating {n} CT images of {size}x{size} (+{find_studies} for C-FIND) in "
              f"{folder} ...", file=sys.stderr)
        images = write_series(scratch / "images", seed=1, patients=1, studies=1,
                              series=SERIES_PER_STUDY, images=n // SERIES_PER_STUDY, size=size)
        extras = write_series(scratch / "find-extra", seed=2, patients=find_studies, studies=1,
                              series=1, images=1, size=size) if find_studies else []
        (scratch / "manifest.json").write_text(json.dumps({
            "key": key, "images": [str(p.relative_to(scratch)) for p in images],
            "extras": [str(p.relative_to(scratch)) for p in extras]}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        scratch.rename(folder)
        print(f"generated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return ensure_data(workdir, n, size, find_studies)


# --- pacsd: a subprocess, its RSS and CPU sampled ------------------------------------------------

class Sampler(threading.Thread):
    """Peak RSS of one process, overall and per named phase."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        import psutil
        self.proc = psutil.Process(pid)
        self.gone = (psutil.Error, OSError)
        self.interval = interval
        self.phase = "start"
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def sample(self) -> int:
        try:
            rss = self.proc.memory_info().rss
        except self.gone:
            return 0
        self.peak = max(self.peak, rss)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        return rss

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def cpu(self) -> float:
        try:
            t = self.proc.cpu_times()
            return float(t.user + t.system)
        except self.gone:
            return 0.0

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Pacsd:
    def __init__(self, root: Path, name: str, move_port: int | None, py_spy: str | None) -> None:
        self.name = name
        self.data = root / name
        self.config = root / f"{name}.toml"
        self.log = root / f"{name}.log"
        self.move_port = move_port
        self.py_spy = py_spy
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.sampler: Sampler | None = None
        self.phases: dict[str, dict[str, float]] = {}
        self.profiles: dict[str, Path] = {}

    def write_config(self) -> None:
        q = json.dumps   # a JSON string is a valid TOML basic string for these values
        lines = ["[server]", f"data = {q(str(self.data))}",
                 "[dicom]", f"aet = {q(PACSD_AET)}", "port = 0", f"bind = {q(LOCAL)}",
                 # Shorter than the defaults (120 s) so that a stalled C-MOVE sub-association
                 # costs the benchmark half a minute, not several.
                 "dimse_timeout = 30", "network_timeout = 60",
                 "[http]", "port = 0", f"bind = {q(LOCAL)}",
                 "[log]", 'file = "-"', 'level = "INFO"']
        if self.move_port:
            lines += ["[[nodes]]", 'name = "movedest"', f"aet = {q(MOVE_AET)}",
                      f"host = {q(LOCAL)}", f"port = {self.move_port}"]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> Pacsd:
        self.write_config()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        for k in [k for k in env if k.startswith("PACSD_")]:
            del env[k]   # only the benchmark's config counts
        self.proc = PROCS.start([sys.executable, "-m", "pacsd", "serve", "--config",
                                 str(self.config)], self.log, env=env)
        runfile = self.data / "pacsd.json"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"pacsd exited {self.proc.returncode}:\n{log_tail(self.log)}")
            try:
                info = json.loads(runfile.read_text())
                if info.get("pid") == self.proc.pid:
                    self.port = int(info["dicom_port"])
                    break
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"pacsd not ready after {timeout:.0f} s:\n{log_tail(self.log)}")
            time.sleep(0.05)
        self.sampler = Sampler(self.proc.pid)
        self.sampler.sample()
        self.phases["idle"] = {"rss_mb": self.sampler.peak / MiB}
        self.sampler.start()
        return self

    @contextmanager
    def phase(self, name: str) -> Iterator[dict[str, float]]:
        """CPU seconds, wall seconds and peak RSS of pacsd while the block runs."""
        assert self.sampler is not None and self.proc is not None
        spy = None
        if self.py_spy:
            out = self.root / f"profile-{self.name}--{name}.txt"
            spy = PROCS.start([self.py_spy, "record", "--pid", str(self.proc.pid), "--rate", "200",
                               "--format", "raw", "--output", str(out), "--nonblocking"],
                              self.root / f"py-spy-{self.name}-{name}.log", env=dict(os.environ))
            self.profiles[name] = out
            time.sleep(0.5)   # let py-spy attach
        figures: dict[str, float] = {}
        self.sampler.phase = name
        cpu0, t0 = self.sampler.cpu(), time.perf_counter()
        try:
            yield figures
        finally:
            figures["pacsd_cpu_s"] = self.sampler.cpu() - cpu0
            figures["pacsd_wall_s"] = time.perf_counter() - t0
            self.sampler.sample()
            figures["pacsd_peak_rss_mb"] = self.sampler.peaks.get(name, 0) / MiB
            self.sampler.phase = "between"
            self.phases[name] = dict(figures)
            if spy is not None:
                spy.send_signal(signal.SIGINT)   # py-spy writes its output on SIGINT
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                PROCS.stop(spy, grace=1)

    def stored(self) -> int:
        return count_files(self.data / "storage", ".dcm")

    def stop(self) -> dict[str, Any]:
        peak = 0.0
        if self.sampler is not None:
            self.sampler.stop()
            peak = self.sampler.peak / MiB
        rc = PROCS.stop(self.proc) if self.proc is not None else None
        if rc not in (0, None):
            print(f"warning: pacsd {self.name} exited {rc}; log {self.log}", file=sys.stderr)
        return {"peak_rss_mb": peak, "phases": self.phases}


class StoreSCP:
    """A bare DCMTK storescp -od: the C-STORE ceiling, and the C-MOVE destination."""

    def __init__(self, root: Path, name: str, aet: str, fork: bool, port: int | None = None
                 ) -> None:
        self.out = root / name
        self.log = root / f"{name}.log"
        self.aet, self.fork, self.port = aet, fork, port or 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):   # a port picked free may be taken before storescp binds it
            port = self.port or free_port()
            cmd = [tool("storescp"), *(["--fork"] if self.fork else []), "-aet", self.aet,
                   "-od", str(self.out), str(port)]
            self.proc = PROCS.start(cmd, self.log)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                probe = subprocess.run([tool("echoscu"), "-to", "2", "-ta", "2", "-aec", self.aet,
                                        LOCAL, str(port)], env=PEER_ENV, capture_output=True,
                                       timeout=10, check=False)
                if probe.returncode == 0:
                    self.port = port
                    return self
                time.sleep(0.05)
            PROCS.stop(self.proc, grace=2)
            if self.port:   # a fixed port (the move destination's) is not retried elsewhere
                break
        raise BenchError(f"storescp did not start:\n{log_tail(self.log)}")

    def received(self) -> int:
        return count_files(self.out)

    def clear(self) -> None:
        for entry in os.scandir(self.out):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)

    def stop(self) -> None:
        if self.proc is not None:
            PROCS.stop(self.proc, grace=5)


# --- the measurements -------------------------------------------------------------------------

def echo_ms(port: int, aet: str, runs: int, log: Path) -> float:
    times = []
    for _ in range(runs):
        times.append(run_client([tool("echoscu"), "-to", "10", "-aet", "BENCH", "-aec", aet,
                                 LOCAL, str(port)], log, timeout=30))
    return statistics.median(times) * 1000


def store(port: int, aet: str, images: list[Path], image_dir: Path, assocs: int, logs: Path,
          timeout: float) -> float:
    """Wall seconds to C-STORE `images` with `assocs` storescu processes side by side."""
    if assocs == 1:
        # One association, the folder scanned for *.dcm only.
        commands = [[tool("storescu"), "-aet", "BENCH", "-aec", aet, "+sd", "+r", "+sp", "*.dcm",
                     LOCAL, str(port), str(image_dir)]]
    else:
        k = -(-len(images) // assocs)
        chunks = [images[i:i + k] for i in range(0, len(images), k)]
        commands = [[tool("storescu"), "-aet", f"BENCH{i + 1}", "-aec", aet, LOCAL, str(port),
                     *map(str, chunk)] for i, chunk in enumerate(chunks)]
    names = [logs.with_name(f"{logs.name}-{i + 1}.log") for i in range(len(commands))]
    return run_clients(commands, names, timeout)


FIND_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
             "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
             "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]


def find(port: int, level: str, keys: dict[str, str], runs: int, expected: int, log: Path,
         ) -> float:
    """Median wall ms of `findscu -S`; the number of matches is checked on every run."""
    cmd = [tool("findscu"), "-v", "-S", "-aet", "BENCH", "-aec", PACSD_AET,
           "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}" if v else k]
    cmd += [LOCAL, str(port)]
    times = []
    for _ in range(runs):
        times.append(run_client(cmd, log, timeout=120))
        matches = log.read_text(errors="replace").count("(Pending)")
        if matches != expected:
            raise BenchError(f"C-FIND {level} {keys}: {matches} match(es), expected {expected}:\n"
                             f"{log_tail(log)}")
    return statistics.median(times) * 1000


def series_keys(path: Path) -> dict[str, str]:
    from pydicom import dcmread
    ds = dcmread(path, stop_before_pixels=True)
    return {"StudyInstanceUID": str(ds.StudyInstanceUID),
            "SeriesInstanceUID": str(ds.SeriesInstanceUID)}


def retrieve_cmd(verb: str, port: int, keys: dict[str, str], out: Path | None) -> list[str]:
    cmd = [tool("getscu" if verb == "get" else "movescu"), "-S", "-aet", "BENCH",
           "-aec", PACSD_AET, "-k", "QueryRetrieveLevel=SERIES"]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}"]
    if verb == "get":
        assert out is not None
        cmd += ["-od", str(out)]
    else:
        cmd += ["-aem", MOVE_AET]
    return cmd + [LOCAL, str(port)]


# --- py-spy output: where pacsd spent its samples -----------------------------------------------

def _area(frame: str) -> str:
    path = frame.rsplit("(", 1)[-1]
    for needle, label in (("pacsd/", "pacsd"), ("pynetdicom/", "pynetdicom"),
                          ("pydicom/", "pydicom"), ("peewee", "peewee/sqlite3"),
                          ("sqlite3", "peewee/sqlite3")):
        if needle in path:
            return label
    return "stdlib/other"


def summarize_profile(paths: list[Path], top: int = 12) -> dict[str, Any]:
    """Self samples per function and per package, and inclusive samples of chosen pacsd steps."""
    self_fn: Counter[str] = Counter()
    self_area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    lines: list[str] = []
    for path in paths:
        try:
            lines += path.read_text(errors="replace").splitlines()
        except OSError:
            pass
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        name = leaf.rsplit(":", 1)[0] + ")" if ":" in leaf else leaf
        self_fn[name] += n
        self_area[_area(leaf)] += n
        for fn_name in {f"{_area(f)}: " + f.split(" (", 1)[0] + " (" +
                        f.rsplit("(", 1)[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                        for f in frames}:
            inclusive[fn_name] += n
    if not total:
        return {}
    return {"samples": total,
            "self_by_package": {k: round(100 * v / total, 1) for k, v in self_area.most_common()},
            "self_top": [(k, round(100 * v / total, 1)) for k, v in self_fn.most_common(top)],
            "inclusive_top": [(k, round(100 * v / total, 1))
                              for k, v in inclusive.most_common(top + 10)],
            "inclusive_pacsd": [(k.split(": ", 1)[1], round(100 * v / total, 1))
                                for k, v in inclusive.most_common()
                                if k.startswith("pacsd: ")][:top]}


# --- the run ----------------------------------------------------------------------------------

# pacsd log lines worth counting: each says something about the figures above it.
LOG_EVENTS = {
    "converted": ("No presentation context for",
                  ("sends refused by pynetdicom for want of a context with the stored transfer "
                   "syntax (the image was then decoded and converted, or failed)")),
    "unexpected": ("Received unexpected",
                   ("DIMSE responses taken by the wrong thread (pynetdicom reactor race): the "
                    "sub-operation then waits for the DIMSE timeout")),
    "suboperation_failed": ("sub-operation failed", "C-STORE sub-operations that failed"),
    "errors": (" ERROR ", "ERROR lines in total"),
}


def log_events(paths: list[Path]) -> dict[str, int]:
    counts = dict.fromkeys(LOG_EVENTS, 0)
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for key, (needle, _) in LOG_EVENTS.items():
            counts[key] += text.count(needle)
    return counts


def dcmtk_version() -> str:
    try:
        out = subprocess.run([tool("storescu"), "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.split(" v", 1)[1].split()[0] if " v" in out else out.strip()[:40]


def git_state() -> dict[str, Any]:
    """The commit measured, and whether pacsd/ differs from it (a dirty tree is measured)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "pacsd_modified": git("status", "--porcelain", "--", "pacsd").splitlines()}


def bench(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import psutil
    import pydicom
    import pynetdicom

    images, extras = ensure_data(args.workdir, args.images, args.size, args.find_studies)
    image_dir = images[0].parent
    extra_dir = extras[0].parent if extras else None
    mb = sum(p.stat().st_size for p in images) / MiB
    per_series = args.images // SERIES_PER_STUDY
    target = series_keys(images[0])
    logs = run_dir / "logs"
    logs.mkdir()
    timeout = max(600.0, args.images * 0.5)
    res: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "dcmtk": dcmtk_version(), "pynetdicom": pynetdicom.__version__,
                    "pydicom": pydicom.__version__, "psutil": psutil.__version__,
                    "profiled": bool(args.py_spy), "git": git_state()},
        "images": args.images, "size": args.size, "images_mb": round(mb, 1),
        "series_images": per_series, "studies": 1 + len(extras),
    }

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def throughput(seconds: float, n: int) -> dict[str, float]:
        return {"seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
                "mb_per_s": round(n * mb / args.images / seconds, 1)}

    def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The run with the median wall time (the lower one of an even count), plus all times."""
        pick = statistics.median_low(r["seconds"] for r in runs)
        chosen = next(r for r in runs if r["seconds"] == pick)
        return {**chosen, "runs_s": [r["seconds"] for r in runs]}

    # The C-MOVE destination lives for the whole run: its port goes into pacsd's [[nodes]].
    move_dest = StoreSCP(run_dir, "move-dest", MOVE_AET, fork=False).start()
    ceiling: dict[str, Any] = {}
    pb: dict[str, Any] = {}
    store_runs: dict[str, list[dict[str, Any]]] = {"store_1": [], "store_4": []}
    ceiling_runs: dict[str, list[dict[str, Any]]] = {"store_1": [], "store_4": []}
    processes: list[dict[str, Any]] = []
    server: Pacsd | None = None
    try:
        # --- C-STORE: storescp (the ceiling) and a fresh pacsd, side by side, run after run ---
        # The page cache is flushed (sync) before each timed run, so that one run's dirty pages
        # are not written back during the next.
        for r in range(args.store_runs):
            for assocs in (1, 4):
                key = f"store_{assocs}"
                tag = f"{assocs}-{r + 1}"
                scp = StoreSCP(run_dir, f"storescp-{tag}", CEILING_AET, fork=True).start()
                try:
                    if "echo_ms" not in ceiling:
                        say("C-ECHO storescp")
                        ceiling["echo_ms"] = round(echo_ms(scp.port, CEILING_AET, args.echo_runs,
                                                           logs / "echo-storescp.log"), 2)
                    say(f"run {r + 1}/{args.store_runs}: C-STORE {args.images} images into "
                        f"storescp, {assocs} association(s)")
                    os.sync()
                    seconds = store(scp.port, CEILING_AET, images, image_dir, assocs,
                                    logs / f"store-storescp-{tag}", timeout)
                    got = wait_count(scp.out, args.images)
                    if got != args.images:
                        raise BenchError(f"storescp received {got} of {args.images} images")
                    ceiling_runs[key].append(throughput(seconds, args.images))
                finally:
                    scp.stop()
                    if not args.keep:
                        shutil.rmtree(scp.out, ignore_errors=True)

                server = Pacsd(run_dir, f"pacsd-{tag}", move_dest.port, args.py_spy).start()
                try:
                    if "echo_ms" not in pb:
                        say(f"pacsd ready on port {server.port}: C-ECHO")
                        with server.phase("echo") as ph:
                            pb["echo_ms"] = round(echo_ms(server.port, PACSD_AET, args.echo_runs,
                                                          logs / "echo-pacsd.log"), 2)
                        pb["echo_phase"] = ph
                    say(f"run {r + 1}/{args.store_runs}: C-STORE {args.images} images into "
                        f"pacsd, {assocs} association(s)")
                    os.sync()
                    with server.phase(key) as ph:
                        seconds = store(server.port, PACSD_AET, images, image_dir, assocs,
                                        logs / f"store-pacsd-{tag}", timeout)
                    got = server.stored()
                    if got != args.images:
                        raise BenchError(f"pacsd stored {got} of {args.images} images:\n"
                                         f"{log_tail(server.log)}")
                    store_runs[key].append({**throughput(seconds, args.images), **ph})
                finally:
                    # The last pacsd (N images over 4 associations) stays up for the rest.
                    if not (r == args.store_runs - 1 and assocs == 4):
                        processes.append(server.stop())
                        if not args.keep:
                            shutil.rmtree(server.data, ignore_errors=True)
                        server = None
        for key in ("store_1", "store_4"):
            ceiling[key] = median_run(ceiling_runs[key])
            pb[key] = median_run(store_runs[key])
        res["storescp"] = ceiling
        assert server is not None

        # --- the last pacsd: C-FIND, C-GET, C-MOVE ------------------------------------------
        if extra_dir is not None:
            say(f"storing {len(extras)} more studies for C-FIND (not timed)")
            store(server.port, PACSD_AET, extras, extra_dir, 1, logs / "store-extra", timeout)
            if server.stored() != args.images + len(extras):
                raise BenchError(f"pacsd holds {server.stored()} images, expected "
                                 f"{args.images + len(extras)}")

        say("C-FIND")
        studies = 1 + len(extras)
        queries = [
            ("find_study_all", "STUDY", {**{k: "" for k in FIND_KEYS}}, studies),
            ("find_study_patient_id", "STUDY", {**{k: "" for k in FIND_KEYS},
                                                "PatientID": "PID1-001"}, 1),
            ("find_image_series", "IMAGE", {**target, "SOPInstanceUID": "", "InstanceNumber": "",
                                            "SOPClassUID": ""}, per_series),
        ]
        for name, level, keys, expected in queries:
            with server.phase(name) as ph:
                ms = find(server.port, level, keys, args.find_runs, expected,
                          logs / f"{name}.log")
            pb[name] = {"median_ms": round(ms, 2), "matches": expected, **ph}

        # A failed retrieve run is recorded, not fatal: the other figures still get printed.
        for verb, label in (("get", "C-GET of one series"),
                            ("move", "C-MOVE of the same series to a storescp")):
            say(f"{label} ({per_series} images), {args.retrieve_runs} run(s)")
            times, failures = [], []
            with server.phase(verb) as ph:
                for i in range(args.retrieve_runs):
                    log = logs / f"{verb}-{i}.log"
                    if verb == "get":
                        out = run_dir / f"get-{i}"
                        out.mkdir()
                    else:
                        move_dest.clear()
                        out = move_dest.out
                    try:
                        seconds = run_client(retrieve_cmd(verb, server.port, target,
                                                          out if verb == "get" else None),
                                             log, args.retrieve_timeout)
                        got = wait_count(out, per_series)
                        if got != per_series:
                            raise BenchError(f"{got} of {per_series} images arrived")
                        times.append(seconds)
                    except BenchError as e:
                        got = count_files(out)
                        failures.append(f"run {i + 1}: {str(e).strip().splitlines()[0]} "
                                        f"({got} of {per_series} arrived)")
                        say(f"{verb} run {i + 1} failed: {failures[-1]}")
                    finally:
                        if verb == "get" and not args.keep:
                            shutil.rmtree(out, ignore_errors=True)
            pb[verb] = {**(throughput(statistics.median(times), per_series) if times else
                           {"seconds": None, "images_per_s": None, "mb_per_s": None}),
                        "runs_s": [round(t, 3) for t in times], "failures": failures, **ph}
    finally:
        if server is not None:
            processes.append(server.stop())
        move_dest.stop()

    res["pacsd"] = {**pb,
                    "peak_rss_mb": round(max(p["peak_rss_mb"] for p in processes), 1),
                    "idle_rss_mb": round(processes[0]["phases"]["idle"]["rss_mb"], 1),
                    "processes": processes,
                    "log_events": log_events(sorted(run_dir.glob("pacsd-*.log")))}

    if args.py_spy:
        res["profiles"] = {}
        by_phase: dict[str, list[Path]] = {}
        for f in sorted(run_dir.glob("profile-*.txt")):
            by_phase.setdefault(f.stem.rsplit("--", 1)[1], []).append(f)
        for phase, files in by_phase.items():
            summary = summarize_profile(files)
            if summary:
                res["profiles"][phase] = summary
    return res


def fmt(v: float | None, unit: str, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f} {unit}"


def table(res: dict[str, Any]) -> str:
    p, c = res["pacsd"], res["storescp"]
    n, s = res["images"], res["series_images"]
    rows: list[tuple[str, str, str, str, str]] = []

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "—"

    def cpu(ph: dict[str, Any]) -> str:
        wall = ph.get("pacsd_wall_s") or 0
        return (f"{ph['pacsd_cpu_s']:.1f} s ({100 * ph['pacsd_cpu_s'] / wall:.0f}%), "
                f"{ph['pacsd_peak_rss_mb']:.0f} MiB") if wall else ""

    rows.append(("C-ECHO round trip (median)", fmt(p["echo_ms"], "ms"), fmt(c["echo_ms"], "ms"),
                 ratio(p["echo_ms"], c["echo_ms"]), ""))
    runs = len(p["store_1"]["runs_s"])
    for k, name in (("store_1", f"C-STORE {n} img, 1 association"),
                    ("store_4", f"C-STORE {n} img, 4 associations")):
        label = name + (f" (median of {runs})" if runs > 1 else "")
        rows.append((label, fmt(p[k]["images_per_s"], "img/s"), fmt(c[k]["images_per_s"], "img/s"),
                     ratio(p[k]["images_per_s"], c[k]["images_per_s"]), cpu(p[k])))
        rows.append(("  wall time / data rate",
                     f"{p[k]['seconds']:.2f} s / {p[k]['mb_per_s']:.0f} MB/s",
                     f"{c[k]['seconds']:.2f} s / {c[k]['mb_per_s']:.0f} MB/s", "", ""))
    for k, label in (("find_study_all", f"C-FIND STUDY, all ({p['find_study_all']['matches']})"),
                     ("find_study_patient_id", "C-FIND STUDY, one PatientID (1)"),
                     ("find_image_series", f"C-FIND IMAGE, one series ({s})")):
        rows.append((label + " median", fmt(p[k]["median_ms"], "ms"), "", "", cpu(p[k])))
    for k, label in (("get", f"C-GET series of {s} (median)"),
                     ("move", f"C-MOVE series of {s} -> storescp")):
        runs = len(p[k]["runs_s"]) + len(p[k]["failures"])
        extra = (f"; {p[k]['seconds']:.2f} s" if p[k]["seconds"] is not None else "")
        if p[k]["failures"]:
            extra += f"; {len(p[k]['failures'])} of {runs} runs FAILED"
        rows.append((label, fmt(p[k]["images_per_s"], "img/s"), "", "", cpu(p[k]) + extra))
    rows.append(("pacsd RSS: idle / peak", f"{p['idle_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} MiB",
                 "", "", ""))
    head = ("", "pacsd", "storescp -od", "ratio", "pacsd CPU (% of wall), peak RSS")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    def line(r: tuple[str, ...]) -> str:
        return "  ".join(r[i].ljust(widths[i]) if i in (0, 4) else r[i].rjust(widths[i])
                         for i in range(5))
    m = res["machine"]
    out = [f"pacsd benchmark: {n} CT images {res['size']}x{res['size']} "
           f"({res['images_mb']:.0f} MiB), {res['studies']} studies; {m['cpus']} CPUs, "
           f"Python {m['python']}, DCMTK {m['dcmtk']}, pynetdicom {m['pynetdicom']}"
           + ("  [PROFILED with py-spy: figures perturbed]" if m["profiled"] else ""),
           f"pacsd at {m['git']['commit'] or '?'}" + (
               f" with {len(m['git']['pacsd_modified'])} uncommitted file(s) in pacsd/"
               if m["git"]["pacsd_modified"] else ""),
           "", line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    out.append("")
    out.append("ratio = pacsd / storescp (throughput; for C-ECHO, time). Client wall times "
               "include starting the DCMTK process.")
    for k in ("get", "move"):
        for f in p[k]["failures"]:
            out.append(f"{k.upper()} {f}")
    for key, n in p.get("log_events", {}).items():
        if n and key != "errors":
            out.append(f"pacsd log: {n} x {LOG_EVENTS[key][1]}")
    for phase, prof in res.get("profiles", {}).items():
        out.append("")
        out.append(f"py-spy, {phase}: {prof['samples']} samples; self time by package: " +
                   ", ".join(f"{k} {v}%" for k, v in prof["self_by_package"].items()))
        for name, pct in prof["self_top"][:8]:
            out.append(f"    self {pct:5.1f}%  {name}")
        out.append("    in pacsd's own functions (inclusive): " + ", ".join(
            f"{name} {pct}%" for name, pct in prof["inclusive_pacsd"][:6]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000,
                    help="images to store (a multiple of 4: one study of 4 series)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data",
                    help="cache of generated images and run folders (default: <repo>/bench-data)")
    ap.add_argument("--keep", action="store_true",
                    help="keep this run's pacsd data folders, logs and received files")
    ap.add_argument("--json", metavar="FILE",
                    help="also write the figures as JSON to FILE ('-': JSON on stdout instead "
                         "of the table)")
    ap.add_argument("--find-studies", type=int, default=40,
                    help="extra one-image studies (other patients) for C-FIND (default 40)")
    ap.add_argument("--store-runs", type=int, default=3,
                    help="C-STORE runs of each kind, each into a fresh server (default 3)")
    ap.add_argument("--echo-runs", type=int, default=20)
    ap.add_argument("--find-runs", type=int, default=20)
    ap.add_argument("--retrieve-runs", type=int, default=5, help="C-GET and C-MOVE runs each")
    ap.add_argument("--retrieve-timeout", type=float, default=300.0,
                    help="seconds one getscu/movescu run may take (default 300)")
    ap.add_argument("--py-spy", metavar="PATH",
                    help="py-spy program: profile pacsd during each phase (perturbs figures)")
    args = ap.parse_args(argv)
    if args.images < SERIES_PER_STUDY or args.images % SERIES_PER_STUDY:
        ap.error(f"--images must be a positive multiple of {SERIES_PER_STUDY}")
    if not 8 <= args.size <= 4096:
        ap.error("--size must be 8..4096")
    for k in ("store_runs", "echo_runs", "find_runs", "retrieve_runs"):
        if not 1 <= getattr(args, k) <= 1000:
            ap.error(f"--{k.replace('_', '-')} must be 1..1000")
    if args.find_studies < 0 or args.find_studies > 999:
        ap.error("--find-studies must be 0..999")
    args.workdir = args.workdir.expanduser().absolute()
    if args.py_spy and not shutil.which(args.py_spy):
        ap.error(f"py-spy program {args.py_spy!r} not found")
    for name in ("storescu", "storescp", "echoscu", "findscu", "getscu", "movescu"):
        tool(name)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(dir=args.workdir,
                                    prefix=f"run-{time.strftime('%Y%m%d-%H%M%S')}-"))
    rc = 0
    try:
        res = bench(args, run_dir)
        if args.json == "-":
            print(json.dumps(res, indent=1))
        else:
            print(table(res))
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        rc = 130
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        rc = 1
    finally:
        PROCS.stop_all()
        if args.keep or rc == 1:   # a failed run keeps its logs
            print(f"run folder kept: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
