"""`pacsd audit`: search the audit trail (pacsd.audit), newest first."""

from __future__ import annotations

import argparse
import json

from pacsd.audit import ACTIONS, Search, folder_of, search, when
from pacsd.cli.common import positive_int
from pacsd.config import Config
from pacsd.errors import EXIT_OK, EXIT_USAGE

HELP = "search the audit trail: who did what to which patient's studies, when, from where"
LOGGING = "plain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patient", metavar="ID",
                        help="records of this patient (its Patient ID, or a part of its name)")
    parser.add_argument("--study", metavar="UID", help="records of this Study Instance UID")
    parser.add_argument("--user", metavar="NAME",
                        help="records of this user, calling AE title or command-line user")
    parser.add_argument("--action", choices=ACTIONS, help="records of this action only")
    parser.add_argument("--since", metavar="DATE",
                        help="from this date or time (2026-12-07, '2026-12-07 14:30', or an "
                             "age: 30m, 12h, 7d)")
    parser.add_argument("--until", metavar="DATE", help="up to this date or time (a date: "
                                                        "its whole day)")
    parser.add_argument("--limit", type=positive_int, default=100, metavar="N",
                        help="at most N records, the newest (default 100)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        since = when(args.since) if args.since else None
        until = when(args.until, end=True) if args.until else None
    except ValueError as e:
        print(f"pacsd audit: {e}")
        return EXIT_USAGE
    found = search(folder_of(cfg.data), Search(
        patient=args.patient or "", study=args.study or "", user=args.user or "",
        action=args.action or "", since=since, until=until, limit=args.limit))
    for r in found:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        who = r.get("user") or "-"
        if r.get("address"):
            who += f"@{r['address']}"
        patients = ", ".join(f"{p.get('id', '')} {p.get('name', '')}".strip()
                             for p in r.get("patients") or ())
        what = " ".join(filter(None, [
            f"patient {patients}" if patients else "",
            "study " + ", ".join(r.get("studies") or ()) if r.get("studies") else "",
            f"({r['count']} instances)" if r.get("count") else "",
            r.get("detail") or ""]))
        print(f"{str(r.get('time', ''))[:23]}  {r.get('action', ''):<10} {r.get('outcome', ''):<7} "
              f"{r.get('via', ''):<5} {who}  {what}")
    if not args.json and not found:
        print("no audit records match" + ("" if cfg.audit.enabled
                                           else " ([audit] enabled is false)"))
    return EXIT_OK
