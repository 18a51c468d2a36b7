"""What the comparative benchmarks share: subprocesses that are always stopped, DCMTK clients
timed without polling delays, cached test images, RSS/CPU sampling of a server's process tree,
py-spy summaries and a description of the machine measured.

Not a benchmark itself; `benchmarks/run.py` imports it (benchmarks/ is on sys.path when a
script in it runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOCAL = "127.0.0.1"
# Debian's DCMTK (and Orthanc, which links it) leaves Nagle's algorithm on unless
# TCP_NODELAY=1 (see shared/PEERS.md).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
MiB = 1 << 20
CACHE_VERSION = 2


class BenchError(Exception):
    """A measurement could not be made (a peer failed, a count is wrong, a timeout)."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def tool(name: str) -> str:
    """DCMTK's own program: pynetdicom installs look-alikes named storescu etc. into venvs."""
    for folder in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"):
        path = Path(folder) / name
        if path.exists():
            return str(path)
    raise SystemExit(f"DCMTK's {name} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    """A port free on 127.0.0.1 now (it may be taken before the server binds it: callers retry)."""
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
    """Each child runs in its own session (its own process group: forked children included),
    so that a Ctrl-C reaches only us, and we stop them in order."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env or PEER_ENV,
                                 start_new_session=True, cwd=cwd)
        self.live.append(p)
        return p

    @staticmethod
    def _killpg(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, p: subprocess.Popen, grace: float = 20.0) -> int | None:
        """SIGTERM the process (pacsd and Orthanc stop cleanly on it), SIGKILL its group after
        `grace` seconds."""
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


def wait_pacsd(proc: subprocess.Popen, data: Path, timeout: float, log: Path
               ) -> dict[str, Any]:
    """Wait until `pacsd serve` (proc) names itself in <data>/pacsd.json: its run file, with
    the ports it took (ports 0). Raises BenchError if it exits or `timeout` passes first."""
    runfile = data / "pacsd.json"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"pacsd exited {proc.returncode}:\n{log_tail(log)}")
        try:
            info = json.loads(runfile.read_text())
            if info.get("pid") == proc.pid:
                return info
        except (OSError, ValueError, AttributeError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"pacsd not ready after {timeout:.0f} s:\n{log_tail(log)}")
        time.sleep(0.005)


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
            why = dcmtk_error(log)
            raise BenchError(f"{name} exited {p.returncode}" + (f": {why}" if why else ""))
    return elapsed


def run_client(cmd: list[str], log: Path, timeout: float) -> float:
    log.write_bytes(b"")
    return run_clients([cmd], [log], timeout)


def dcmtk_error(log: Path) -> str:
    """The telling line of a DCMTK client's log (its first E: or F: line), else its end."""
    text = log_tail(log, 20000)
    for line in text.splitlines():
        if line.startswith(("E:", "F:")):
            return line
    return text.strip()[-300:]


