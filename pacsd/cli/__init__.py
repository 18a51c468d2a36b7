"""`pacsd` command line: the parser, dispatch, exit codes, and the only place that configures
logging. Each subcommand is a module of this package (as Django's management commands) with

  HELP                 its one line in `pacsd --help`
  add_arguments(p)     its own options
  run(args, cfg)       the work; returns the exit code
  LOGGING              how main() sets up logging for it once the config is read: "file" (the
                       log file and stderr), "stderr", "plain" (warnings as "pacsd: ..."),
                       "quiet" (plain, pynetdicom silent), None
  CONFIG (optional)    None: reads no config (no --config/--data); "self": reads it itself
                       (run gets None); "sub": its subcommands carry --config/--data
  refuse(args) (opt.)  a usage error found before the config is read (exit 2)
  WHERE (optional)     what the first line on stderr says: "server" (default: the data folder,
                       the config file and the server running on it), "folder" (without the
                       server: `serve` itself), None (nothing: the command says it itself)
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from pacsd import __version__, logbook
from pacsd import config as config_mod
from pacsd.cli import (
    audit,
    compress,
    config,
    doctor,
    export,
    history,
    import_,
    index,
    migrate,
    nodes,
    passwd,
    patient,
    queue,
    reindex,
    retention,
    retrieve,
    serve,
    series,
    status,
    study,
    trash,
    undo,
    verify,
    where,
)
from pacsd.cli.common import EXIT_INTERRUPTED, EXIT_NOT_RUNNING, add_common, overrides
from pacsd.config import Config
from pacsd.errors import EXIT_OK, EXIT_USAGE, PacsError

log = logging.getLogger(__name__)

__all__ = ["EXIT_INTERRUPTED", "EXIT_NOT_RUNNING", "COMMANDS", "build_parser", "main",
           "setup_logging"]

# In the order `pacsd --help` lists them.
COMMANDS: tuple[ModuleType, ...] = (serve, config, nodes, retrieve, import_, patient, study,
                                    series, undo, history, trash, retention, compress, verify,
                                    reindex, migrate, index, queue, passwd, status, doctor,
                                    export, audit)


def name_of(command: ModuleType) -> str:
    return str(getattr(command, "NAME", command.__name__.rsplit(".", 1)[-1]))


def setup_logging(cfg: Config, to_file: bool = True) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path, problem = cfg.log_path, None
    if to_file and path is not None:
        try:
            handlers.append(logbook.rotating_file(path, max_mb=10, backups=5))
        except OSError as e:
            problem = e.strerror
    logbook.log_to(cfg.log_level, handlers)
    if problem:
        log.warning("cannot write the log file %s (%s); logging to standard error only",
                    path, problem)
    # pynetdicom narrates every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if cfg.log_level == "DEBUG"
                                             else logging.WARNING)


def _logging_for(command: ModuleType, cfg: Config) -> None:
    how = getattr(command, "LOGGING", None)
    if how in ("file", "stderr"):
        setup_logging(cfg, to_file=how == "file")
    elif how in ("plain", "quiet"):
        if how == "quiet":
            logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)
        logging.basicConfig(level=logging.WARNING, format="pacsd: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacsd", description="A lean, set-and-forget PACS server.")
    p.add_argument("--version", action="version", version=f"pacsd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sp = sub.add_parser(name_of(command), help=command.HELP)
        if getattr(command, "CONFIG", "load") in ("load", "self"):
            add_common(sp)
        command.add_arguments(sp)
        sp.set_defaults(run=command)
    return p


def _run(command: ModuleType, args: argparse.Namespace) -> int:
    refused = getattr(command, "refuse", lambda args: None)(args)
    if refused:
        print(refused, file=sys.stderr)
        return EXIT_USAGE
    cfg = None
    if getattr(command, "CONFIG", "load") in ("load", "sub"):
        cfg = config_mod.load(args.config, overrides=overrides(args))
        _logging_for(command, cfg)
        say = getattr(command, "WHERE", "server")
        if say:   # which archive this is: a second one by mistake shows at once
            print(f"pacsd: {where.describe(cfg, with_server=say == 'server')}", file=sys.stderr,
                  flush=True)
    return int(command.run(args, cfg) or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args.run, args)
    except PacsError as e:
        print(f"pacsd: {e}", file=sys.stderr)
        log.debug("exit %d", e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
