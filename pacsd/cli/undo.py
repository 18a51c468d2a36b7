"""`pacsd undo`: undo the last deletion or correction of an object."""

from __future__ import annotations

import argparse

from pacsd.cli.common import audit_record, correct, who
from pacsd.config import Config

HELP = "undo the last deletion or correction of a patient, study, series or instance"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uid", metavar="UID",
                        help="the UID (or, for a patient, the Patient ID) that `pacsd history` "
                             "names")


def run(args: argparse.Namespace, cfg: Config) -> int:
    return correct(cfg, lambda c: c.undo(args.uid, who()),
                   audit_record("undo", detail=args.uid,
                                studies=[args.uid] if "." in args.uid else []))
