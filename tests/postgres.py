"""A throw-away PostgreSQL cluster on 127.0.0.1, for the tests (tests/conftest.py) and the
benchmarks (benchmarks/scale.py, benchmarks/cluster.py).

initdb'd into a new folder, started on a free port with its own socket folder (never the
system's server or /var/run/postgresql), as the `postgres` system user when we are root
(initdb and postgres refuse to run as root), with trust authentication for user `postgres`.
It shuts down if its parent dies without stopping it (Linux's parent-death signal), and is
stopped and deleted when the `throwaway_cluster` block ends.

Plain functions, no pytest: a missing PostgreSQL raises PostgresMissing, which conftest turns
into `peer_missing` and the benchmarks into an error message.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LOCAL = "127.0.0.1"
READY_TIMEOUT = 30.0
SOCKET_PATH_MAX = 100   # a Unix socket's path is at most 107 bytes; ".s.PGSQL.65535" takes 15

# Speed only, for tests: that cluster is thrown away, and pacsd's own durability is tested
# against SQLite (test_durability.py), not against this server's fsyncs.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# Durable like a production server, for benchmarks: a commit is on disk when it returns (the
# defaults, said explicitly), with memory settings for a small dedicated machine (~24 GiB).
DURABLE = {
    "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
    "shared_buffers": "1GB",           # the default 128MB would not hold a million-row index
    "effective_cache_size": "12GB",    # what the OS page cache is likely to hold
    "maintenance_work_mem": "512MB",   # index builds after a bulk load sort in memory
    "max_wal_size": "4GB",             # no checkpoint every 1 GB of WAL during bulk writes
    "random_page_cost": "1.1",         # SSD-backed storage
}


class PostgresMissing(Exception):
    """PostgreSQL's initdb and postgres are not installed."""


class PostgresError(Exception):
    """The cluster could not be made or started."""


