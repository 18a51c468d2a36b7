"""`/metrics`: the server's figures in Prometheus' text exposition format (version 0.0.4), for
the monitoring IT already runs (docs/monitoring.md has a scrape config and alert rules).

Open to callers on this machine (loopback, like /status) and to logged-in administrators;
anyone else gets 401 (no credentials, from pacsd.web.auth) or 403 (a user who is not an
administrator). Cheap at every scrape: counters kept in memory since start (the DICOM side's
pacsd.dimse.stats, the index writer's commit times), one statvfs, one index probe (MAX of an
indexed column), the routing queue's queued and dead jobs (index ranges), and a small JSON
file the watchdog keeps.
Written by hand: the format is a few lines of text, not worth a dependency.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from typing import Any, Iterable

import bottle

from pacsd import __version__
from pacsd.dicom_status import SUCCESS, status_class
from pacsd.query import studies
from pacsd.web.app import new_app
from pacsd.web.auth import is_admin, is_loopback
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Shown at 0 before the first one, so that rate() and increase() see the counter start.
OPERATIONS = ("C-ECHO", "C-STORE", "C-FIND", "C-GET", "C-MOVE", "N-ACTION")
REJECT_REASONS = ("refused", "limit")
WATCHDOG_EVENTS = (("kill", "pacsd_watchdog_kills_total",
                    "pacsd processes the watchdog killed (hung or failing health probes)."),
                   ("refused", "pacsd_watchdog_refusals_total",
                    "Kills the watchdog refused because a restart could not help (disk full, "
                    "storage missing)."),
                   ("alert", "pacsd_watchdog_alerts_total",
                    "Failing streaks the watchdog only alerted on (max_kills_per_hour reached)."))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class Exposition:
    """The text format: per family `# HELP`, `# TYPE`, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]], suffix: str = "") -> None:
        """One metric family; `suffix` is added to each sample's name (counters: _total is
        part of `name` already)."""
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {escaped}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.sample(name + suffix, labels, value)

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{inner}}} {_number(value)}" if inner
                          else f"{name} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float,
            labels: dict[str, str] | None = None) -> None:
        self.family(name, kind, help_text, [(labels or {}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _watchdog_counts(rt: Runtime) -> dict[str, float]:
    """What the watchdog recorded (pacsd_watchdog.kill.count): {} if it never acted."""
    try:
        data = json.loads(rt.cfg.watchdog_counts.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def render(rt: Runtime) -> str:
    """The whole exposition, as text."""
    cfg, index = rt.cfg, rt.archive.index
    out = Exposition()
    out.one("pacsd_up", "gauge", "1 while pacsd answers.", 1)
    out.one("pacsd_build_info", "gauge", "The running version, AE title and node.", 1,
            {"version": __version__, "aet": cfg.dicom_aet, "node": index.node})
    out.one("pacsd_start_time_seconds", "gauge", "When this pacsd started (Unix time).",
            rt.started)

    d = rt.dicom_stats()
    out.one("pacsd_dicom_associations", "gauge", "DICOM associations open now.",
            int(d.get("associations_active", rt.associations())))
    out.one("pacsd_dicom_associations_accepted_total", "counter",
            "DICOM associations accepted since start.", int(d.get("associations_accepted", 0)))
    rejected = {r: 0 for r in REJECT_REASONS} | dict(d.get("associations_rejected", {}))
    out.family("pacsd_dicom_associations_rejected_total", "counter",
               "DICOM associations refused since start: refused (calling AE title, peer "
               "address, a plugin) or limit (all associations in use).",
               [({"reason": r}, n) for r, n in sorted(rejected.items())])
    stores = {SUCCESS: 0} | dict(d.get("stores", {}))
    out.family("pacsd_dicom_stores_total", "counter",
               "C-STORE requests answered since start, by the DICOM status answered "
               "(0x0000 stored; 0xB000-0xBFFF stored with a warning; others refused).",
               [({"status": f"0x{s:04X}" if s >= 0 else "none", "result": status_class(s)}, n)
                for s, n in sorted(stores.items())])
    requests = {op: 0 for op in OPERATIONS} | dict(d.get("requests", {}))
    out.family("pacsd_dicom_requests_total", "counter",
               "DIMSE requests received since start, by operation.",
               [({"operation": op}, n) for op, n in sorted(requests.items())])
    out.one("pacsd_storage_commitments_pending", "gauge",
            "Storage commitment requests queued or being answered.",
            int(d.get("commitments_pending", 0)))

    if "workers" in d:   # pacsd.daemon.workers
        out.one("pacsd_dicom_workers", "gauge", "DICOM worker processes serving now.",
                int(d["workers"]))
        out.one("pacsd_dicom_worker_restarts_total", "counter",
                "DICOM worker processes that died and were started again.",
                int(d.get("worker_restarts", 0)))

    # The index writers: this process's, and each DICOM worker's own (added up).
    w = d.get("index", {})
    out.one("pacsd_index_write_queue", "gauge",
            "Writes waiting for the index writer threads.",
            index.queue_depth + int(w.get("write_queue", 0)))
    h = index.commit_times.snapshot()
    wc = w.get("commits", {})
    h = dataclasses.replace(
        h, counts=tuple(n + int(wc.get("buckets", {}).get(str(i), 0))
                        for i, n in enumerate(h.counts)),
        count=h.count + int(wc.get("count", 0)), total=h.total + float(wc.get("total", 0.0)))
    out.lines.append("# HELP pacsd_index_commit_seconds Time of each index writer commit "
                     "(a batch of writes, from its start to durable), since start.")
    out.lines.append("# TYPE pacsd_index_commit_seconds histogram")
    for bound, n in zip(h.bounds, h.counts):
        out.sample("pacsd_index_commit_seconds_bucket", {"le": _number(float(bound))}, n)
    out.sample("pacsd_index_commit_seconds_bucket", {"le": "+Inf"}, h.count)
    out.sample("pacsd_index_commit_seconds_sum", {}, h.total)
    out.sample("pacsd_index_commit_seconds_count", {}, h.count)
    out.one("pacsd_index_commit_retries_total", "counter",
            "Index batches run again after a deadlock or a lost connection.",
            index.retries + int(w.get("retries", 0)))
    out.one("pacsd_index_full", "gauge",
            "1 while the index's volume is full (nothing can be stored).", int(index.full))

    read_ok = 1
    try:
        last = studies.last_received()
        jobs = rt.outbox.depths() if rt.outbox is not None else None
        damaged = rt.archive.index.damage_count()
        binned = rt.archive.index.bin_totals()
    except Exception as e:  # noqa: BLE001 - the scrape says so; the rest still answers
        log.debug("/metrics: cannot read the index: %s", e)
        last, jobs, damaged, binned, read_ok = None, None, None, None, 0
    out.one("pacsd_index_readable", "gauge",
            "1 if this scrape could read the index, else 0.", read_ok)
    if last is not None:
        out.one("pacsd_last_stored_timestamp_seconds", "gauge",
                "When the newest stored instance was received (Unix time); absent while "
                "nothing is stored.", last)
    if damaged is not None and binned is not None:
        out.one("pacsd_damaged_files", "gauge",
                "Stored files found missing or changed since they were stored (never sent "
                "until put back; see `pacsd verify`).", damaged)
        out.one("pacsd_trash_bytes", "gauge",
                "Bytes in the recycle bin (deleted, restorable until emptied).", binned[1])
    if jobs is not None:
        out.family("pacsd_route_jobs", "gauge",
                   "Routing outbox jobs by state: queued (waiting or retrying), dead (gave up: "
                   "the dead-letter list).",
                   [({"state": s}, n) for s, n in sorted(jobs.items())])

    try:
        disk = shutil.disk_usage(cfg.storage_path)
        out.one("pacsd_storage_free_bytes", "gauge",
                "Free bytes on the storage volume (for an unprivileged user).", disk.free)
        out.one("pacsd_storage_size_bytes", "gauge",
                "Total size of the storage volume, in bytes.", disk.total)
    except OSError as e:
        log.debug("/metrics: cannot stat the storage folder: %s", e)
    out.one("pacsd_storage_min_free_bytes", "gauge",
            "[storage] min_free_mb in bytes: below it new images are refused.",
            cfg.storage_min_free_mb << 20)

    counts = _watchdog_counts(rt)
    for event, name, help_text in WATCHDOG_EVENTS:
        out.one(name, "counter", help_text, counts.get(event, 0))
    if "last_kill" in counts:
        out.one("pacsd_watchdog_last_kill_timestamp_seconds", "gauge",
                "When the watchdog last killed pacsd (Unix time).", counts["last_kill"])
    return out.text()


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()

    @app.get("/metrics")
    def metrics() -> Any:
        env = bottle.request.environ
        # Auth lets loopback callers through without credentials (OPEN_ON_LOOPBACK) and asks
        # everyone else to log in; of those, only administrators may read the figures.
        if not (is_loopback(client_of(env)) or is_admin(env)):
            raise bottle.HTTPError(403, "/metrics is for administrators (or this machine)")
        bottle.response.content_type = CONTENT_TYPE
        bottle.response.set_header("Cache-Control", "no-store")
        return render(rt)

    return app
