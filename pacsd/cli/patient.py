"""`pacsd patient`: correct a patient's attributes, or merge two patients."""

from __future__ import annotations

import argparse

from pacsd.cli.common import audit_record, correct, new_values, who
from pacsd.config import Config

HELP = "correct a patient (name, ID, birth date, sex, issuer) or merge two patients"
LOGGING = "stderr"
FIELDS = (("--name", "PatientName"), ("--new-id", "PatientID"),
          ("--birth-date", "PatientBirthDate"), ("--sex", "PatientSex"),
          ("--new-issuer", "IssuerOfPatientID"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("update", "merge"),
                        help="update: new values for a patient's attributes, in every one of "
                             "its files; merge: file every study of --from under --into")
    parser.add_argument("patient_id", nargs="?", metavar="ID", help="update: the Patient ID")
    parser.add_argument("--issuer", metavar="ISSUER",
                        help="update: only the patient with this Issuer of Patient ID")
    for flag, keyword in FIELDS:
        parser.add_argument(flag, metavar="VALUE", help=f"update: the new {keyword}")
    parser.add_argument("--from", dest="from_id", metavar="ID", help="merge: this patient...")
    parser.add_argument("--into", dest="into_id", metavar="ID", help="merge: ...into this one")


def refuse(args: argparse.Namespace) -> str | None:
    if args.action == "update":
        if not args.patient_id:
            return "pacsd patient update: name the Patient ID"
        if not new_values(args, FIELDS):
            return ("pacsd patient update: give at least one new value ("
                    + ", ".join(f for f, _ in FIELDS) + ")")
    elif not (args.from_id and args.into_id) or args.patient_id:
        return "pacsd patient merge: --from ID --into ID"
    return None


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "merge":
        return correct(cfg, lambda c: c.merge_patients(args.from_id, args.into_id, who()),
                       audit_record("correction", patients=[(args.from_id, ""),
                                                            (args.into_id, "")], detail="merge"))
    changed = new_values(args, FIELDS)
    return correct(cfg, lambda c: c.update_patient(args.patient_id, changed,
                                                   who(), issuer=args.issuer),
                   audit_record("correction", patients=[(args.patient_id, "")],
                                detail="changed: " + ", ".join(changed)))