class PostgresServer:
    """A PostgreSQL server we may create and drop databases on."""

    def __init__(self, url: str, folder: Path | None = None) -> None:
        self.url = url          # its maintenance database, as a user that may CREATE DATABASE
        self.folder = folder    # our throw-away cluster's folder; None for an external server

    def database_url(self, name: str) -> str:
        return urlunsplit(urlsplit(self.url)._replace(path="/" + name))

    def admin(self) -> Any:
        """An autocommit connection to the maintenance database (CREATE / DROP DATABASE)."""
        import psycopg
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def postgres_bindir() -> Path:
    """The folder of the highest installed PostgreSQL's initdb and postgres (Debian's layout,
    /usr/lib/postgresql/VERSION/bin, then PATH)."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        try:
            found.append((float(Path(d).parent.name), Path(d)))
        except ValueError:
            continue
    for _, d in sorted(found, reverse=True):
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").exists():
        return Path(initdb).parent
    raise PostgresMissing("PostgreSQL's initdb and postgres are not installed "
                          "(apt-get install postgresql)")


def as_postgres_user(folder: Path) -> dict[str, Any]:
    """Popen arguments that run the server as the `postgres` system user when we are root,
    with `folder` handed over to that user."""
    if os.geteuid() != 0:
        return {}
    import pwd
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError("running as root, but there is no `postgres` user to run "
                            "PostgreSQL as") from None
    os.chown(folder, pw.pw_uid, pw.pw_gid)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def stop_postgres(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT: disconnect clients, no checkpoint wait), then immediate
    (SIGQUIT), then SIGKILL; each bounded."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def pdeathsig() -> list[str]:
    """A command prefix that makes the server shut down (fast) if its parent dies without
    stopping it (SIGKILL): Linux's parent-death signal, set by util-linux's setpriv just before
    it execs postgres (Popen's preexec_fn would be unsafe with threads running)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT"] if sys.platform == "linux" and setpriv else []


def initdb(bindir: Path, folder: Path, run_as: dict[str, Any]) -> None:
    """A new cluster in folder/data: UTF-8, C.UTF-8 locale, trust authentication."""
    init = subprocess.run(
        [str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "postgres",
         "-A", "trust", "--auth-local=trust", "-E", "UTF8",
         "--locale=C.UTF-8" if sys.platform == "linux" else "--locale=C", "--no-sync",
         "--no-instructions"],
        capture_output=True, text=True, timeout=120, cwd=folder, check=False, **run_as)
    if init.returncode != 0:
        raise PostgresError(f"initdb exited {init.returncode}:\n{init.stdout[-3000:]}\n"
                            f"{init.stderr[-3000:]}")


def start_postgres(bindir: Path, folder: Path, run_as: dict[str, Any],
                   settings: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start `postgres` on 127.0.0.1 at a free port, its socket in `folder`, with `settings`
    (-c name=value); return once it accepts connections."""
    import psycopg
    data, log = folder / "data", folder / "postgres.log"
    options = {"listen_addresses": LOCAL, "unix_socket_directories": str(folder),
               "max_connections": "250", **settings}
    for _attempt in range(3):   # free_port() can lose a race for the port; try another
        port = free_port()
        seen = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*pdeathsig(), str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                 *[a for k, v in options.items() for a in ("-c", f"{k}={v}")]],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=folder, **run_as)
        url = f"postgresql://postgres@{LOCAL}:{port}/postgres"
        deadline = time.monotonic() + READY_TIMEOUT
        for _poll in range(int(READY_TIMEOUT / 0.05) + 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            try:
                with psycopg.connect(url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return proc, port
            except psycopg.OperationalError:
                time.sleep(0.05)
        stop_postgres(proc)
        text = log.read_bytes()[seen:].decode(errors="replace")
        if "could not bind" not in text and "Address already in use" not in text:
            break
    raise PostgresError(f"PostgreSQL did not start:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def throwaway_cluster(*, durable: bool = False, parent: Path | None = None,
                      settings: dict[str, str] | None = None,
                      bindir: Path | None = None) -> Iterator[PostgresServer]:
    """A new cluster, running for the block, then stopped and deleted.

    durable: fsync, synchronous_commit and full_page_writes on, and memory settings for a
    production-like server (DURABLE); else fsync off (FAST). `settings` add to or override
    those. `parent`: the folder to make the cluster's folder in (default: the system's temp
    folder); put it on the disk being measured, and keep its path short (the server's Unix
    socket lives there). The cluster's folder must be reachable by the `postgres` user."""
    bindir = bindir or postgres_bindir()
    # Not in pytest's tmp_path: pytest's base folder is 0700 root, which the postgres user
    # cannot enter, and its deep path could overflow a Unix socket's 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="pacsd-pg-", dir=parent))
    proc = None
    try:
        if len(str(folder)) > SOCKET_PATH_MAX - 15:
            raise PostgresError(f"{folder}: too long a path for the server's Unix socket")
        run_as = as_postgres_user(folder)
        initdb(bindir, folder, run_as)
        proc, port = start_postgres(bindir, folder, run_as,
                                    {**(DURABLE if durable else FAST), **(settings or {})})
        yield PostgresServer(f"postgresql://postgres@{LOCAL}:{port}/postgres", folder)
    finally:
        if proc is not None:
            stop_postgres(proc)
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server: PostgresServer, prefix: str = "pacsd_test_",
                    template: str = "template0", strategy: str = "") -> str:
    """A new, empty UTF-8 database (from template0, so nothing added to template1 leaks in),
    or a copy of the database `template` (which nobody may be connected to; strategy
    FILE_COPY, PostgreSQL 15: copied file by file rather than through the WAL); its URL."""
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    how = f" STRATEGY {strategy}" if strategy else ""
    with server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" ENCODING \'UTF8\'{how}')
    return server.database_url(name)


def drop_database(server: PostgresServer, url: str) -> None:
    """Drop the database of `url`, even if connections to it are still open."""
    name = urlsplit(url).path.lstrip("/")
    with server.admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_database(server: PostgresServer, prefix: str = "pacsd_test_") -> Iterator[str]:
    """A fresh, empty database on `server` for the block; its URL. Dropped at the end even if
    connections to it are still open."""
    url = create_database(server, prefix)
    try:
        yield url
    finally:
        drop_database(server, url)
