"""How the watchdog acts: make sure the PID is still that pacsd, ask for a stack dump, then
SIGTERM, wait, SIGKILL (or `launchctl kickstart -k` under launchd); and the `on_kill` command.
Also: when a restart cannot help (storage gone, disk full), say so instead of killing."""

from __future__ import annotations

import logging
import os
import shutil
import signal
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


def kill(t: Target, term_wait: float, launchd_label: str = "") -> str:
    """Stop the hung server; how it ended, for the log."""
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
            os.kill(t.pid, signal.SIGUSR1)   # faulthandler: every thread's stack to its log
            time.sleep(0.5)
        os.kill(t.pid, signal.SIGTERM)
    except ProcessLookupError:
        return "gone before it was signalled"
    if _wait_gone(t.pid, term_wait):
        return f"pacsd pid {t.pid} stopped after SIGTERM"
    try:
        os.kill(t.pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"pacsd pid {t.pid} stopped after SIGTERM"
    _wait_gone(t.pid, 10)
    return f"pacsd pid {t.pid} killed with SIGKILL"


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
