"""`pacsd series move`: file a series under another study."""

from __future__ import annotations

import argparse

from pacsd.cli.common import correct, who
from pacsd.config import Config

HELP = "move a series to another study (it takes that study's patient and study attributes)"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("move",), help="move: file it under --to-study")
    parser.add_argument("uid", metavar="UID", help="the Series Instance UID")
    parser.add_argument("--to-study", metavar="UID", required=True,
                        help="the Study Instance UID of the study it belongs to")


def run(args: argparse.Namespace, cfg: Config) -> int:
    return correct(cfg, lambda c: c.move_series(args.uid, args.to_study, who()))
