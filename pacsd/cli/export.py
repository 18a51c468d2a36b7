"""`pacsd export`: studies out of the archive into a folder or a ZIP, as a PS3.10 File-set with
a DICOMDIR, de-identified on request (PS3.15 Annex E: pacsd.imaging.deidentify).

Reads the archive directly, the server running or not, like the other commands; writes only
the destination (a ZIP is written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pacsd.cli.common import audit_record, audited, open_archive
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "export studies to a folder or a ZIP (a DICOMDIR File-set), de-identified on request"
LOGGING = "stderr"
PSEUDONYM_MAX = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uids", nargs="+", metavar="STUDY_UID",
                        help="the Study Instance UIDs to export")
    parser.add_argument("--to", required=True, metavar="DIR|FILE.zip",
                        help="where: a ZIP file (a name ending in .zip; must not exist) or a "
                             "folder (new or empty)")
    parser.add_argument("--deidentify", action="store_true",
                        help="de-identify per PS3.15 Annex E, Basic Profile: new UIDs "
                             "(consistent within this export), a pseudonym per patient, "
                             "private attributes removed; pixel data unchanged")
    parser.add_argument("--longitudinal", action="store_true",
                        help="with --deidentify: keep dates and times (Retain Longitudinal "
                             "Temporal Information with Full Dates Option)")
    parser.add_argument("--clean-descriptors", action="store_true",
                        help="with --deidentify: keep descriptions and comments, cleaned of "
                             "identifying values (Clean Descriptors Option)")
    parser.add_argument("--patient-name", metavar="NAME",
                        help="with --deidentify: the pseudonym's Patient's Name (default: one "
                             "made per patient)")
    parser.add_argument("--patient-id", metavar="ID",
                        help="with --deidentify: the pseudonym's Patient ID")


def refuse(args: argparse.Namespace) -> str | None:
    extras = [flag for flag, given in (("--longitudinal", args.longitudinal),
                                        ("--clean-descriptors", args.clean_descriptors),
                                        ("--patient-name", args.patient_name),
                                        ("--patient-id", args.patient_id)) if given]
    if extras and not args.deidentify:
        return f"pacsd export: {', '.join(extras)} go(es) with --deidentify"
    for value in (args.patient_name, args.patient_id):
        if value is not None and (not value.strip() or len(value) > PSEUDONYM_MAX
                                  or "\\" in value):
            return (f"pacsd export: a pseudonym has 1 to {PSEUDONYM_MAX} characters, "
                    "without backslashes")
    to = Path(args.to)
    if to.suffix.lower() == ".zip":
        if to.exists():
            return f"pacsd export: {to} exists; name a new file"
    elif to.exists() and (not to.is_dir() or any(to.iterdir())):
        return f"pacsd export: {to} is not an empty folder; name a new or empty one"
    return None


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.imaging.deidentify import Deidentifier, Options, readme_text
    from pacsd.imaging.media import write_folder, zip_stream
    from pacsd.query import studies
    # One audit record (an export, 110106): the studies, where to, de-identified or not.
    record = audit_record("download", studies=list(args.uids)[:100],
                          detail=f"pacsd export to {args.to}"
                          + (", de-identified" if args.deidentify else ""))
    archive = open_archive(cfg)
    try:
        with audited(cfg, record):
            paths = []
            for uid in args.uids:
                insts = studies.stored_in("STUDY", uid)
                if not insts:
                    record.outcome, record.detail = "refused", f"no study {uid}"
                    print(f"pacsd: no study {uid} is stored", file=sys.stderr)
                    return EXIT_FAILURE
                paths += [archive.store.placed(i.path) for i in insts]
            deid = Deidentifier(Options(
                retain_longitudinal=args.longitudinal, clean_descriptors=args.clean_descriptors,
                patient_name=args.patient_name, patient_id=args.patient_id)
            ) if args.deidentify else None
            transform = deid.apply if deid is not None else None

            def trailer() -> list[tuple[str, bytes]]:
                return [("README.txt", readme_text(deid).encode())] if deid is not None else []
            to = Path(args.to)
            if to.suffix.lower() == ".zip":
                tmp = to.with_name(to.name + ".part")
                try:
                    with open(tmp, "wb") as f:
                        for chunk in zip_stream(paths, transform=transform, trailer=trailer):
                            f.write(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, to)
                finally:
                    tmp.unlink(missing_ok=True)
                count = deid.count if deid is not None else len(paths)
            else:
                to.mkdir(parents=True, exist_ok=True)
                count = write_folder(paths, to, transform=transform, trailer=trailer)
            record.count = count
    finally:
        archive.store.close()
        archive.index.close()
    print(f"exported {count} instance(s) of {len(args.uids)} study(ies) to {to}"
          + (" (de-identified, PS3.15 Basic Profile"
             + (", full dates kept" if args.longitudinal else "")
             + (", descriptors cleaned" if args.clean_descriptors else "") + ")"
             if deid is not None else ""))
    if deid is not None and deid.notes():
        print(readme_text(deid).split("\n\n", 1)[-1].rstrip())
    return EXIT_OK
