#!/usr/bin/env python3
"""pacsd side by side with Orthanc and DCMTK's dcmqrscp, driven by the same real clients.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/run.py                          # 1000 CT images, every server
    .venv/bin/python benchmarks/run.py --servers pacsd,orthanc --json results.json
    .venv/bin/python benchmarks/run.py --store-runs 1 --echo-runs 5 --find-runs 5 \\
        --retrieve-runs 2 --http-runs 20                        # a quick look (~2 min)
    .venv/bin/python benchmarks/run.py --servers pacsd --py-spy /tmp/pyspy-venv/bin/py-spy

Servers (each started by this script on 127.0.0.1 with a fresh data folder and ports picked
free; Orthanc and dcmqrscp only when installed):
  pacsd         `python -m pacsd serve`, its defaults (fsync of every file and folder,
                synchronous index) but for ports 0, 127.0.0.1, shorter DIMSE/network timeouts
                (30/60 s), [[nodes]] entries for the C-MOVE destination and the client AE, no
                per-host association cap (every client runs here). No [[users]]: the
                web side is then open and bound to loopback only (pacsd's rule).
  orthanc       /usr/sbin/Orthanc with the DICOMweb plugin, Orthanc's defaults but for a JSON
                config with its folders, AE, ports, RemoteAccessAllowed false,
                AuthenticationEnabled false (the same open web side as pacsd),
                DicomAlwaysAllowFind/Get/Move true (the client AE is a node of pacsd) and the
                C-MOVE destination in DicomModalities. Orthanc 1.10 has no bind-address
                option: it listens on every interface, and is only ever called on 127.0.0.1.
  dcmqrscp      DCMTK's Q/R SCP (forks per association), Debian's example settings
                (MaxPDUSize 16384, MaxAssociations 16), one storage area, the C-MOVE
                destination in its HostTable. No HTTP.
  storescp      `storescp --fork -od DIR`: files written, no index, no fsync. The C-STORE
                (and C-ECHO) ceiling, not a PACS: it is left out of "best peer".
Every DCMTK program (clients, dcmqrscp, Orthanc) runs with TCP_NODELAY=1 (see PEERS.md), by
absolute path (/usr/bin/storescu: the venv has pynetdicom's look-alikes).

Data: 2 patients x 2 studies x (N / 200) series x 50 images of 512x512 16-bit CT (tests/data.py,
deterministic), plus --find-studies one-image studies of other patients for the searches;
the same files into every server. Cached in --workdir (default <repo>/bench-data, git-ignored).

Figures (one column per server, "—" where a server does not offer the service):
  C-ECHO        echoscu, median of --echo-runs, process start included
  C-STORE       N images with one storescu (+sd +r +sp '*.dcm', one folder), and with 4
                and with 16 storescu side by side (the files split among them; the server's
                peak RSS over 16 is a row of its own); every run into a FRESH instance,
                os.sync() before each, servers interleaved run by run, median of --store-runs
  C-FIND        findscu -S, STUDY level all studies and one PatientID, IMAGE level one series;
                median of --find-runs, the match count checked on every run
  C-GET         getscu of one 50-image series, img/s, median of --retrieve-runs, files counted
  C-MOVE        movescu of that series to a separate storescp (its own AE), files counted
  WADO-URI      one image as application/dicom, median ms of --http-runs requests on one
                keep-alive requests.Session per server (one untimed warm-up request first).
                Every HTTP request says Accept-Encoding: identity (the same bytes from every
                server); one more row repeats WADO-URI with requests' default "gzip, deflate",
                which Orthanc (HttpCompressionEnabled by default) answers gzipped
  WADO-RS       the series as multipart/related; type="application/dicom", streamed, MB/s
                (10^6 bytes of body as received), median of --retrieve-runs; parts counted
  QIDO-RS       /studies (all) and /studies?PatientID=, median ms of --http-runs, results counted
  RSS, CPU      peak RSS of the server (psutil every 20 ms; servers of several processes,
                dcmqrscp and pacsd with its DICOM workers: the sum over the process tree, where
                pages the processes share count once each: PSS is the figure for memory) and
                server CPU seconds per run of each phase, counted during that server's own runs
                only (a second table)
The queries run against one more fresh instance per server, loaded (untimed) with all images;
their runs are interleaved across servers too.

"pacsd vs best peer" is >= 1.00 when pacsd is at least as good as the best of Orthanc and
dcmqrscp on that row: pacsd / best for rates, best / pacsd for times, memory and CPU.
A server that fails a measurement is shown as "fails [k]", the reason under the table; the
other figures are still made. Every subprocess is stopped at exit, Ctrl-C included. Each run's
data folders and logs go to a run-* folder in --workdir, removed at exit unless --keep (or the
run failed). With --py-spy PATH, py-spy samples pacsd during each phase and the script prints
where pacsd spent its time (the figures of such a run are perturbed by the sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

from harness import (
    LOCAL,
    PEER_ENV,
    PROCS,
    REPO,
    BenchError,
    MiB,
    Sampler,
    count_files,
    dcmtk_version,
    ensure_data,
    first_line,
    free_port,
    git_state,
    log_tail,
    package_version,
    profile_lines,
    run_bench,
    run_client,
    run_clients,
    say,
    summarize_profile,
    tool,
    wait_count,
    wait_pacsd,
)

ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DCMQRSCP = Path("/usr/bin/dcmqrscp")
PATIENTS, STUDIES = 2, 2
MOVE_AET = "MOVEDEST"
CLIENT_AET = "BENCH"
FIND_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
             "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
             "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
DICOM_MULTIPART = 'multipart/related; type="application/dicom"'


# --- the servers: one class each, the same interface ---------------------------------------------

class Server:
    """A kind of server. start(tag) runs a fresh instance (a new data folder, new ports),
    stop() ends it; RSS and CPU are gathered over every instance, per phase."""

    name = ""
    label = ""
    aet = ""
    services: ClassVar[frozenset[str]] = frozenset()
    tree = False             # forks per association: RSS and CPU summed over the process tree
    http_roots: ClassVar[dict[str, str]] = {}   # "wado": WADO-URI path, "dicomweb": DICOMweb root

    def __init__(self, run_dir: Path, move_port: int, keep: bool) -> None:
        self.run_dir, self.move_port, self.keep = run_dir, move_port, keep
        self.proc: subprocess.Popen | None = None
        self.sampler: Sampler | None = None
        self.data = run_dir
        self.log = run_dir / f"{self.name}.log"
        self.dicom_port = 0
        self.http_url = ""
        self.idle_rss = 0
        self.idle_pss = 0
        self.peak_rss = 0
        self.phase_cpu: dict[str, float] = {}
        self.phase_runs: dict[str, int] = {}
        self.phase_rss: dict[str, int] = {}

    def offers(self, service: str) -> bool:
        return service in self.services

    # each server's own part
    def launch(self) -> None:
        """Start self.proc for self.data, set the ports, return once it answers."""
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError

    def start(self, tag: str, attempts: int = 3) -> Server:
        self.data = self.run_dir / f"{self.name}-{tag}"
        self.log = self.run_dir / f"{self.name}-{tag}.log"
        for attempt in range(attempts):   # a port picked free may be taken before it is bound
            shutil.rmtree(self.data, ignore_errors=True)
            self.data.mkdir(parents=True)
            try:
                self.launch()
                break
            except BenchError:
                if self.proc is not None:
                    PROCS.stop(self.proc, grace=5)
                if attempt == attempts - 1:
                    raise
        assert self.proc is not None
        self.sampler = Sampler(self.proc.pid, tree=self.tree)
        rss = self.sampler.sample()
        self.idle_rss = self.idle_rss or rss   # the first fresh, empty instance
        self.idle_pss = self.idle_pss or self.sampler.pss()
        self.sampler.start()
        return self

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.peak_rss = max(self.peak_rss, self.sampler.peak)
            self.sampler = None
        if self.proc is not None:
            rc = PROCS.stop(self.proc)
            if rc not in (0, None, -15):
                say(f"warning: {self.name} exited {rc}; log {self.log}")
            self.proc = None
        if not self.keep:
            shutil.rmtree(self.data, ignore_errors=True)

    def error_line(self) -> str:
        """The first error the server logged (DCMTK "E:", Orthanc "E1125 ...", pacsd ERROR)."""
        for line in log_tail(self.log, 1 << 24).splitlines():
            if line.startswith("E:") or " ERROR " in line or re.match(r"E\d{4} ", line):
                return line.strip()[:240]
        return ""

    def wait_stored(self, expected: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        n = self.stored()
        while n != expected and time.monotonic() < deadline:
            time.sleep(0.1)
            n = self.stored()
        return n

    def wait_echo(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}: "
                                 f"{log_tail(self.log, 500)}")
            if echo_ok(self.dicom_port, self.aet):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not answering C-ECHO after {timeout:.0f} s")
            time.sleep(0.1)

    @contextmanager
    def phase(self, name: str, cpu: bool = True) -> Iterator[None]:
        """Peak RSS (and with `cpu`, CPU seconds of one run) of the server while the block
        runs; py-spy, if asked for, samples pacsd meanwhile."""
        if self.sampler is None:
            yield
            return
        self.begin_phase(name)
        self.sampler.phase = name
        try:
            if cpu:
                with self.cpu_of(name):
                    yield
            else:
                yield
        finally:
            self.sampler.sample()
            self.phase_rss[name] = max(self.phase_rss.get(name, 0),
                                       self.sampler.peaks.get(name, 0))
            self.sampler.phase = "between"
            self.end_phase(name)

    @contextmanager
    def cpu_of(self, name: str) -> Iterator[None]:
        """Count the server's CPU seconds in the block as one run of `name`."""
        if self.sampler is None:
            yield
            return
        cpu0 = self.sampler.cpu()
        try:
            yield
        finally:
            self.phase_cpu[name] = self.phase_cpu.get(name, 0.0) + self.sampler.cpu() - cpu0
            self.phase_runs[name] = self.phase_runs.get(name, 0) + 1

    def begin_phase(self, name: str) -> None:
        pass

    def end_phase(self, name: str) -> None:
        pass


