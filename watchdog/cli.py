"""`pacsd-watchdog --config FILE`: the loop, the config and the log.

Each round (every `[watchdog] interval` seconds): read DATA/pacsd.json to find the server, probe
it, let the policy decide, act. The server's config file is the only input: the data folder
gives pacsd.json (pid, ports, start time); the [watchdog] section gives the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# The probes never touch pixel data: keep pydicom from loading its image libraries (numpy,
# GDCM, Pillow...), which would triple the watchdog's memory for nothing.
for _name in ("numpy", "gdcm", "PIL", "imagecodecs", "pylibjpeg", "openjpeg", "jpeg_ls",
              "pyjpegls", "libjpeg", "rle"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import psutil  # noqa: E402

from pacsd import config as config_mod  # noqa: E402
from pacsd import logbook  # noqa: E402
from pacsd.nodes import remote  # noqa: E402
from pacsd.config import Config  # noqa: E402
from pacsd.errors import PacsError  # noqa: E402
from pacsd_watchdog import kill as act  # noqa: E402
from pacsd_watchdog import probes  # noqa: E402
from pacsd_watchdog.policy import ALERT, KILL, Policy  # noqa: E402

log = logging.getLogger("pacsd_watchdog")
REPORT_EVERY_S = 3600.0   # the on_kill command for the same refusal or alert, at most hourly


def setup_logging(cfg: Config, level: str) -> None:
    path = cfg.watchdog_log_path
    logbook.log_to(level, [logging.StreamHandler(sys.stderr) if path is None
                           else logbook.rotating_file(path, max_mb=5, backups=3)])
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)   # our own lines say it all


class Watchdog:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.settings = w = cfg.watchdog   # [watchdog]; cfg for the server's folders and TLS
        self.policy = Policy(grace=w.grace, failures=w.failures,
                             max_kills_per_hour=w.max_kills_per_hour)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")
        self.watching: int | None = None
        self.missing_since: float | None = None   # monotonic start of a streak with no pacsd
        self.alerted = False
        try:   # the C-ECHO probes speak TLS when the listener does
            self.tls = remote.self_tls(cfg)
        except (OSError, ssl.SSLError) as e:
            log.error("cannot load [dicom] tls_cert / tls_key for the C-ECHO probe: %s", e)
            self.tls = None
        self._reported: dict[str, float] = {}

    def probe(self, t: probes.Target) -> list[probes.Result]:
        """All probes at once: a round takes the longest timeout, not their sum."""
        timeout = self.settings.timeout
        chosen = [probes.http_alive, probes.xmlrpc_ping, probes.c_echo]
        if self.settings.roundtrip:
            chosen.append(probes.roundtrip)
        results = list(self.pool.map(lambda probe: probe(t, timeout), chosen))
        for r in results:
            if r.ok:
                log.debug("probe %s ok in %.0f ms%s", r.name, r.ms,
                          f" ({r.detail})" if r.detail.startswith("401") else "")
            else:
                log.debug("probe %s failed in %.0f ms: %s", r.name, r.ms, r.detail)
        return results

    def _report(self, event: str, reason: str, pid: int) -> None:
        """Run on_kill for a refusal or an alert, not more than hourly for the same event."""
        now = time.monotonic()
        if now - self._reported.get(event, -REPORT_EVERY_S) >= REPORT_EVERY_S:
            self._reported[event] = now
            act.run_on_kill(self.settings.on_kill, event, reason, pid)

    def _lookup(self) -> tuple[probes.Target | None, str]:
        """The server pacsd.json names, or None and why there is none (in plain words)."""
        runfile = self.cfg.runfile
        t = probes.Target.read(runfile)
        if t is None:
            where = "missing" if not runfile.exists() else "unreadable"
            return None, (f"{runfile} is {where}: pacsd is not running, or it runs with another "
                          f"data folder than [server] data = {self.cfg.data} in {self.cfg.source}")
        if not psutil.pid_exists(t.pid):
            return None, f"{runfile} names pid {t.pid}, which is not running"
        other = act.not_our_server(t)
        return (None, f"{runfile} names pid {t.pid}, but {other}") if other else (t, "")

    def find(self) -> probes.Target | None:
        """The server to probe; when there is none, a WARNING once per streak (a wrong data
        folder must not watch nothing for ever in silence) and an INFO when it is back."""
        t, why = self._lookup()
        if t is not None:
            if self.missing_since is not None:
                log.info("pacsd found (pid %d) after %.0f s with no server to watch",
                         t.pid, time.monotonic() - self.missing_since)
                self.missing_since = None
            return dataclasses.replace(t, tls=self.tls)
        if self.missing_since is None:
            self.missing_since = time.monotonic()
            if self.watching is not None:
                log.warning("pacsd pid %d is not running; waiting for it to be started again "
                            "(%s)", self.watching, why)
            else:
                log.warning("no pacsd to watch: %s. Looking again every %g s; said once until "
                            "it is found", why, self.settings.interval)
        else:
            log.debug("still no pacsd to watch: %s", why)
        self.watching = None
        return None

    def round(self) -> None:
        t = self.find()
        if t is None:
            return
        if t.pid != self.watching:
            log.info("watching pacsd pid %d (DICOM %s:%d, HTTP %s://%s:%d)", t.pid, t.dicom_host,
                     t.dicom_port, t.http_scheme, t.http_host, t.http_port)
            self.watching = t.pid
            self.alerted = False
            self.policy.reset()
        results = self.probe(t)
        failed = [r for r in results if not r.ok]
        now = time.time()
        d = self.policy.observe(not failed, now=now, started=t.started)
        if d.recovered:
            log.warning("pacsd is healthy again")
        if not failed:
            self.alerted = False
            return
        reason = "; ".join(f"{r.name}: {r.detail}" for r in failed)
        if d.in_grace:
            log.warning("round failed during the grace period: %s", reason)
            return
        log.warning("round failed (%d/%d): %s", d.failed, self.settings.failures, reason)
        if d.action == ALERT:
            if not self.alerted:   # once per failing streak; the rounds above go on
                n = self.policy.kills_last_hour(now)
                log.critical("NOT killing pacsd pid %d: %d kill(s) in the last hour "
                             "(max_kills_per_hour=%d); alert only. It keeps failing: %s",
                             t.pid, n, self.settings.max_kills_per_hour, reason)
                self.alerted = True
                act.count(self.cfg.watchdog_counts, "alert")
                self._report("alert", reason, t.pid)
        elif d.action == KILL:
            self.kill(t, reason, now)

    def kill(self, t: probes.Target, reason: str, now: float) -> None:
        cfg = self.cfg
        why = act.restart_cannot_help(cfg.storage_path, cfg.data, self.settings.min_free_mb) \
            or probes.index_full(reason)
        if why:
            log.error("NOT killing pacsd pid %d: restarting cannot help: %s (it fails: %s)",
                      t.pid, why, reason)
            self.policy.reset()
            act.count(self.cfg.watchdog_counts, "refused")
            self._report("refused", f"{why}; {reason}", t.pid)
            return
        other = act.not_our_server(t)
        if other:
            log.warning("not killing pid %d: %s", t.pid, other)
            return
        log.warning("killing pacsd pid %d: %s", t.pid, reason)
        how = act.kill(t, self.settings.term_wait, self.settings.launchd_label,
                       react_wait=self.settings.react_wait)
        log.warning("%s", how)
        self.policy.killed(time.time())
        act.count(self.cfg.watchdog_counts, "kill")
        act.run_on_kill(self.settings.on_kill, "kill", reason, t.pid)

    def run(self) -> None:
        cfg = self.cfg
        log.info("pacsd-watchdog started for %s (interval %g s, %d failed rounds, grace "
                 "%g s, at most %d kills an hour)", cfg.source, self.settings.interval,
                 self.settings.failures, self.settings.grace, self.settings.max_kills_per_hour)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.round()
            except Exception:  # noqa: BLE001 - the watchdog itself must not die of a bad round
                log.exception("watchdog round failed")
            self.stop.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("pacsd-watchdog stopped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pacsd-watchdog",
                                description="Kill a hung pacsd so that launchd/systemd "
                                            "restart it.")
    p.add_argument("--config", metavar="FILE", help="the server's TOML configuration file")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except PacsError as e:
        print(f"pacsd-watchdog: {e}", file=sys.stderr)
        return e.exit_code
    setup_logging(cfg, args.log_level)
    dog = Watchdog(cfg)

    def stop(*_: Any) -> None:
        dog.stop.set()   # only a flag: the loop ends after its round
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    dog.run()
    return 0
