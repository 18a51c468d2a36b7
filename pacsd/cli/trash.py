"""`pacsd trash`: the recycle bin (pacsd.storage.trash): list it, restore from it, empty it."""

from __future__ import annotations

import argparse
import json
import time

from pacsd.cli.common import audit_record, audited, open_archive, who
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "the recycle bin of deleted studies, series and instances: list, restore, empty"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "restore", "empty"), default="list",
                        help="list what the bin holds (default), restore a study, series or "
                             "instance (byte for byte, as it was), or empty the bin for good")
    parser.add_argument("uid", nargs="?", metavar="UID",
                        help="restore: the Study, Series or SOP Instance UID, or the deletion's "
                             "number that `pacsd trash list` shows")
    parser.add_argument("--older-than", type=float, metavar="DAYS",
                        help="empty: only what was deleted more than DAYS days ago")
    parser.add_argument("--json", action="store_true", help="list: as JSON")


def refuse(args: argparse.Namespace) -> str | None:
    if args.action == "restore" and not args.uid:
        return "pacsd trash restore: name the UID (or the deletion's number) to restore"
    if args.action != "restore" and args.uid:
        return f"pacsd trash {args.action}: takes no UID"
    if args.older_than is not None and (args.action != "empty" or args.older_than < 0):
        return "pacsd trash: --older-than DAYS (0 or more) goes with `empty`"
    return None


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.storage.archive import command_started
    archive = open_archive(cfg)
    mark = command_started(cfg.data)   # killed midway: the next start of the server recovers
    try:
        if args.action == "restore":
            record = audit_record("restore", detail=args.uid,
                                  studies=[args.uid] if "." in args.uid else [])
            with audited(cfg, record):
                done = archive.bin.restore(args.uid, who())
                record.count = done.restored
                if not done.restored:
                    record.outcome = "refused"
            if done.restored:
                print(f"restored {done.restored} instance(s) of {args.uid}")
            if done.already_stored:
                print(f"{len(done.already_stored)} instance(s) left in the bin: stored again "
                      "since their deletion (delete the stored copy first to restore these): "
                      + ", ".join(done.already_stored[:5])
                      + (" ..." if len(done.already_stored) > 5 else ""))
            if done.missing:
                print(f"{len(done.missing)} instance(s) have no readable file in the bin: "
                      + ", ".join(done.missing[:5]) + (" ..." if len(done.missing) > 5 else ""))
            if not (done.restored or done.already_stored or done.missing):
                print(f"pacsd: nothing of {args.uid} is in the recycle bin (`pacsd trash list`)")
            return EXIT_OK if done.restored and not done.missing else EXIT_FAILURE
        if args.action == "empty":
            days = args.older_than
            record = audit_record("empty-bin", detail="all" if days is None
                                  else f"older than {days:g} days")
            with audited(cfg, record):
                deletions, instances, size = archive.bin.empty(
                    None if days is None else days * 86400, who(), "`pacsd trash empty`"
                    + (f" --older-than {days:g}" if days is not None else ""))
                record.count = instances
            print(f"emptied {deletions} deletion(s): {instances} instance(s), "
                  f"{size / 1e6:.1f} MB removed for good")
            return EXIT_OK
        entries = archive.bin.entries()
        n, size = archive.index.bin_totals()
        if args.json:
            print(json.dumps({"instances": n, "bytes": size, "days": cfg.storage_trash_days,
                              "entries": [e.as_dict() for e in entries]}, indent=1))
            return EXIT_OK
        print(f"{n} instance(s), {size / 1e6:.1f} MB in the recycle bin; kept "
              f"{cfg.storage_trash_days} day(s) ([storage] trash_days)")
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.deleted))
            what = "deleted" if e.action == "delete" else f"previous version ({e.action})"
            print(f"#{e.deletion} {when} {e.level.lower()} {e.uid}: patient {e.patient_id} "
                  f"{e.patient_name}, study {e.study_date} {e.study_description!r}, "
                  f"{e.instances} instance(s), {e.bytes / 1e6:.1f} MB; {what} by {e.who}")
        return EXIT_OK
    finally:
        archive.store.close()
        archive.index.close()
        mark.unlink(missing_ok=True)
