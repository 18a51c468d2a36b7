"""`pacsd serve`: run the server in the foreground."""

from __future__ import annotations

import argparse

from pacsd.cli.common import add_setting_flags
from pacsd.config import Config
from pacsd.errors import EXIT_OK

HELP = "run the server in the foreground"
LOGGING = "file"
WHERE = "folder"   # the data folder and config file it serves (a first line on stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # One flag per setting that declares one (sections.py), but --data, which every command has.
    add_setting_flags(parser, exclude=("--data",))


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.daemon.server import Server
    server = Server(cfg).catch_signals().start()
    server.serve_forever()
    return EXIT_OK