def count_files(folder: Path, suffix: str | None = None, exclude: tuple[str, ...] = ()) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        n += sum(1 for f in filenames if not f.startswith(".") and f not in exclude and
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

def ensure_data(workdir: Path, *, patients: int, studies: int, series: int, images: int,
                size: int, find_studies: int) -> tuple[list[Path], list[Path]]:
    """patients x studies x series x images CT slices (tests/data.py, seed 1), and
    `find_studies` one-image studies of other patients (seed 2); generated once into
    `workdir` and reused while the parameters match."""
    sys.path.insert(0, str(REPO / "tests"))
    from data import write_series  # tests/data.py

    layout = {"patients": patients, "studies": studies, "series": series, "images": images}
    key = {"version": CACHE_VERSION, **layout, "size": size, "find_studies": find_studies}
    folder = workdir / f"ct-{patients}x{studies}x{series}x{images}-{size}-f{find_studies}"
    manifest = folder / "manifest.json"
    try:
        saved = json.loads(manifest.read_text())
        if saved["key"] == key:
            main = [folder / p for p in saved["images"]]
            extras = [folder / p for p in saved["extras"]]
            if all(p.is_file() for p in main + extras):
                say(f"reusing {len(main)} + {len(extras)} cached images in {folder}")
                return main, extras
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # Generate into a scratch folder and rename: an interrupted run leaves nothing reusable.
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".gen-"))
    try:
        t0 = time.perf_counter()
        total = patients * studies * series * images
        say(f"generating {total} CT images of {size}x{size} (+{find_studies} for C-FIND) "
            f"in {folder} ...")
        main = write_series(scratch / "images", seed=1, size=size, **layout)
        extras = write_series(scratch / "find-extra", seed=2, patients=find_studies, studies=1,
                              series=1, images=1, size=size) if find_studies else []
        (scratch / "manifest.json").write_text(json.dumps({
            "key": key, "images": [str(p.relative_to(scratch)) for p in main],
            "extras": [str(p.relative_to(scratch)) for p in extras]}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        scratch.rename(folder)
        say(f"generated in {time.perf_counter() - t0:.1f} s")
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return ensure_data(workdir, patients=patients, studies=studies, series=series,
                       images=images, size=size, find_studies=find_studies)


# --- a server's memory and CPU ----------------------------------------------------------------

class Sampler(threading.Thread):
    """Peak RSS of one process (with `tree`, the sum over it and its descendants: servers that
    fork per association), overall and per named phase; CPU seconds on demand."""

    def __init__(self, pid: int, tree: bool = False, interval: float = 0.02) -> None:
        super().__init__(name=f"rss-{pid}", daemon=True)
        import psutil
        self.psutil = psutil
        self.proc = psutil.Process(pid)
        self.tree = tree
        self.interval = interval
        self.phase = "start"
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self._halt = threading.Event()

    def _procs(self) -> list[Any]:
        if not self.tree:
            return [self.proc]
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except self.psutil.Error:
            return [self.proc]

    def sample(self) -> int:
        rss = 0
        for p in self._procs():
            try:
                rss += p.memory_info().rss
            except (self.psutil.Error, OSError):
                pass
        self.peak = max(self.peak, rss)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        return rss

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def pss(self) -> int:
        """Proportional set size summed over the process (tree): pages shared between its
        processes (a pre-fork server's workers) count once. 0 where the system has no PSS."""
        total = 0
        for p in self._procs():
            try:
                total += getattr(p.memory_full_info(), "pss", 0)
            except (self.psutil.Error, OSError):
                pass
        return total

    def cpu(self) -> float:
        """User + system seconds of the process; with `tree`, plus its reaped children's and
        its live descendants'."""
        total = 0.0
        for i, p in enumerate(self._procs()):
            try:
                t = p.cpu_times()
            except (self.psutil.Error, OSError):
                continue
            total += t.user + t.system
            if self.tree and i == 0:
                total += t.children_user + t.children_system
        return total

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


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
    """Self samples per function and per package, and inclusive samples of pacsd's steps."""
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


def profile_lines(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """The py-spy summaries, phase by phase, as printed under the table."""
    out: list[str] = []
    for phase, prof in profiles.items():
        out.append("")
        out.append(f"py-spy, {phase}: {prof['samples']} samples; self time by package: " +
                   ", ".join(f"{k} {v}%" for k, v in prof["self_by_package"].items()))
        for name, pct in prof["self_top"][:8]:
            out.append(f"    self {pct:5.1f}%  {name}")
        out.append("    in pacsd's own functions (inclusive): " + ", ".join(
            f"{name} {pct}%" for name, pct in prof["inclusive_pacsd"][:6]))
    return out


# --- the machine measured -----------------------------------------------------------------------

def _output(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def dcmtk_version() -> str:
    out = _output([tool("storescu"), "--version"])
    return out.split(" v", 1)[1].split()[0] if " v" in out else (out.strip()[:40] or "?")


def package_version(name: str) -> str:
    """An installed Debian package's version ('' if not installed or not Debian)."""
    return _output(["dpkg-query", "-W", "-f", "${Version}", name]).strip()


def git_state() -> dict[str, Any]:
    """The commit measured, and whether pacsd/ differs from it (a dirty tree is measured)."""
    def git(*a: str) -> str:
        return _output(["git", "-C", str(REPO), *a]).strip()
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "pacsd_modified": git("status", "--porcelain", "--", "pacsd").splitlines()}


def interrupt_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so that `finally` stops every child.
    SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that."""
    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def run_bench(workdir: Path, keep: bool, prefix: str, bench: Callable[[Path], Any],
              report: Callable[[Any], None], cleanup: Callable[[], None]) -> int:
    """Run `bench(run_dir)` in a new run folder under `workdir`, `report` its result; stop
    every child (`cleanup`) whatever happens. The exit code: 0, 1 (a measurement failed: the
    run folder is kept for its logs) or 130 (interrupted)."""
    interrupt_on_signals()
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(dir=workdir,
                                    prefix=f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-"))
    rc = 0
    try:
        report(bench(run_dir))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        rc = 130
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        rc = 1
    finally:
        cleanup()
        if keep or rc == 1:
            print(f"run folder kept: {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return rc


# --- pacsd on a data folder of its own, any index, any storage ----------------------------------

class Pacsd:
    """`pacsd serve` on a data folder of its own (root/name), ports 0, stopped with SIGTERM.

    index: an SQLite index file copied in before the start (every run starts from the same
    rows); index_url: `[index] url` instead (PostgreSQL); storage: `[storage] path` (a folder
    several nodes share) instead of <data>/storage."""

    def __init__(self, root: Path, name: str, index: Path | None = None, *,
                 index_url: str = "", storage: Path | None = None, aet: str = "PACSD") -> None:
        self.name = name
        self.data = root / name
        self.config = root / f"{name}.toml"
        self.log = root / f"{name}.log"
        self.source_index = index
        self.index_url = index_url
        self.storage = storage or self.data / "storage"
        self.aet = aet
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""
        self.node = ""
        self.startup_s = 0.0

    def start(self, timeout: float = 300.0) -> Pacsd:
        self.data.mkdir(parents=True)
        if self.source_index is not None:
            shutil.copyfile(self.source_index, self.data / "index.sqlite3")
        q = json.dumps   # a JSON string is a valid TOML basic string here
        lines = ["[server]", f"data = {q(str(self.data))}",
                 "[dicom]", f"aet = {q(self.aet)}", "port = 0", f"bind = {q(LOCAL)}",
                 # Every benchmark client runs on this one host, standing for many
                 # modalities: no per-host cap on associations.
                 "max_associations_per_host = 0",
                 "[http]", "port = 0", f"bind = {q(LOCAL)}",
                 "[storage]", f"path = {q(str(self.storage))}",
                 "[log]", f"file = {q(str(self.log))}"]
        # The benchmarks query and retrieve as BENCH (scale.py): a workstation, registered as a
        # node (C-FIND/C-GET/C-MOVE are for nodes only).
        lines += ["[[nodes]]", 'name = "bench"', 'aet = "BENCH"', f"host = {q(LOCAL)}",
                  "port = 104"]
        if self.index_url:
            lines += ["[index]", f"url = {q(self.index_url)}"]
        self.config.write_text("\n".join(lines) + "\n")
        os.sync()   # the copy's write-back must not land inside the timed start
        t0 = time.perf_counter()
        self.proc = PROCS.start([sys.executable, "-m", "pacsd", "serve", "--config",
                                 str(self.config)], self.log.with_suffix(".out"), cwd=REPO)
        info = wait_pacsd(self.proc, self.data, timeout, self.log)
        self.startup_s = time.perf_counter() - t0
        self.port = int(info["dicom_port"])
        self.url = f"http://{LOCAL}:{info['http_port']}"
        self.node = str(info.get("node", ""))
        return self

    def stored(self) -> int:
        """.dcm files in the storage folder (its hidden temporary folder left out)."""
        return count_files(self.storage, ".dcm")

    def stop(self) -> None:
        if self.proc is not None:
            rc = PROCS.stop(self.proc, grace=30)
            if rc not in (0, None):
                say(f"warning: pacsd {self.name} exited {rc}; log {self.log}")
            self.proc = None

    def log_problems(self) -> dict[str, int]:
        """How many lines of its log are warnings, errors, and index batches run again (after
        a deadlock or a lost connection)."""
        text = log_tail(self.log, 1 << 30) + log_tail(self.log.with_suffix(".out"), 1 << 30)
        return {"warnings": text.count(" WARNING "), "errors": text.count(" ERROR ") +
                text.count("Traceback"), "retried_batches": text.count("running it again")}


# --- a throw-away PostgreSQL (tests/postgres.py), durable like a production server -------------

def postgres_module() -> Any:
    """tests/postgres.py, the throw-away cluster the tests use too."""
    sys.path.insert(0, str(REPO / "tests"))
    import postgres  # tests/postgres.py
    return postgres


def postgres_cluster(parent: Path) -> Any:
    """A context manager: a new, durable PostgreSQL cluster (fsync, synchronous_commit and
    full_page_writes on; tests/postgres.py's DURABLE settings) in a folder made in `parent`
    (put it on the disk the SQLite index is on), stopped and deleted at the end. Yields a
    PostgresServer (.url, .database_url(name), .admin(), .folder)."""
    pg = postgres_module()
    try:
        pg.postgres_bindir()
    except pg.PostgresMissing as e:
        raise SystemExit(str(e)) from None
    return pg.throwaway_cluster(durable=True, parent=parent)


def postmaster_pid(server: Any) -> int | None:
    """The pid of a throw-away cluster's server process (from its postmaster.pid)."""
    try:
        return int((server.folder / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, AttributeError, TypeError):
        return None


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and its descendants, the exited ones it reaped
    included (PostgreSQL's backends are children of the postmaster)."""
    if pid is None:
        return 0.0
    import psutil
    try:
        return Sampler(pid, tree=True).cpu()
    except psutil.Error:
        return 0.0


def keep_postgres_log(server: Any, dest: Path) -> dict[str, int]:
    """Copy a throw-away cluster's log to `dest` (the cluster's folder goes when it stops);
    how many of its lines are errors, fatal errors and deadlocks."""
    try:
        text = (server.folder / "postgres.log").read_text(errors="replace")
    except (OSError, AttributeError, TypeError):
        return {}
    dest.write_text(text)
    # Before it is ready the server refuses the readiness probe's connections (FATAL: the
    # database system is starting up): not a problem of the run.
    text = text.split("database system is ready to accept connections", 1)[-1]
    return {"errors": text.count("ERROR:"), "fatal": text.count("FATAL:"),
            "deadlocks": text.count("deadlock detected")}


# --- printing ---------------------------------------------------------------------------------

def grid(head: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    """A plain-text table: columns padded to their widest cell, the first `left` columns
    left-aligned and the others right-aligned, a rule under the head."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
    return [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]


def reporter(table: Callable[[Any], str], json_path: str | None) -> Callable[[Any], None]:
    """run_bench's `report`: print the table, and write the figures as JSON if asked to."""
    def report(res: Any) -> None:
        print(table(res))
        if json_path:
            Path(json_path).write_text(json.dumps(res, indent=1) + "\n")
    return report