def echo_ok(port: int, aet: str) -> bool:
    try:
        return subprocess.run([tool("echoscu"), "-to", "2", "-ta", "2", "-aet", CLIENT_AET,
                               "-aec", aet, LOCAL, str(port)], env=PEER_ENV,
                              capture_output=True, timeout=10, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def http_ok(url: str) -> bool:
    import requests
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


ALL = frozenset({"echo", "store", "find", "get", "move", "http"})


class Pacsd(Server):
    name = label = "pacsd"
    aet = "PACSD"
    services = ALL
    http_roots: ClassVar[dict[str, str]] = {"wado": "/wado", "dicomweb": "/dicom-web"}
    tree = True   # its DICOM worker processes (pacsd.daemon.workers) count too

    def __init__(self, run_dir: Path, move_port: int, keep: bool, py_spy: str | None = None,
                 dicom: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir, move_port, keep)
        self.py_spy = py_spy
        # More [dicom] settings, as {key: value} (benchmarks/workers.py sets `workers`).
        self.dicom_settings = dict(dicom or {})
        self.spy: subprocess.Popen | None = None
        self.profiles: dict[str, list[Path]] = {}

    def launch(self) -> None:
        q = json.dumps   # a JSON string is a valid TOML basic string for these values
        config = self.data.with_suffix(".toml")
        config.write_text("\n".join([
            "[server]", f"data = {q(str(self.data))}",
            "[dicom]", f"aet = {q(self.aet)}", "port = 0", f"bind = {q(LOCAL)}",
            # Shorter than the defaults (120 s): a stalled C-MOVE sub-association costs the
            # benchmark half a minute, not several.
            "dimse_timeout = 30", "network_timeout = 60",
            # Every benchmark client runs on this one host, standing for many modalities (up
            # to 16 storescu at once): no per-host cap on associations.
            "max_associations_per_host = 0",
            *(f"{k} = {q(v)}" for k, v in self.dicom_settings.items()),
            "[http]", "port = 0", f"bind = {q(LOCAL)}",
            "[log]", 'file = "-"', 'level = "INFO"',
            "[[nodes]]", 'name = "movedest"', f"aet = {q(MOVE_AET)}", f"host = {q(LOCAL)}",
            f"port = {self.move_port}",
            # The benchmark's DCMTK clients query and retrieve as CLIENT_AET: a workstation,
            # registered as a node (C-FIND/C-GET/C-MOVE are for nodes only).
            "[[nodes]]", 'name = "bench"', f"aet = {q(CLIENT_AET)}", f"host = {q(LOCAL)}",
            "port = 104"]) + "\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        for k in [k for k in env if k.startswith("PACSD_")]:
            del env[k]   # only the benchmark's config counts
        self.proc = PROCS.start([sys.executable, "-m", "pacsd", "serve", "--config",
                                 str(config)], self.log, env=env)
        info = wait_pacsd(self.proc, self.data, 60, self.log)
        self.dicom_port = int(info["dicom_port"])
        self.http_url = f"http://{LOCAL}:{int(info['http_port'])}"

    def stored(self) -> int:
        return count_files(self.data / "storage", ".dcm")

    def begin_phase(self, name: str) -> None:
        if not self.py_spy or self.proc is None:
            return
        out = self.run_dir / f"profile-{self.data.name}--{name}.txt"
        self.spy = PROCS.start([self.py_spy, "record", "--pid", str(self.proc.pid), "--rate",
                                "200", "--format", "raw", "--output", str(out), "--nonblocking"],
                               self.run_dir / f"py-spy-{self.data.name}-{name}.log",
                               env=dict(os.environ))
        self.profiles.setdefault(name, []).append(out)
        time.sleep(0.5)   # let py-spy attach

    def end_phase(self, name: str) -> None:
        if self.spy is None:
            return
        self.spy.send_signal(2)   # SIGINT: py-spy writes its output
        try:
            self.spy.wait(30)
        except subprocess.TimeoutExpired:
            pass
        PROCS.stop(self.spy, grace=1)
        self.spy = None


class Orthanc(Server):
    name = "orthanc"
    label = "Orthanc"
    aet = "ORTHANC"
    services = ALL
    http_roots: ClassVar[dict[str, str]] = {"wado": "/wado", "dicomweb": "/dicom-web"}

    def launch(self) -> None:
        self.dicom_port, http_port = free_port(), free_port()
        self.http_url = f"http://{LOCAL}:{http_port}"
        config = self.data.with_suffix(".json")
        config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(self.data / "storage"),
            "IndexDirectory": str(self.data / "index"),
            "DicomAet": self.aet, "DicomPort": self.dicom_port, "HttpPort": http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {"movedest": [MOVE_AET, LOCAL, self.move_port]},
            "Plugins": [str(ORTHANC_DICOMWEB)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado"},
        }, indent=1))
        self.proc = PROCS.start([str(ORTHANC), str(config)], self.log, env=PEER_ENV)
        deadline = time.monotonic() + 60
        while not http_ok(self.http_url + "/system"):
            if self.proc.poll() is not None:
                raise BenchError(f"Orthanc exited {self.proc.returncode}: "
                                 f"{log_tail(self.log, 800)}")
            if time.monotonic() > deadline:
                raise BenchError("Orthanc's /system not answering after 60 s")
            time.sleep(0.1)
        self.wait_echo(max(1.0, deadline - time.monotonic()))

    def stored(self) -> int:
        import requests
        try:
            r = requests.get(self.http_url + "/statistics", timeout=30)
            return int(r.json()["CountInstances"])
        except (requests.RequestException, ValueError, KeyError):
            return -1


