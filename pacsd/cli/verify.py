"""`pacsd verify`: read stored files back and compare them with their content hash."""

from __future__ import annotations

import argparse
import json
import sys

from pacsd.cli.common import Progress, open_archive
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "check stored files against the content hash kept when they were stored"
LOGGING = "stderr"
BATCH = 500


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="UID", help="the files of one study")
    which.add_argument("--series", metavar="UID", help="the files of one series")
    which.add_argument("--all", action="store_true",
                       help="every stored file (reads the whole archive: hours for terabytes)")
    parser.add_argument("--json", action="store_true", help="the damaged files as JSON")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Without --study, --series or --all: the files already found damaged (by the background
    check or an earlier verify), checked again. Exit 1 when any file is damaged."""
    from pacsd.storage.integrity import check_all
    archive = open_archive(cfg)
    index, store = archive.index, archive.store
    try:
        if args.study or args.series:
            level, uid = ("STUDY", args.study) if args.study else ("SERIES", args.series)
            items = index.checkable_in(level, uid)
            if not items:
                print(f"pacsd: no {level.lower()} {uid} is stored", file=sys.stderr)
                return EXIT_FAILURE
            found = check_all(store, index, items)
            checked = found.checked
        elif args.all:
            total = index.counts()["instances"]
            bar = Progress(total, "verify")
            checked, last = 0, 0
            while True:
                items = index.checkable_after(last, BATCH)
                if not items:
                    break
                check_all(store, index, items)
                checked += len(items)
                last = items[-1].id
                bar(min(checked, total))
        else:
            items = index.checkable([d.sop_instance_uid for d in index.damage()])
            checked = check_all(store, index, items).checked
        damaged = index.damage() if args.all or not (args.study or args.series) else [
            d for d in index.damage() if d.sop_instance_uid in {i.sop_instance_uid
                                                                for i in items}]
    finally:
        store.close()
        index.close()
    if args.json:
        print(json.dumps({"checked": checked, "damaged": [d.as_dict() for d in damaged]},
                         indent=1))
    else:
        print(f"checked {checked} file(s): "
              + (f"{len(damaged)} damaged" if damaged else "all sound"))
        for d in damaged:
            print(f"  {d.problem:<10} {d.sop_instance_uid} (study {d.study_instance_uid}, "
                  f"patient {d.patient_id}): {cfg.storage_path / d.path}")
    return EXIT_FAILURE if damaged else EXIT_OK
