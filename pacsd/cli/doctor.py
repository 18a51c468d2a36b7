"""`pacsd doctor`: check each node (or one) and our own listener; OK / WARN / FAIL."""

from __future__ import annotations

import argparse
import json
import sys

from pacsd.cli.common import open_accounts
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK, PacsError

HELP = "check the nodes: name, network, AE titles, C-ECHO, the way back to us, what they accept"
# pynetdicom narrates rejections and timeouts at ERROR: the findings say it in plain words.
LOGGING = "quiet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", nargs="?", help="only this node (name or AE title)")
    parser.add_argument("--json", action="store_true", help="a machine-readable report")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="seconds each network step may take (default 5)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Check each node (or only NODE) and our own listener; plain words, OK / WARN / FAIL."""
    from pacsd import doctor
    notes: list[str] = []
    try:
        with open_accounts(cfg) as accounts:
            nodes = accounts.nodes()
            if args.node:
                node = accounts.node(args.node)
                nodes = [(n, s) for n, s in nodes if n == node]
    except PacsError as e:   # the index is unavailable: the config file's nodes still count
        notes.append(f"nodes added on the admin page not checked: {e}")
        nodes = [(n, "config") for n in cfg.nodes]
        if args.node:
            nodes = [(n, s) for n, s in nodes if args.node in (n.name, n.aet)]
    if args.node and not nodes:
        print(f"pacsd: no node named {args.node!r} (see `pacsd nodes`)", file=sys.stderr)
        return EXIT_FAILURE
    me = doctor.own_listener(cfg, args.timeout)
    reports = []
    if not args.json:
        print(doctor.render_listener(me), flush=True)
        for note in notes:
            print(f"  WARN  {'nodes':<10} {note}", flush=True)
        if not nodes:
            print("no nodes: add [[nodes]] to the config file or use the admin page")
    for report in doctor.check_all(cfg, nodes, me, args.timeout):
        reports.append(report)
        if not args.json:
            print(doctor.render(report), flush=True)
    failed = [r for r in reports if r.failed]
    listener_failed = me.finding is not None and me.finding.level == doctor.FAIL
    if args.json:
        print(json.dumps(doctor.as_json(cfg.dicom_aet, me, notes, reports), indent=1))
    elif reports:
        print(f"{len(reports)} node(s) checked: {len(reports) - len(failed)} passed"
              + (f", {len(failed)} failed: " + ", ".join(r.node.name for r in failed)
                 if failed else ""))
    return EXIT_FAILURE if failed or listener_failed else EXIT_OK