class Dcmqrscp(Server):
    name = "dcmqrscp"
    label = "dcmqrscp"
    aet = "DCMQRSCP"
    services = frozenset({"echo", "store", "find", "get", "move"})
    tree = True

    def launch(self) -> None:
        self.dicom_port = free_port()
        storage = self.data / "storage"
        storage.mkdir(exist_ok=True)
        config = self.data.with_suffix(".cfg")
        # Debian's example /etc/dcmtk/dcmqrscp.cfg settings; quotas: 500 studies of 1 GB (its maxima).
        config.write_text(
            f"NetworkTCPPort  = {self.dicom_port}\nMaxPDUSize      = 16384\n"
            "MaxAssociations = 16\n\n"
            f"HostTable BEGIN\nmovedest = ({MOVE_AET}, {LOCAL}, {self.move_port})\n"
            "HostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{self.aet} {storage} RW (500, 1024mb) ANY\nAETable END\n")
        self.proc = PROCS.start([str(DCMQRSCP), "-c", str(config)], self.log, env=PEER_ENV,
                                cwd=self.data)
        self.wait_echo(30)

    def stored(self) -> int:
        return count_files(self.data / "storage", exclude=("index.dat",))


class StoreSCP(Server):
    """`storescp -od`: the C-STORE ceiling (with --fork), or the C-MOVE destination."""

    name = "storescp"
    label = "storescp -od"
    aet = "STORESCP"
    services = frozenset({"echo", "store"})
    tree = True

    def __init__(self, run_dir: Path, move_port: int, keep: bool, fork: bool = True,
                 aet: str = "STORESCP", name: str = "storescp") -> None:
        self.name, self.aet, self.fork = name, aet, fork
        super().__init__(run_dir, move_port, keep)

    def launch(self) -> None:
        self.dicom_port = free_port()
        self.proc = PROCS.start([tool("storescp"), *(["--fork"] if self.fork else []),
                                 "-aet", self.aet, "-od", str(self.data), str(self.dicom_port)],
                                self.log)
        self.wait_echo(15)

    def stored(self) -> int:
        return count_files(self.data)

    def clear(self) -> None:
        for entry in os.scandir(self.data):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


SERVERS: dict[str, type[Server]] = {"pacsd": Pacsd, "orthanc": Orthanc, "dcmqrscp": Dcmqrscp,
                                    "storescp": StoreSCP}


def missing(name: str) -> str:
    """Why a server cannot run here ('' if it can)."""
    if name == "orthanc":
        return "" if ORTHANC.exists() and ORTHANC_DICOMWEB.exists() else \
            "not installed (apt-get install orthanc orthanc-dicomweb)"
    if name == "dcmqrscp":
        return "" if DCMQRSCP.exists() else "not installed (apt-get install dcmtk)"
    return ""


# --- the clients --------------------------------------------------------------------------------

