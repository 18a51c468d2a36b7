"""`pacsd series move`: file a series under another study."""

from __future__ import annotations

import argparse

from pacsd.cli.common import audit_record, correct, who
from pacsd.config import Config

HELP = "move a series to another study, or split it off into a new study of its own"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("move",), help="move: file it under --to-study")
    parser.add_argument("uid", metavar="UID", help="the Series Instance UID")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-study", metavar="UID",
                       help="the Study Instance UID of the study it belongs to (it takes that "
                            "study's patient and study attributes)")
    where.add_argument("--to-new-study", action="store_true",
                       help="split: a new study of the same patient, with a new Study "
                            "Instance UID and the old study's attributes")


def run(args: argparse.Namespace, cfg: Config) -> int:
    return correct(cfg, lambda c: c.move_series(args.uid, args.to_study, who()),
                   audit_record("correction", detail=f"series {args.uid}"))
