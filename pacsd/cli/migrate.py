"""`pacsd migrate`: bring the index's schema up to date, or say where it stands."""

from __future__ import annotations

import argparse

from pacsd.config import Config
from pacsd.errors import EXIT_OK, IndexUnavailable, PacsError

HELP = "bring the index's schema up to date"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", action="store_true", help="only say which schema version the index has and what "
                             "would change; change nothing")


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Bring the index's schema to this pacsd's version (what `serve` does at start-up unless
    [index] auto_migrate = false), or with --status only say where it stands."""
    from pacsd.index import backends
    from pacsd.index import migrations
    from pacsd.index.models import database
    db = backends.connect(cfg.index_url, pool_size=2)
    database.initialize(db)
    try:
        with database.connection_context():
            before, todo = migrations.version(db), migrations.pending(db)
            if before > migrations.LATEST:   # refused ("upgrade pacsd"), not "up to date"
                migrations.check(db, cfg.index_label)
            if args.status or not todo:
                state = "up to date" if not todo else \
                    f"{len(todo)} migration(s) to run: " + "; ".join(m.what for m in todo)
                print(f"index {cfg.index_label}: schema {before or 'none'} "
                      f"(this pacsd: {migrations.LATEST}), {state}")
                return EXIT_OK
            for line in migrations.upgrade(db, cfg.index_label):
                print(f"index {cfg.index_label}: {line}")
    except PacsError:
        raise
    except Exception as e:   # the driver's own error: which index, and why
        raise IndexUnavailable(f"cannot migrate index {cfg.index_label}: {e}") from None
    finally:
        if not database.is_closed():
            database.close()
        getattr(db, "close_all", lambda: None)()
        database.initialize(None)
    return EXIT_OK
