"""How the watchdog acts: make sure the PID is still that pacsd, ask for a stack dump, then
SIGTERM, wait, SIGKILL (or `launchctl kickstart -k` under launchd); and the `on_kill` command.
Also: when a restart cannot help (storage gone, disk full), say so instead of killing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from pacsd_watchdog.probes import Target

log = logging.getLogger(__name__)


def not_our_server(t: Target) -> str | None:
    """Why the process at t.pid is not the pacsd that wrote pacsd.json (PID reuse, another
    program), or None when it is."""
    try:
        proc = psutil.Process(t.pid)
        cmdline = " ".join(proc.cmdline())
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return "it is gone"
    except psutil.Error as e:
        return f"it cannot be inspected ({e})"
    if "pacsd" not in cmdline or "serve" not in cmdline:
        return f"pid {t.pid} is now {cmdline[:80]!r}, not pacsd"
    if created > t.started + 1:
        return f"pid {t.pid} was created after that pacsd started (the PID was reused)"
    return None


def restart_cannot_help(storage: Path, data: Path, min_free_mb: int) -> str | None:
    """Why a fresh pacsd would be stuck just the same, or None."""
    if not storage.is_dir():
        return f"the storage folder {storage} is missing (an unmounted volume?)"
    if not os.access(data, os.W_OK):
        return f"the data folder {data} is not writable"
    free_mb = shutil.disk_usage(storage).free >> 20
    if free_mb < min_free_mb:
        return f"the storage volume has {free_mb} MB free (less than min_free_mb={min_free_mb})"
    return None


def _wait_gone(pid: int, seconds: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout=seconds)
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        pass
    return True


def stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, SIGTSTP, a tracer): it cannot run a SIGTERM
    handler, or anything else, until it is continued."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def listening(t: Target) -> bool:
    """Whether the server's HTTP listener still accepts a connection: the first thing pacsd
    closes when it handles SIGTERM, so the sign that it is stopping."""
    try:
        with socket.create_connection((t.http_host, t.http_port), timeout=0.5):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:
        return True   # no answer at all (a full backlog): no sign of stopping either


def _sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    _wait_gone(pid, 10)
    return True


def kill(t: Target, term_wait: float, launchd_label: str = "", react_wait: float = 5.0) -> str:
    """Stop the hung server; how it ended, for the log.

    A stopped process gets SIGKILL at once: it cannot handle SIGTERM. Otherwise SIGUSR1 (stack
    dump) and SIGTERM; a server that shows within `react_wait` s that it is stopping (its HTTP
    listener closes) gets the rest of `term_wait` to finish its clean stop, one that shows
    nothing (hung threads, SIGTERM ignored) gets SIGKILL then."""
    if stopped(t.pid):
        if _sigkill(t.pid):
            return (f"pacsd pid {t.pid} killed with SIGKILL at once: it was stopped (SIGSTOP) "
                    f"and could not have handled SIGTERM")
        return "gone before it was signalled"
    if launchd_label:
        # launchd restarts it itself, with its own stop sequence.
        done = subprocess.run(["launchctl", "kickstart", "-k", launchd_label],
                              capture_output=True, text=True, timeout=max(30.0, term_wait + 10))
        if done.returncode == 0:
            return f"restarted by launchctl kickstart -k {launchd_label}"
        log.error("launchctl kickstart -k %s failed (%s); using signals", launchd_label,
                  done.stderr.strip() or done.returncode)
    try:
        if hasattr(signal, "SIGUSR1"):
            os.kill(t.pid, signal.SIGUSR1)   # every thread's stack to pacsd's log
            time.sleep(0.5)
        os.kill(t.pid, signal.SIGTERM)
    except ProcessLookupError:
        return "gone before it was signalled"
    react = min(react_wait, term_wait)
    if _wait_gone(t.pid, react):
        return f"pacsd pid {t.pid} stopped after SIGTERM"
    if listening(t):
        if _sigkill(t.pid):
            return (f"pacsd pid {t.pid} killed with SIGKILL: no sign of stopping {react:g} s "
                    f"after SIGTERM (its HTTP listener still accepts)")
        return f"pacsd pid {t.pid} stopped after SIGTERM"
    if _wait_gone(t.pid, term_wait - react):
        return f"pacsd pid {t.pid} stopped after SIGTERM"
    if _sigkill(t.pid):
        return f"pacsd pid {t.pid} killed with SIGKILL"
    return f"pacsd pid {t.pid} stopped after SIGTERM"


def run_on_kill(command: str, event: str, reason: str, pid: int) -> None:
    """The IT person's own alert (mail, webhook): bounded in time, its failure only logged."""
    if not command:
        return
    env = {**os.environ, "PACSD_WATCHDOG_EVENT": event, "PACSD_WATCHDOG_REASON": reason,
           "PACSD_WATCHDOG_PID": str(pid)}
    try:
        done = subprocess.run(command, shell=True, env=env, timeout=60, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log.error("on_kill command exited %d: %s", done.returncode,
                      (done.stderr or done.stdout).strip()[:300])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("on_kill command failed: %s", e)


COUNTED = ("kill", "refused", "alert")


def count(path: Path, event: str, now: float | None = None) -> None:
    """Add one `event` (kill, refused, alert) to the counts kept in DATA/watchdog-counts.json,
    which pacsd's /metrics reads: {"kill": n, "refused": n, "alert": n, "last_kill": epoch}.
    Written whole and renamed into place, so a reader never sees half a file; a failure is
    logged, never fatal (the watchdog's work is done by then)."""
    counts = read_counts(path)
    counts[event] = int(counts.get(event, 0)) + 1
    counts[f"last_{event}"] = now if now is not None else time.time()
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(counts, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.error("cannot record the %s in %s: %s", event, path, e)


def read_counts(path: Path) -> dict[str, float]:
    """The counts in `path`: {} when it is missing or unreadable (never raises)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)}
