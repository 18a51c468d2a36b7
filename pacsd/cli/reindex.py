"""`pacsd reindex`: rebuild the index from the stored files (the server stopped)."""

from __future__ import annotations

import argparse
import os

from pacsd.cli.common import Progress, open_archive
from pacsd.config import Config
from pacsd.errors import EXIT_OK, PacsError

HELP = "rebuild the index from the stored files (server stopped; every node of a shared index)"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="rebuild even though another node seems to hold the index (it died "
                             "without giving back its leases)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.daemon.server import lock_data_folder
    fd = lock_data_folder(cfg.data)   # the server must be stopped
    try:
        archive = open_archive(cfg)
        try:
            bar = Progress(0, "reindex")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar(done)
            # Several nodes: this one is stopped, and so must the others be (a node storing
            # meanwhile would lose its rows); a running node holds its housekeeping leases.
            others = [(n, h, left) for n, h, left in archive.index.leases() if n != "reindex"]
            if others and not cfg.index_is_sqlite and not args.force:
                name, holder, left = others[0]
                raise PacsError(f"node {holder} still uses this index (it holds lease {name!r} "
                                f"for {left:.0f} s more): stop every pacsd node first, or, if "
                                "it is really gone, wait or use --force")
            if not archive.index.lease("reindex", 24 * 3600):
                raise PacsError("another node is rebuilding this index (lease 'reindex' held by "
                                f"{archive.index.lease_holder('reindex')})")
            try:
                n = archive.reindex(progress)
            finally:
                archive.index.release("reindex")
        finally:
            archive.index.close()
    finally:
        os.close(fd)
    print(f"reindexed {n} instance(s) from {cfg.storage_path}")
    return EXIT_OK