def store_cmds(srv: Server, images: list[Path], folder: Path, assocs: int) -> list[list[str]]:
    if assocs == 1:   # one association, the folder scanned for *.dcm only
        return [[tool("storescu"), "-aet", CLIENT_AET, "-aec", srv.aet, "+sd", "+r", "+sp",
                 "*.dcm", LOCAL, str(srv.dicom_port), str(folder)]]
    k = -(-len(images) // assocs)
    chunks = [images[i:i + k] for i in range(0, len(images), k)]
    return [[tool("storescu"), "-aet", f"{CLIENT_AET}{i + 1}", "-aec", srv.aet, LOCAL,
             str(srv.dicom_port), *map(str, chunk)] for i, chunk in enumerate(chunks)]


def store(srv: Server, images: list[Path], folder: Path, assocs: int, logs: Path, tag: str,
          timeout: float) -> float:
    """Wall seconds to C-STORE `images` with `assocs` storescu processes side by side."""
    cmds = store_cmds(srv, images, folder, assocs)
    names = [logs / f"store-{srv.name}-{tag}-{i + 1}.log" for i in range(len(cmds))]
    return run_clients(cmds, names, timeout)


def findscu(srv: Server, level: str, keys: dict[str, str]) -> list[str]:
    cmd = [tool("findscu"), "-v", "-S", "-aet", CLIENT_AET, "-aec", srv.aet,
           "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}" if v else k]
    return cmd + [LOCAL, str(srv.dicom_port)]


def retrieve_cmd(verb: str, srv: Server, keys: dict[str, str], out: Path | None) -> list[str]:
    cmd = [tool("getscu" if verb == "get" else "movescu"), "-S", "-aet", CLIENT_AET,
           "-aec", srv.aet, "-k", "QueryRetrieveLevel=SERIES"]
    for k, v in keys.items():
        cmd += ["-k", f"{k}={v}"]
    cmd += ["-od", str(out)] if out is not None else ["-aem", MOVE_AET]
    return cmd + [LOCAL, str(srv.dicom_port)]


def multipart_parts(response: Any) -> tuple[int, int]:
    """(parts, body bytes) of a streamed multipart response, the delimiters counted on the fly."""
    ctype = response.headers.get("Content-Type", "")
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")
                     if p.strip().lower().startswith("boundary=")), "")
    if not boundary:
        raise BenchError(f"no multipart boundary in Content-Type {ctype!r}")
    delim = b"--" + boundary.encode()
    seen, size, tail = 0, 0, b""
    for chunk in response.iter_content(1 << 20):
        size += len(chunk)
        buf = tail + chunk
        seen += buf.count(delim)
        tail = buf[-(len(delim) - 1):]
    return seen - 1, size   # the closing delimiter is "--boundary--"


