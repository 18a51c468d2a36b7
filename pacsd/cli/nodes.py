"""`pacsd nodes`: the remote DICOM nodes (config file and admin page), C-ECHO each."""

from __future__ import annotations

import argparse

from pacsd.cli.common import open_accounts
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "list the remote DICOM nodes (config file and admin page)"
LOGGING = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--echo", action="store_true", help="C-ECHO each node")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.nodes import remote
    with open_accounts(cfg) as accounts:
        nodes = accounts.nodes()
    if not nodes:
        print("no nodes: add [[nodes]] to the config file or use the admin page")
        return EXIT_OK
    failed = 0
    for n, source in nodes:
        line = f"{n.name:<20} {n.aet:<16} {n.host}:{n.port}  ({source})"
        if args.echo:
            ok, ms, message = remote.echo(cfg, n)
            failed += not ok
            detail = f"{ms:.0f} ms" + ("" if ok else f": {message}")
            line += f"  C-ECHO {'ok' if ok else 'FAILED'} ({detail})"
        print(line)
    return EXIT_FAILURE if failed else EXIT_OK
