"""`pacsd index copy`: copy the index, every row with its id, into another database."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pacsd.cli.common import EXIT_INTERRUPTED, Progress, add_common, positive_int
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

HELP = "the index database as a whole: copy it to another"
LOGGING = "stderr"
CONFIG = "sub"   # --config, --data on the `copy` subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    cp = add_common(subs.add_parser(
        "copy", help="copy the index (server stopped) into another database, e.g. PostgreSQL",
        description="Copy the configured index, every row with its id, into the database "
                    "--to names (sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE;"
                    " empty, or holding an interrupted copy), so that a clinic moves to "
                    "PostgreSQL without sending its images again. Stop pacsd first and keep it "
                    "stopped until the copy is done: rows stored meanwhile would be missed (its "
                    "data folder is locked meanwhile; with a PostgreSQL source, stop every node). "
                    "Interrupted (Ctrl-C, kill), the same command carries on where it stopped. "
                    "Verified by counts; then set [index] url to the URL and start pacsd."))
    cp.add_argument("--to", required=True, metavar="URL", help="the target database")
    cp.add_argument("--batch", type=positive_int, default=5000, metavar="N",
                    help="rows per transaction (default 5000)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Copy the configured index, rows with their ids, into the database `--to` names; then say
    how to switch to it. Resumable; verified by counts (exit 1 if they differ)."""
    from pacsd.index import backends
    from pacsd.daemon.server import lock_data_folder
    from pacsd.index.copy import IndexCopy
    try:
        backends.kind(args.to)
    except ValueError as e:
        print(f"pacsd: --to: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Rows stored while the copy runs would be missed: the source pacsd must be stopped, and
    # must stay stopped (its data folder is locked meanwhile).
    fd = lock_data_folder(cfg.data)
    try:
        with IndexCopy(cfg.index_url, args.to, batch=args.batch,
                       migrate_source=cfg.index_auto_migrate) as copy:
            print(f"copying index {copy.source_label} to {copy.target_label}, in batches of "
                  f"{args.batch} rows; pacsd must stay stopped until it is done", flush=True)
            if not cfg.index_is_sqlite:
                print("  the source is a shared index: stop every pacsd node that uses it, "
                      "not only this one", flush=True)
            for line in copy.prepare():
                print(f"  {line}", flush=True)
            bars: dict[str, Progress] = {}

            def progress(table: str, done: int, total: int, rate: float) -> None:
                bar = bars.setdefault(table, Progress(total, f"  {table:<12}"))
                bar(done, f"{rate:,.0f} rows/s" if rate else "")
            t0 = time.monotonic()
            tables = copy.copy(progress)
            seconds = time.monotonic() - t0
            checks = copy.verify()
    except KeyboardInterrupt:
        print("\npacsd: interrupted; the batches committed so far stay in the target: run the "
              "same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        os.close(fd)
    copied = sum(t.copied for t in tables)
    print(f"copied {copied:,} row(s) in {seconds:.1f} s ({copied / max(seconds, 1e-6):,.0f} "
          "rows/s)")
    for t in tables:
        resumed = f", {t.before:,} there already" if t.before else ""
        print(f"  {t.table:<12} {t.copied:>10,} row(s) in {t.seconds:6.1f} s "
              f"({t.copied / max(t.seconds, 1e-6):>9,.0f} rows/s){resumed}")
    print(f"  {'':<36} {'source':>12} {'target':>12}")
    for c in checks:
        print(f"  {c.what:<36} {c.source:>12,} {c.target:>12,}  {'ok' if c.ok else 'DIFFERENT'}")
    if not all(c.ok for c in checks):
        print(f"pacsd: the copy in {copy.target_label} differs from the source (see above): did "
              "a pacsd use the target meanwhile, or the source change after an interrupted "
              "copy? Empty the target and copy again.", file=sys.stderr)
        return EXIT_FAILURE
    where = cfg.source if cfg.source != "defaults" else "the config file"
    print(f"the copy is complete and verified. Next: in {where} set\n"
          f"  [index]\n  url = \"{backends.redacted(args.to)}\"\n"
          + ("(with the real password in place of ***) " if backends.redacted(args.to) != args.to
             else "")
          + "and start pacsd again; the storage folder stays as it is.")
    return EXIT_OK