# --- the run ------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args, self.run_dir = args, run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir()
        self.cells: dict[str, dict[str, dict[str, Any]]] = {}
        self.notes: list[str] = []

    def cell(self, metric: str, srv: Server, values: list[float], failures: list[str],
             runs: int, **extra: Any) -> None:
        c: dict[str, Any] = {"value": round(statistics.median(values), 2) if values else None,
                             "runs": [round(v, 3) for v in values], "failures": failures,
                             "attempted": runs, **extra}
        self.cells.setdefault(metric, {})[srv.name] = c

    def interleaved(self, metric: str, servers: list[Server], runs: int,
                    one: Callable[[Server, int], float]) -> None:
        """`runs` rounds, each server once per round; a server that failed its first two runs
        is not tried again."""
        values: dict[str, list[float]] = {s.name: [] for s in servers}
        fails: dict[str, list[str]] = {s.name: [] for s in servers}
        with ExitStack() as stack:
            for s in servers:
                stack.enter_context(s.phase(metric, cpu=False))
            for i in range(runs):
                for s in servers:
                    if len(fails[s.name]) >= 2 and not values[s.name]:
                        continue
                    try:
                        with s.cpu_of(metric):   # this server's turn only
                            values[s.name].append(one(s, i))
                    except BenchError as e:
                        fails[s.name].append(f"run {i + 1}: {first_line(e)}")
                        say(f"{s.name} {metric} run {i + 1} failed: {first_line(e)}")
        for s in servers:
            self.cell(metric, s, values[s.name], fails[s.name], runs)

    def run(self, servers: list[Server], move_dest: StoreSCP) -> dict[str, Any]:
        a = self.args
        series = a.images // (PATIENTS * STUDIES * a.series_images)
        images, extras = ensure_data(a.workdir, patients=PATIENTS, studies=STUDIES,
                                     series=series, images=a.series_images, size=a.size,
                                     find_studies=a.find_studies)
        image_dir = images[0].parent
        self.mb = sum(p.stat().st_size for p in images) / 1e6
        timeout = max(600.0, a.images * 0.5)

        # --- C-STORE: every run into fresh instances, servers interleaved ---------------------
        stores = [s for s in servers if s.offers("store")]
        times: dict[tuple[str, int], list[float]] = {}
        fails: dict[tuple[str, int], list[str]] = {}
        for r in range(a.store_runs):
            for assocs in STORE_ASSOCIATIONS:
                metric = f"store_{assocs}"
                for s in stores:
                    k = (s.name, assocs)
                    times.setdefault(k, [])
                    fails.setdefault(k, [])
                    tag = f"{assocs}-{r + 1}"
                    say(f"run {r + 1}/{a.store_runs}: C-STORE {a.images} images into "
                        f"{s.name}, {assocs} association(s)")
                    try:
                        s.start(tag)
                        os.sync()
                        with s.phase(metric):
                            seconds = store(s, images, image_dir, assocs, self.logs, tag,
                                            timeout)
                        got = s.wait_stored(a.images)
                        if got != a.images:   # every storescu exited 0: all acknowledged
                            raise BenchError(f"{got} of {a.images} images stored, all "
                                             "acknowledged")
                        times[k].append(seconds)
                    except BenchError as e:
                        why = first_line(e)
                        if s.error_line():
                            why += f"; the server logged: {s.error_line()}"
                        fails[k].append(f"run {r + 1}: {why}")
                        say(f"{s.name} failed: {why}")
                    finally:
                        s.stop()
        for (name, assocs), secs in times.items():
            srv = next(s for s in stores if s.name == name)
            self.cell(f"store_{assocs}", srv, [a.images / t for t in secs],
                      fails[(name, assocs)], a.store_runs,
                      seconds=[round(t, 3) for t in secs],
                      mb_per_s=round(self.mb / statistics.median(secs), 1) if secs else None)

        # --- one more fresh instance per server, loaded untimed, for everything else -----------
        live: list[Server] = []
        for s in servers:
            try:
                s.start("query")
                if s.offers("find"):
                    say(f"loading {len(images)} + {len(extras)} images into {s.name} (untimed)")
                    store(s, images, image_dir, 1, self.logs, "load", timeout)
                    if extras:
                        store(s, extras, extras[0].parent, 1, self.logs, "load-extra", timeout)
                    got = s.wait_stored(len(images) + len(extras))
                    if got != len(images) + len(extras):
                        raise BenchError(f"{got} of {len(images) + len(extras)} images stored")
                live.append(s)
            except BenchError as e:
                self.notes.append(f"{s.name}: no queries measured: {first_line(e)}")
                for metric in ("echo", "find_all", "find_pid", "find_image", "get", "move",
                               "wado_uri", "wado_rs", "qido_all", "qido_pid"):
                    self.cell(metric, s, [], [first_line(e)], 0)
                s.stop()
        self.measure_queries(live, images, extras, move_dest)
        for s in live:
            s.stop()
        return {"images_mb": round(self.mb, 1), "series": series,
                "studies": PATIENTS * STUDIES + len(extras)}

    def measure_queries(self, live: list[Server], images: list[Path], extras: list[Path],
                        move_dest: StoreSCP) -> None:
        import requests
        from pydicom import dcmread
        a = self.args
        per = a.series_images
        first = dcmread(images[0], stop_before_pixels=True)
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        target = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        pid, pid_studies = str(first.PatientID), STUDIES
        all_studies = PATIENTS * STUDIES + len(extras)

        def log(name: str, s: Server) -> Path:
            return self.logs / f"{name}-{s.name}.log"

        say(f"C-ECHO, {a.echo_runs} runs")
        self.interleaved("echo", [s for s in live if s.offers("echo")], a.echo_runs,
                         lambda s, i: 1000 * run_client(
                             [tool("echoscu"), "-to", "10", "-aet", CLIENT_AET, "-aec", s.aet,
                              LOCAL, str(s.dicom_port)], log("echo", s), timeout=30))

        def find(level: str, keys: dict[str, str], expected: int, name: str
                 ) -> Callable[[Server, int], float]:
            def one(s: Server, _i: int) -> float:
                ms = 1000 * run_client(findscu(s, level, keys), log(name, s), timeout=120)
                matches = log(name, s).read_text(errors="replace").count("(Pending)")
                if matches != expected:
                    raise BenchError(f"{matches} matches, expected {expected}")
                return ms
            return one

        finders = [s for s in live if s.offers("find")]
        study_keys = dict.fromkeys(FIND_KEYS, "")
        say(f"C-FIND, {a.find_runs} runs of each query")
        self.interleaved("find_all", finders, a.find_runs,
                         find("STUDY", study_keys, all_studies, "find_all"))
        self.interleaved("find_pid", finders, a.find_runs,
                         find("STUDY", {**study_keys, "PatientID": pid}, pid_studies,
                              "find_pid"))
        self.interleaved("find_image", finders, a.find_runs,
                         find("IMAGE", {**target, "SOPInstanceUID": "", "InstanceNumber": "",
                                        "SOPClassUID": ""}, per, "find_image"))

        def get(s: Server, i: int) -> float:
            out = self.run_dir / f"get-{s.name}-{i}"
            out.mkdir()
            try:
                seconds = run_client(retrieve_cmd("get", s, target, out), log("get", s),
                                     a.retrieve_timeout)
                got = wait_count(out, per)
                if got != per:
                    raise BenchError(f"{got} of {per} images arrived")
                return per / seconds
            finally:
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)

        def move(s: Server, _i: int) -> float:
            move_dest.clear()
            try:
                seconds = run_client(retrieve_cmd("move", s, target, None), log("move", s),
                                     a.retrieve_timeout)
            except BenchError as e:
                raise BenchError(f"{e} ({move_dest.stored()} of {per} arrived)") from None
            got = wait_count(move_dest.data, per)
            if got != per:
                raise BenchError(f"{got} of {per} images arrived")
            return per / seconds

        say(f"C-GET and C-MOVE of one series of {per}, {a.retrieve_runs} runs each")
        self.interleaved("get", [s for s in live if s.offers("get")], a.retrieve_runs, get)
        self.interleaved("move", [s for s in live if s.offers("move")], a.retrieve_runs, move)

        web = [s for s in live if s.offers("http")]
        # Accept-Encoding: identity, so that every server sends the same bytes: with requests'
        # default (gzip, deflate) Orthanc gzips each DICOM file (HttpCompressionEnabled is on by
        # default), which one extra row shows.
        sessions = {s.name: requests.Session() for s in web}
        gzip_sessions = {s.name: requests.Session() for s in web}
        for sess in sessions.values():
            sess.headers["Accept-Encoding"] = "identity"
        obj = str(first.SOPInstanceUID)
        # "/" left unescaped: Orthanc 1.10 (DICOMweb plugin 1.7) does not percent-decode
        # contentType and answers 400 to application%2Fdicom.
        wado_query = urlencode({"requestType": "WADO", "studyUID": study, "seriesUID": series,
                                "objectUID": obj, "contentType": "application/dicom"}, safe="/")

        def wado_uri(s: Server, _i: int, pool: dict[str, Any] = sessions) -> float:
            t0 = time.perf_counter()
            try:
                r = pool[s.name].get(f"{s.http_url}{s.http_roots['wado']}?{wado_query}",
                                         timeout=30)
                body = r.content
            except requests.RequestException as e:
                raise BenchError(f"WADO-URI: {e}") from None
            ms = 1000 * (time.perf_counter() - t0)
            if r.status_code != 200 or body[128:132] != b"DICM":
                raise BenchError(f"WADO-URI: HTTP {r.status_code}, {len(body)} bytes: "
                                 f"{body[:120]!r}")
            return ms

        def wado_rs(s: Server, _i: int) -> float:
            url = f"{s.http_url}{s.http_roots['dicomweb']}/studies/{study}/series/{series}"
            t0 = time.perf_counter()
            try:
                with sessions[s.name].get(url, headers={"Accept": DICOM_MULTIPART},
                                          stream=True, timeout=120) as r:
                    if r.status_code != 200:
                        raise BenchError(f"WADO-RS: HTTP {r.status_code}: {r.text[:200]}")
                    parts, size = multipart_parts(r)
            except requests.RequestException as e:
                raise BenchError(f"WADO-RS: {e}") from None
            seconds = time.perf_counter() - t0
            if parts != per:
                raise BenchError(f"WADO-RS: {parts} parts, expected {per}")
            return size / 1e6 / seconds

        def qido(params: dict[str, str], expected: int) -> Callable[[Server, int], float]:
            def one(s: Server, _i: int) -> float:
                t0 = time.perf_counter()
                try:
                    r = sessions[s.name].get(f"{s.http_url}{s.http_roots['dicomweb']}/studies",
                                             params=params, timeout=30,
                                             headers={"Accept": "application/dicom+json"})
                    found = len(r.json()) if r.status_code == 200 else -1
                except (requests.RequestException, ValueError) as e:
                    raise BenchError(f"QIDO-RS: {e}") from None
                ms = 1000 * (time.perf_counter() - t0)
                if found != expected:
                    raise BenchError(f"QIDO-RS: HTTP {r.status_code}, {found} studies, "
                                     f"expected {expected}")
                return ms
            return one

        if web:
            for s in web:   # one untimed request: the keep-alive connection opened
                for pool in (sessions, gzip_sessions):
                    try:
                        wado_uri(s, 0, pool)
                    except BenchError:
                        pass
            say(f"WADO-URI {a.http_runs} requests, WADO-RS {a.retrieve_runs} runs, "
                f"QIDO-RS {a.http_runs} requests of each")
            self.interleaved("wado_uri", web, a.http_runs, wado_uri)
            self.interleaved("wado_uri_gzip", web, a.http_runs,
                             lambda s, i: wado_uri(s, i, gzip_sessions))
            self.interleaved("wado_rs", web, a.retrieve_runs, wado_rs)
            self.interleaved("qido_all", web, a.http_runs, qido({}, all_studies))
            self.interleaved("qido_pid", web, a.http_runs, qido({"PatientID": pid},
                                                                 pid_studies))
        for sess in [*sessions.values(), *gzip_sessions.values()]:
            sess.close()


