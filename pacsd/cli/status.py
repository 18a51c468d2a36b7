"""`pacsd status`: is the server up (pacsd.json, its pid, a C-ECHO); what it holds."""

from __future__ import annotations

import argparse
import json
import shutil
import time

from pacsd import __version__
from pacsd.cli.common import EXIT_NOT_RUNNING, open_index
from pacsd.config import Config
from pacsd.errors import EXIT_OK

HELP = "is the server up; what does it hold"
LOGGING = None
WHERE = "folder"   # the report says whether the server runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the report as JSON")


def run(args: argparse.Namespace, cfg: Config) -> int:
    import psutil
    try:
        run = json.loads(cfg.runfile.read_text())
    except (OSError, ValueError):
        run = None
    report: dict = {"version": __version__, "data": str(cfg.data),
                    "config": cfg.source, "storage": str(cfg.storage_path)}
    running = bool(run) and psutil.pid_exists(int(run["pid"]))
    report["running"] = running
    if running:
        host = "127.0.0.1" if run["dicom_bind"] in ("", "0.0.0.0") else run["dicom_bind"]
        from pacsd.nodes import remote
        from pacsd.config import Node
        ok, ms, message = remote.echo(cfg, Node("self", run["aet"], host, int(run["dicom_port"])),
                                       timeout=5.0, tls=remote.self_tls(cfg))
        report.update(pid=run["pid"], aet=run["aet"], dicom_port=run["dicom_port"],
                      uptime_s=round(time.time() - run["started"]),
                      echo=f"ok {ms:.0f} ms" if ok else f"FAILED ({message})")
        if run.get("hl7_port"):   # [hl7] on
            report["hl7_port"] = run["hl7_port"]
        running = ok
    if not cfg.index_is_sqlite or cfg.index_path.exists():
        idx = open_index(cfg)
        try:
            report["index"] = idx.counts()
        finally:
            idx.close()
    if cfg.storage_path.exists():
        report["disk_free_gb"] = round(shutil.disk_usage(cfg.storage_path).free / 1e9, 1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k:>12}: {v}")
    return EXIT_OK if running else EXIT_NOT_RUNNING
