"""`pacsd history`: what was done to the archive by hand (deletions, restores, purges)."""

from __future__ import annotations

import argparse
import json
import time

from pacsd.cli.common import open_index, positive_int
from pacsd.config import Config
from pacsd.errors import EXIT_OK

HELP = "what was deleted, restored or emptied from the bin, by whom and when"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uid", nargs="?", metavar="UID",
                        help="only what was done to this study, series or instance (a study's "
                             "UID also lists what was done to its series and instances)")
    parser.add_argument("--limit", type=positive_int, default=200, metavar="N",
                        help="the N most recent (default 200)")
    parser.add_argument("--json", action="store_true", help="as JSON")


def run(args: argparse.Namespace, cfg: Config) -> int:
    index = open_index(cfg)
    try:
        rows = index.history(args.uid, args.limit)
    finally:
        index.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
        return EXIT_OK
    if not rows:
        print("nothing recorded" + (f" for {args.uid}" if args.uid else ""))
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.at))
        extra = ""
        if r.action == "delete":
            extra = (f" (patient {r.detail.get('patient_id', '')}, study "
                     f"{r.detail.get('study_date', '')} {r.detail.get('study_description', '')!r})")
        elif r.action == "purge":
            extra = f" ({r.detail.get('why', '')})"
        elif r.action == "restore":
            extra = f" (of deletion #{r.detail.get('deletion', '?')})"
        print(f"#{r.id} {when} {r.action} {r.level.lower()} {r.uid}: {r.instances} "
              f"instance(s), by {r.who}{extra}")
    return EXIT_OK