# --- pacsd's log: lines that explain its figures ------------------------------------------------

LOG_EVENTS = {
    "converted": ("No presentation context for",
                  ("sends refused by pynetdicom for want of a context with the stored "
                   "transfer syntax (the image was then decoded and converted, or failed)")),
    "unexpected": ("Received unexpected",
                   ("DIMSE responses taken by the wrong thread (pynetdicom reactor race): "
                    "the sub-operation then waits for the DIMSE timeout")),
    "suboperation_failed": ("sub-operation failed", "C-STORE sub-operations that failed"),
    "errors": (" ERROR ", "ERROR lines in total"),
}


def log_events(paths: list[Path]) -> dict[str, int]:
    counts = dict.fromkeys(LOG_EVENTS, 0)
    for path in paths:
        text = log_tail(path, 1 << 30)
        for key, (needle, _) in LOG_EVENTS.items():
            counts[key] += text.count(needle)
    return counts


# --- the table ----------------------------------------------------------------------------------

# storescu processes side by side in the C-STORE runs; 16 also bounds memory (issue 8)
STORE_ASSOCIATIONS = (1, 4, 16)
# metric, label, unit, digits, higher is better
ROWS = [
    ("echo", "C-ECHO round trip (echoscu, median of {echo_runs})", "ms", 1, False),
    ("store_1", "C-STORE {images} img, 1 association (median of {store_runs})", "img/s", 0,
     True),
    ("store_4", "C-STORE {images} img, 4 associations (median of {store_runs})", "img/s", 0,
     True),
    ("store_16", "C-STORE {images} img, 16 associations (median of {store_runs})", "img/s", 0,
     True),
    ("find_all", "C-FIND STUDY, all {studies} studies (median of {find_runs})", "ms", 1, False),
    ("find_pid", "C-FIND STUDY, one PatientID ({pid_studies} studies)", "ms", 1, False),
    ("find_image", "C-FIND IMAGE, one series ({series_images} images)", "ms", 1, False),
    ("get", "C-GET series of {series_images} (median of {retrieve_runs})", "img/s", 0, True),
    ("move", "C-MOVE series of {series_images} -> storescp", "img/s", 0, True),
    ("wado_uri", "WADO-URI 1 image, keep-alive (median of {http_runs})", "ms", 2, False),
    ("wado_uri_gzip", "  the same, Accept-Encoding: gzip, deflate", "ms", 2, False),
    ("wado_rs", "WADO-RS series of {series_images} (median of {retrieve_runs})", "MB/s", 0,
     True),
    ("qido_all", "QIDO-RS /studies, all {studies} (median of {http_runs})", "ms", 1, False),
    ("qido_pid", "QIDO-RS /studies?PatientID= ({pid_studies})", "ms", 1, False),
]
PEERS = ("orthanc", "dcmqrscp")

# Issue 20's targets: per metric, (peer, ratio) pairs that must all hold, the ratio oriented as
# in `ratio` (>= 1 is pacsd as good or better); "best" is the better of the peers.
TARGETS: dict[str, tuple[tuple[str, float], ...]] = {
    "echo": (("best", 1.0),),
    "store_1": (("orthanc", 1.5), ("dcmqrscp", 1.0)),
    "store_4": (("orthanc", 1.5),),
    "store_16": (("orthanc", 1.5),),
    "find_all": (("best", 1.0),),
    "find_pid": (("best", 1.0),),
    "find_image": (("best", 1.0),),
    "get": (("best", 1.0),),
    "move": (("best", 1.0),),
}


PSS_TARGET_MB = 200   # issue 20: idle memory summed over every pacsd process


def _vs(metric: dict[str, dict[str, Any]], higher: bool, peer: str) -> float | None:
    """pacsd against one peer (or the best), >= 1 meaning pacsd is as good or better."""
    mine = (metric.get("pacsd") or {}).get("value")
    peers = {n: c["value"] for n, c in metric.items()
             if n in PEERS and c.get("value") is not None}
    if peer == "best" and peers:
        theirs = max(peers.values()) if higher else min(peers.values())
    else:
        theirs = peers.get(peer)
    if mine is None or theirs is None or not (mine if not higher else theirs):
        return None
    return mine / theirs if higher else theirs / mine


def target(metric_name: str, metric: dict[str, dict[str, Any]], higher: bool
           ) -> tuple[str, str]:
    """The target of issue 20 for this row, in words, and whether this run met it ("yes",
    "no", or "—" when there is no target or a peer's figure is missing)."""
    wanted = TARGETS.get(metric_name)
    if not wanted:
        return "", ""
    words = ", ".join(f">= {r:.1f} of {'the best peer' if p == 'best' else p}"
                      for p, r in wanted)
    got = [_vs(metric, higher, p) for p, _ in wanted]
    if any(g is None for g in got):
        return words, "—"
    return words, "yes" if all(g >= r for g, (_, r) in zip(got, wanted)) else "no"


