"""What several subcommands share: the --config/--data options and the setting flags (derived
from the settings' declarations), the index, accounts and archive opened for a one-shot
command, a progress bar."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from pacsd import config as config_mod
from pacsd.config import Config

if TYPE_CHECKING:
    from pacsd.accounts import Accounts
    from pacsd.audit import AuditRecord
    from pacsd.index import Index
    from pacsd.storage.archive import Archive

EXIT_NOT_RUNNING = 3   # `pacsd status`: no server answers (LSB convention)
EXIT_INTERRUPTED = 130   # `pacsd index copy` stopped by Ctrl-C (128 + SIGINT)

_FLAG_TYPES: dict[type, Any] = {int: int, float: float}


def _flag_help(help: str) -> str:
    """A setting's help, shortened to its first sentence for --help: up to a full stop that a
    capital letter follows, so that "e.g. CT" or "PS3.5 A.5" do not cut it mid-sentence."""
    first = re.split(r"(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z\[(`])", help, maxsplit=1)[0].rstrip(".")
    return first[0].lower() + first[1:] if first[1:2].islower() else first


def add_setting_flags(parser: argparse.ArgumentParser, only: Iterable[str] | None = None,
                      exclude: Iterable[str] = ()) -> argparse.ArgumentParser:
    """One option per setting that declares a flag (sections.py), e.g. --dicom-port."""
    wanted = None if only is None else set(only)
    for s in config_mod.SETTINGS:
        if s.cli and s.cli not in exclude and (wanted is None or s.cli in wanted):
            kind = _FLAG_TYPES.get(s.type)
            parser.add_argument(s.cli, metavar=s.metavar,
                                help=f"{_flag_help(s.help)} ([{s.section}] {s.key})",
                                **({"type": kind} if kind else {}))
    return parser


def add_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config and --data: every command that reads the configuration has them."""
    parser.add_argument("--config", metavar="FILE",
                        help="the TOML configuration file (default: $PACSD_CONFIG, else "
                             "pacsd.toml in the data folder when there is one)")
    parser.add_argument("--data", metavar="DIR",
                        help=f"the data folder: index, images, log, and the pacsd.json of the "
                             f"server running on it (default: $PACSD_DATA, else [server] data "
                             f"of the config file, else {config_mod.DEFAULT_DATA}; the same "
                             f"for every command)")
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, as `config.load(overrides=...)` takes them."""
    return {s.dotted: getattr(args, s.cli.lstrip("-").replace("-", "_"), None)
            for s in config_mod.SETTINGS if s.cli}


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


def open_index(cfg: Config) -> "Index":
    """The index, opened without a writer thread, for a one-shot command. A running server may
    hold it: SQLite lets us read (and wait for our turn to write); PostgreSQL does anyway."""
    from pacsd.index import Index
    return Index(cfg.index_url, node=f"cli-{os.getpid()}", pool_size=2,
                 auto_migrate=cfg.index_auto_migrate).open(writer=False)


@contextmanager
def open_accounts(cfg: Config) -> Iterator["Accounts"]:
    """Nodes and users of the config file plus those added on the admin page (in the index).
    Opened without a writer: a running server may hold the index; SQLite lets us read."""
    from pacsd.accounts import Accounts
    index = open_index(cfg)
    try:
        yield Accounts(cfg, index).open()
    finally:
        index.close()


def open_archive(cfg: Config) -> "Archive":
    """The archive (store + index) for `import` and `reindex`."""
    from pacsd.imaging import bounds
    from pacsd.storage.archive import Archive
    from pacsd.storage.store import Store
    bounds.configure(bounds.Limits.from_settings(cfg.dicom))   # import and reindex read headers
    # Temporary files in a folder of their own: a node starting meanwhile cleans only its own.
    store = Store(cfg.storage_path, cfg.storage_min_free_mb, node="cli")
    store.open(clean=False)   # a running server may have temporary files in flight
    archive = Archive(store, open_index(cfg), overwrite=cfg.storage_overwrite,
                      patient_mismatch=cfg.storage_patient_mismatch,
                      on_conflict=cfg.storage_on_conflict,
                      trash_days=cfg.storage_trash_days,
                      rejection_notes=cfg.storage_rejection_notes, overlap=False)
    archive.label_rules = cfg.label_rules   # an imported CD is labelled as if sent
    return archive


def who() -> str:
    """The person running this command, for the history."""
    import getpass
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):
        return "command line"


def new_values(args: argparse.Namespace, fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{keyword: value} of the correction flags given ((flag, keyword) pairs: --name)."""
    return {kw: value for flag, kw in fields
            if (value := getattr(args, flag[2:].replace("-", "_"))) is not None}


def correct(cfg: Config, work: Any, record: "AuditRecord | None" = None) -> int:
    """Run `work(corrections)` (pacsd.storage.corrections) on the archive, the server running
    or not; say what it did. `record`: its audit record (action, studies or patients, detail),
    kept with the outcome."""
    from pacsd.storage.archive import command_started
    from pacsd.storage.corrections import Corrected, Corrections
    archive = open_archive(cfg)
    mark = command_started(cfg.data)   # killed midway: the next start of the server recovers
    try:
        with audited(cfg, record, series=record.detail if record else ""):
            done = work(Corrections(archive))
    finally:
        archive.store.close()
        archive.index.close()
        mark.unlink(missing_ok=True)
    if isinstance(done, Corrected):
        print(f"{done.instances} instance(s) rewritten (change #{done.change}); the previous "
              "versions are in the recycle bin")
    else:   # an undone deletion: a restore
        print(f"restored {done.restored} instance(s)"
              + (f"; {len(done.already_stored)} stored again since, left in the bin"
                 if done.already_stored else ""))
    return 0


def audit_record(action: str, **fields: Any) -> "AuditRecord":
    """An audit record of something this command does (its user: the person running it)."""
    import getpass

    from pacsd.audit import AuditRecord
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return AuditRecord(action, user=user, via="cli", **fields)


@contextmanager
def audited(cfg: Config, record: "AuditRecord | None", series: str = "") -> Iterator[None]:
    """Keep `record` once the work in the block is done, with its outcome (the index open: the
    patients of its studies are looked up before the work, when they still exist).
    `series`: "series UID" in the record's detail names a series whose study is looked up."""
    if record is None or not cfg.audit.enabled:
        yield
        return
    from pacsd.daemon.shared import new_auditor
    from pacsd.errors import PacsError
    from pacsd.query import studies
    try:
        if series.startswith("series "):
            record.studies = record.studies or studies.studies_of_series([series[7:]])
        if record.studies and not record.patients:
            record.patients = sorted(set(studies.patients_of_studies(record.studies).values()))
    except Exception:  # noqa: BLE001 - recorded without them
        pass
    auditor = new_auditor(cfg, "cli")
    try:
        yield
    except BaseException as e:
        record.outcome = ("refused" if isinstance(e, PacsError) and e.http_status < 500
                          else "failed")
        record.detail = f"{record.detail}; {e}".strip("; ")[:1024]
        raise
    finally:
        auditor.record(record)
        auditor.close()


class Progress:
    """A one-line progress bar on a terminal; periodic log lines otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        pct = 100 * done / self.total if self.total else 100
        if self.tty:
            bar = "#" * int(pct / 4)
            sys.stderr.write(f"\r{self.label} [{bar:<25}] {done}/{self.total} {extra}")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            print(f"{self.label}: {done}/{self.total} ({pct:.0f}%) {extra}", file=sys.stderr)

