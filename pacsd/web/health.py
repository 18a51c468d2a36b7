"""Liveness and status: `/testdbalive` (what the watchdog probes, as in OsiriX) and `/status`."""

from __future__ import annotations

import shutil
import time
from typing import Any

import bottle

from pacsd import __version__
from pacsd.errors import IndexFull, IndexUnavailable
from pacsd.web.app import new_app
from pacsd.web.runtime import Runtime

ALIVE_TEXT = "Test DB Alive succeeded"


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()

    @app.get("/testdbalive")
    def testdbalive() -> str:
        # A real read and a real write through the one index writer: a wedged index or a
        # dead writer fails here within a second, and the watchdog acts on it.
        try:
            rt.archive.index.probe(timeout=1.0)
        except IndexFull as e:
            # Not a hang: 507 (Insufficient Storage, RFC 4918), which the watchdog reads as
            # "a restart cannot help" (pacsd_watchdog.probes.INDEX_FULL).
            raise bottle.HTTPError(507, f"Test DB Alive failed: index volume full: {e}. A "
                                        "restart would not help") from None
        except (IndexUnavailable, TimeoutError) as e:
            raise bottle.HTTPError(503, f"Test DB Alive failed: {e}") from None
        # As OsiriX's web portal answers it (WebPortalConnection.mm): text/html, this text.
        bottle.response.content_type = "text/html; charset=utf-8"
        return ALIVE_TEXT

    app.get("/status", callback=lambda: status(rt))
    return app


def status(rt: Runtime) -> dict[str, Any]:
    """What `/status` says; the admin page's figures start from it."""
    cfg = rt.cfg
    disk = shutil.disk_usage(cfg.storage_path)
    workers, restarts = rt.dicom_workers()
    return {
        "version": __version__,
        "uptime_s": round(time.time() - rt.started, 1),
        "aet": cfg.dicom_aet,
        "associations": rt.associations(),
        # DICOM worker processes alive, replaced since start (0, 0: in the server's process)
        "dicom_workers": workers,
        "dicom_worker_restarts": restarts,
        "index": rt.archive.index.counts(),
        "trash": dict(zip(("instances", "bytes"), rt.archive.index.bin_totals())),
        # Stored files found missing or changed (never sent), and when the background check
        # last finished a pass over the archive (pacsd.storage.integrity).
        "integrity": {"damaged": rt.archive.index.damage_count(),
                      "last_pass_ended": rt.archive.index.cursor("scrub:ended")},
        "index_location": cfg.index_label,   # the file, or the URL without its password
        "node": rt.archive.index.node,      # which of several nodes answered
        "storage": str(cfg.storage_path),
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
    }