def ratio(metric: dict[str, dict[str, Any]], higher: bool) -> str:
    """pacsd against the best peer, oriented so that >= 1.00 means pacsd is as good or better."""
    mine = (metric.get("pacsd") or {}).get("value")
    peers = [(c["value"], n) for n, c in metric.items()
             if n in PEERS and c.get("value") is not None]
    if mine is None or not peers:
        return "—"
    best, who = max(peers) if higher else min(peers)
    num, den = (mine, best) if higher else (best, mine)
    return f"{num / den:.2f} vs {who}" if den else "—"


def table(res: dict[str, Any]) -> str:
    names = res["servers"]
    labels = res["labels"]
    cells = res["cells"]
    foot: list[str] = []
    rows: list[list[str]] = []

    def show(name: str, metric: str, unit: str, digits: int) -> str:
        c = cells.get(metric, {}).get(name)
        if c is None:
            return "—"
        mark = ""
        if c["failures"]:
            runs: dict[str, list[str]] = {}   # the same reason once, with its runs
            for f in c["failures"]:
                head, sep, why = f.partition(": ")
                key, run = (why, head.removeprefix("run ")) if sep and head.startswith("run ") \
                    else (f, "")
                runs.setdefault(key, []).append(run)
            foot.append(f"[{len(foot) + 1}] {labels[name]}, {metric}: " + "; ".join(
                (f"run(s) {', '.join(r)}: " if any(r) else "") + why
                for why, r in runs.items()))
            mark = f" [{len(foot)}]"
        if c["value"] is None:
            return "fails" + mark
        return f"{c['value']:,.{digits}f} {unit}{mark}"

    fill = {**res["params"], "studies": res["studies"]}
    for metric, label, unit, digits, higher in ROWS:
        if metric not in cells:
            continue
        rows.append([label.format(**fill), *(show(n, metric, unit, digits) for n in names),
                     ratio(cells[metric], higher), *target(metric, cells[metric], higher)])
    mem = res["memory"]
    pss = {n: mem[n].get("idle_pss_mb") for n in names if n in mem and mem[n].get("idle_pss_mb")}
    if pss:   # issue 20: every pacsd process together, shared pages once
        mine = pss.get("pacsd")
        rows.append(["server PSS, fresh and idle (all its processes)",
                     *(f"{pss[n]:.0f} MiB" if n in pss else "—" for n in names),
                     ratio({n: {"value": v} for n, v in pss.items()}, False),
                     f"pacsd < {PSS_TARGET_MB} MiB",
                     "—" if mine is None else ("yes" if mine < PSS_TARGET_MB else "no")])
    # RSS is summed over a server's processes: pages they share (pacsd's forked DICOM workers,
    # Orthanc's none) count once per process; PSS above counts each page once.
    for key, label in (("idle_rss_mb", "server RSS, fresh and idle (summed)"),
                       ("store_16", "server RSS, peak while storing over 16 associations"),
                       ("peak_rss_mb", "server RSS, peak over the whole run")):
        got = {n: (mem[n][key] if key in mem[n] else mem[n]["phase_peak_rss_mb"].get(key))
               for n in names if n in mem}
        got = {n: v for n, v in got.items() if v}
        rows.append([label, *(f"{got[n]:.0f} MiB" if n in got else "—" for n in names),
                     ratio({n: {"value": v} for n, v in got.items()}, False), "", ""])
    head = ["", *(labels[n] for n in names), "pacsd vs best peer", "target", "met"]

    cpu_rows = []
    for metric, label, *_ in ROWS:
        per = {n: {"value": mem[n]["cpu_s_per_run"].get(metric)} for n in names if n in mem
               and mem[n]["cpu_s_per_run"].get(metric) is not None}
        if per:
            cpu_rows.append([metric, *(f"{per[n]['value']:.3f} s" if n in per else "—"
                                       for n in names), ratio(per, False)])

    def render(head: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

        def line(r: list[str]) -> str:
            return "  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i])
                             for i, v in enumerate(r)).rstrip()
        return [line(head), line(["-" * w for w in widths]), *map(line, rows)]

    m = res["machine"]
    git = m["git"]
    p = res["params"]
    title = (f"pacsd vs peers: {p['images']} CT images {p['size']}x{p['size']} "
             f"({res['images_mb']:.0f} MB; {PATIENTS} patients x {STUDIES} studies x "
             f"{res['series']} series x {p['series_images']}) + {p['find_studies']} one-image "
             f"studies; {m['cpus']} CPUs, {m['platform']}")
    out = [title,
           f"Python {m['python']}, pynetdicom {m['pynetdicom']}, pydicom {m['pydicom']}, "
           f"DCMTK {m['dcmtk']}, Orthanc {m['orthanc'] or '-'} "
           f"(DICOMweb plugin {m['orthanc_dicomweb'] or '-'}); pacsd at {git['commit'] or '?'}"
           + (f" + {len(git['pacsd_modified'])} uncommitted file(s) in pacsd/"
              if git["pacsd_modified"] else "")
           + ("  [PROFILED with py-spy: figures perturbed]" if m["profiled"] else ""),
           "", *render(head, rows),
           f"Targets of issue 20 met: {sum(r[-1] == 'yes' for r in rows)} of "
           f"{sum(bool(r[-2]) for r in rows)} (— where a peer's figure is missing).", "",
           ("pacsd vs best peer: >= 1.00 means pacsd is at least as good as the best of Orthanc "
            "and dcmqrscp (rates: pacsd / best; times, memory, CPU: best / pacsd). storescp -od "
            "(no index, no fsync) is a ceiling, not a peer. Client wall times include starting "
            "the DCMTK process; HTTP figures are requests on one keep-alive session per server."),
           *foot, *res["notes"]]
    if cpu_rows:
        out += ["", "Server CPU seconds per run of each phase (process tree; lower is better):",
                *render(["phase", *(labels[n] for n in names), "pacsd vs best peer"],
                        cpu_rows)]
    for key, n in res.get("pacsd_log_events", {}).items():
        if n and key != "errors":
            out.append(f"pacsd log: {n} x {LOG_EVENTS[key][1]}")
    out += profile_lines(res.get("profiles", {}))
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------

