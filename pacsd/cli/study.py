"""`pacsd study`: correct a study's attributes, move it to another patient, or label it."""

from __future__ import annotations

import argparse

from pacsd.cli.common import audit_record, correct, new_values, open_index, who
from pacsd.config import Config, valid_label

HELP = ("correct a study (accession, description, date, referring physician), move it, "
        "or change its labels")
LOGGING = "stderr"
FIELDS = (("--accession", "AccessionNumber"), ("--description", "StudyDescription"),
          ("--date", "StudyDate"), ("--time", "StudyTime"),
          ("--referring", "ReferringPhysicianName"), ("--study-id", "StudyID"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("update", "move", "label"),
                        help="update: new values for the study's attributes, in every one of "
                             "its files; move: file it under another patient (--to-patient); "
                             "label: add or remove labels ([[groups]] see studies by label)")
    parser.add_argument("uid", metavar="UID", help="the Study Instance UID")
    for flag, keyword in FIELDS:
        parser.add_argument(flag, metavar="VALUE", help=f"update: the new {keyword}")
    parser.add_argument("--to-patient", metavar="ID",
                        help="move: the Patient ID of the patient it belongs to")
    parser.add_argument("--add", metavar="LABEL", action="append", default=[],
                        help="label: a label to add (again for more)")
    parser.add_argument("--remove", metavar="LABEL", action="append", default=[],
                        help="label: a label to remove (again for more)")


def refuse(args: argparse.Namespace) -> str | None:
    given = new_values(args, FIELDS)
    if args.action == "update" and not given:
        return ("pacsd study update: give at least one new value ("
                + ", ".join(f for f, _ in FIELDS) + ")")
    if args.action == "move" and (not args.to_patient or given):
        return "pacsd study move UID --to-patient ID"
    if (args.action == "label") != bool(args.add or args.remove):
        return "pacsd study label UID [--add LABEL] [--remove LABEL], and --add/--remove only so"
    try:
        [valid_label(v) for v in args.add + args.remove]
    except ValueError as e:
        return f"pacsd study label: {e}"
    return None


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "label":
        index = open_index(cfg)
        try:
            after = index.relabel(args.uid, [valid_label(v) for v in args.add],
                                  [valid_label(v) for v in args.remove])
        finally:
            index.close()
        print(f"study {args.uid}: {', '.join(after) or 'no labels'}")
        return 0
    if args.action == "move":
        return correct(cfg, lambda c: c.move_study(args.uid, args.to_patient, who()),
                       audit_record("correction", studies=[args.uid],
                                    detail=f"moved to patient {args.to_patient}"))
    changed = new_values(args, FIELDS)
    return correct(cfg, lambda c: c.update_study(args.uid, changed, who()),
                   audit_record("correction", studies=[args.uid],
                                detail="changed: " + ", ".join(changed)))
