"""`pacsd config`: show the configuration, list every setting, or check it (--check: every
problem, one line each, and the folders the server must write to)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pacsd import config as config_mod
from pacsd.cli import where
from pacsd.cli.common import overrides
from pacsd.config import Config
from pacsd.errors import EXIT_CONFIG, EXIT_OK

HELP = "show the configuration in effect (--list: where each value comes from) or check it"
LOGGING = None
CONFIG = "self"   # --config, --data; but read here: --check gathers every problem


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
    parser.add_argument("--check", action="store_true",
                        help="check every setting and the folders the server writes to; exit 0 "
                             "when all is well, 78 with one line per problem")
    parser.add_argument("--list", action="store_true",
                        help="every setting by section, with the value in effect and where it "
                             "comes from (default, the config file, $PACSD_..., a flag)")


def _toml(value: Any) -> str:
    """A value as it would be written in pacsd.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value), ensure_ascii=False)
    return json.dumps(str(value), ensure_ascii=False)


def listing(cfg: Config) -> list[str]:
    """Every setting as TOML under its section, the value in effect, and after it where it came
    from: what to copy into pacsd.toml, and why a value is not the one written there."""
    from pacsd.index import backends
    # The folders left empty are resolved against the data folder: show where they really are.
    resolved = {"server.data": cfg.data, "storage.path": cfg.storage_path,
                "index.url": backends.redacted(cfg.index_url),   # no password on a terminal
                "log.file": cfg.log_path or "-", "watchdog.log_file": cfg.watchdog_log_path or "-"}
    source = cfg.source if cfg.source != "defaults" else "none"
    lines = [f"# the values in effect; config file: {source}"]
    section = ""
    for s in config_mod.SETTINGS:
        if s.section != section:
            section = s.section
            lines += ["", f"[{section}]"]
        value = getattr(getattr(cfg, s.section), s.key)
        origin = cfg.origins.get(s.dotted, "default")
        if s.dotted in resolved:
            if not value and origin == "default":
                origin = "default: in the data folder"
            value = resolved[s.dotted]
        lines.append(f"{s.key} = {_toml(value)}  # {origin}")
    return lines


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
          f"{len(cfg.nodes)} node(s); {where.server(cfg)}")
    return EXIT_OK


def run(args: argparse.Namespace, cfg: Config | None) -> int:
    if args.check:
        return check(args)
    cfg = config_mod.load(args.config, overrides=overrides(args))
    print(f"pacsd: {where.describe(cfg)}", file=sys.stderr, flush=True)
    if args.list:
        print("\n".join(listing(cfg)))
        return EXIT_OK
    for key, value in sorted(cfg.flat().items()):
        if key == "index_url":   # its password never goes to a terminal or a ticket
            from pacsd.index import backends
            value = backends.redacted(value)
        print(f"{key} = {value!r}")
    return EXIT_OK
