"""`pacsd config`: show the configuration, list every setting, or check it (--check: every
problem, one line each, and the folders the server must write to)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from pacsd import config as config_mod
from pacsd.cli.common import overrides
from pacsd.config import Config
from pacsd.errors import EXIT_CONFIG, EXIT_OK

HELP = "show or check the configuration"
LOGGING = None
CONFIG = "self"   # --config, --data; but read here: --list needs none, --check gathers problems


@dataclass(frozen=True)
class Problem:
    """One line of `config --check`: fatal (exit 78) or only a warning."""

    text: str
    fatal: bool = True


def folders(cfg: Config) -> Iterable[Problem]:
    return [Problem(text) for text in config_mod.folder_problems(cfg)]


def library_patches(cfg: Config) -> Iterable[Problem]:
    """pacsd.compat: a patch of a library's internals that no longer fits the installed
    version. A speed patch only warns (serve falls back to the library's own way); a safety
    patch is fatal, as serve would refuse to start."""
    from pacsd import compat
    return [Problem(f"{f.name} ({f.kind} patch): {f.message}", fatal=f.kind == "safety")
            for f in compat.check() if not f.ok]


# What `config --check` looks at beyond the settings themselves, once the file is read: each
# takes the Config and gives its problems.
CHECKS: list[Callable[[Config], Iterable[Problem]]] = [
    folders,
    library_patches,
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", action="store_true", help="validate and exit 0, or exit 78")
    parser.add_argument("--list", action="store_true", help="list every setting")


def check(args: argparse.Namespace) -> int:
    """Every problem on its own line (stderr), exit 78 if any is fatal."""
    cfg, errors = config_mod.check(args.config, overrides=overrides(args))
    problems = [Problem(str(e)) for e in errors]
    for more in CHECKS:
        problems += more(cfg)
    for p in problems:
        print(f"pacsd: {'' if p.fatal else 'warning: '}{p.text}", file=sys.stderr)
    if any(p.fatal for p in problems):
        return EXIT_CONFIG
    print(f"configuration OK ({cfg.source}): AE {cfg.dicom_aet} on "
          f"{cfg.dicom_bind}:{cfg.dicom_port}, data {cfg.data}, storage {cfg.storage_path}, "
          f"{len(cfg.nodes)} node(s)")
    return EXIT_OK


def run(args: argparse.Namespace, cfg: Config | None) -> int:
    if args.list:
        print(config_mod.describe())
        return EXIT_OK
    if args.check:
        return check(args)
    cfg = config_mod.load(args.config, overrides=overrides(args))
    for key, value in sorted(cfg.flat().items()):
        if key == "index_url":   # its password never goes to a terminal or a ticket
            from pacsd.index import backends
            value = backends.redacted(value)
        print(f"{key} = {value!r}")
    return EXIT_OK