def machine(profiled: bool) -> dict[str, Any]:
    import psutil
    import pydicom
    import pynetdicom
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(terse=True), "dcmtk": dcmtk_version(),
            "orthanc": package_version("orthanc"),
            "orthanc_dicomweb": package_version("orthanc-dicomweb"),
            "pynetdicom": pynetdicom.__version__, "pydicom": pydicom.__version__,
            "psutil": psutil.__version__, "profiled": profiled, "git": git_state()}


def bench(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    b = Bench(args, run_dir)
    res: dict[str, Any] = {"machine": machine(bool(args.py_spy)),
                           "params": {k: getattr(args, k) for k in (
                               "images", "series_images", "size", "find_studies",
                               "store_runs", "echo_runs", "find_runs", "retrieve_runs",
                               "http_runs")}}
    res["params"]["pid_studies"] = STUDIES
    names = [n for n in args.servers if not missing(n)]
    b.notes += [f"{n}: {missing(n)}" for n in args.servers if missing(n)]
    # The C-MOVE destination lives for the whole run: its port goes into every server's config.
    move_dest = StoreSCP(run_dir, 0, args.keep, fork=False, aet=MOVE_AET, name="move-dest")
    move_dest.start("all")
    servers: list[Server] = []
    for n in names:
        cls = SERVERS[n]
        servers.append(Pacsd(run_dir, move_dest.dicom_port, args.keep, args.py_spy)
                       if cls is Pacsd else cls(run_dir, move_dest.dicom_port, args.keep))
    try:
        res.update(b.run(servers, move_dest))
    finally:
        for s in servers:
            s.stop()
        move_dest.stop()
    res["servers"] = names
    res["labels"] = {s.name: s.label for s in servers}
    res["cells"] = b.cells
    res["notes"] = b.notes
    res["memory"] = {s.name: {
        "idle_rss_mb": round(s.idle_rss / MiB, 1), "peak_rss_mb": round(s.peak_rss / MiB, 1),
        "idle_pss_mb": round(s.idle_pss / MiB, 1),
        "phase_peak_rss_mb": {k: round(v / MiB, 1) for k, v in s.phase_rss.items()},
        "cpu_s_per_run": {k: round(v / max(1, s.phase_runs[k]), 4)
                          for k, v in s.phase_cpu.items()}} for s in servers}
    if "pacsd" in names:
        res["pacsd_log_events"] = log_events(sorted(run_dir.glob("pacsd-*.log")))
    pacsd = next((s for s in servers if isinstance(s, Pacsd)), None)
    if pacsd is not None and pacsd.profiles:
        res["profiles"] = {}
        for phase, files in pacsd.profiles.items():
            summary = summarize_profile(files)
            if summary:
                res["profiles"][phase] = summary
    return res


def check_data_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--images, --series-images and --size (also benchmarks/workers.py's): the data's shape."""
    unit = PATIENTS * STUDIES * args.series_images
    if not 1 <= args.series_images <= 1000 or args.images < unit or args.images % unit:
        ap.error(f"--images must be a positive multiple of {unit} "
                 f"({PATIENTS} patients x {STUDIES} studies x --series-images)")
    if not 8 <= args.size <= 4096:
        ap.error("--size must be 8..4096")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 epilog="See the module docstring (or the top of this file).",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma-separated subset of {','.join(SERVERS)} (default: all; those "
                         "not installed are skipped with a note)")
    ap.add_argument("--images", type=int, default=1000,
                    help="images to store: 2 patients x 2 studies x series of --series-images "
                         "(default 1000)")
    ap.add_argument("--series-images", type=int, default=50,
                    help="images per series, the series retrieved (default 50)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    ap.add_argument("--find-studies", type=int, default=40,
                    help="extra one-image studies (other patients) for the searches (default 40)")
    ap.add_argument("--store-runs", type=int, default=3,
                    help="C-STORE runs of each kind, each into a fresh server (default 3)")
    ap.add_argument("--echo-runs", type=int, default=20)
    ap.add_argument("--find-runs", type=int, default=20)
    ap.add_argument("--retrieve-runs", type=int, default=5,
                    help="C-GET, C-MOVE and WADO-RS runs each (default 5)")
    ap.add_argument("--http-runs", type=int, default=50,
                    help="WADO-URI and QIDO-RS requests each (default 50)")
    ap.add_argument("--retrieve-timeout", type=float, default=300.0,
                    help="seconds one getscu/movescu run may take (default 300)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data",
                    help="cache of generated images and run folders (default: <repo>/bench-data)")
    ap.add_argument("--keep", action="store_true",
                    help="keep this run's data folders, logs and received files")
    ap.add_argument("--json", metavar="FILE",
                    help="also write the figures as JSON to FILE ('-': JSON on stdout instead "
                         "of the table)")
    ap.add_argument("--py-spy", metavar="PATH",
                    help="py-spy program: profile pacsd during each phase (perturbs figures)")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers:
        ap.error(f"--servers: unknown {unknown}; choose from {','.join(SERVERS)}")
    args.servers = [s for s in SERVERS if s in args.servers]   # the table's column order
    check_data_args(ap, args)
    for k in ("store_runs", "echo_runs", "find_runs", "retrieve_runs", "http_runs"):
        if not 1 <= getattr(args, k) <= 1000:
            ap.error(f"--{k.replace('_', '-')} must be 1..1000")
    if not 0 <= args.find_studies <= 999:
        ap.error("--find-studies must be 0..999")
    args.workdir = args.workdir.expanduser().absolute()
    if args.py_spy and not shutil.which(args.py_spy):
        ap.error(f"py-spy program {args.py_spy!r} not found")
    for name in ("storescu", "storescp", "echoscu", "findscu", "getscu", "movescu"):
        tool(name)

    t0 = time.monotonic()

    def report(res: dict[str, Any]) -> None:
        res["wall_s"] = round(time.monotonic() - t0, 1)
        if args.json == "-":
            print(json.dumps(res, indent=1))
            return
        print(table(res))
        print(f"\n(benchmark wall time {res['wall_s'] / 60:.1f} min)")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return run_bench(args.workdir, args.keep, "run", lambda run_dir: bench(args, run_dir),
                     report, PROCS.stop_all)


if __name__ == "__main__":
    sys.exit(main())
