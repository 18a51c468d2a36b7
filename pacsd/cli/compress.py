"""`pacsd compress`: apply the [[compression]] rules now, in the foreground, with figures."""

from __future__ import annotations

import argparse
import sys
import time

from pacsd.cli.common import open_archive
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "re-encode stored uncompressed images losslessly now, as the [[compression]] rules say"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rule", metavar="NAME", help="only this rule")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.storage.archive import command_started
    from pacsd.storage.compression import Compressor
    rules = tuple(r for r in cfg.compression if args.rule in (None, r.name))
    if not rules:
        print("pacsd: " + (f"no [[compression]] rule named {args.rule!r}" if args.rule else
                           f"no [[compression]] rules in {cfg.source}"), file=sys.stderr)
        return EXIT_FAILURE
    archive = open_archive(cfg)
    mark = command_started(cfg.data)   # killed midway: the next start of the server settles it
    began = time.perf_counter()
    try:
        compressor = Compressor(archive, rules)
        while compressor.run_once(10.0).compressed:
            t = compressor.total
            print(f"  {t.compressed} compressed so far", file=sys.stderr, flush=True)
    finally:
        archive.store.close()
        archive.index.close()
        mark.unlink(missing_ok=True)
    t, seconds = compressor.total, time.perf_counter() - began
    ratio = t.bytes_before / t.bytes_after if t.bytes_after else 0.0
    print(f"compressed {t.compressed} image(s) losslessly (JPEG-LS), {t.skipped} left as stored: "
          f"{t.bytes_before / 1e6:.1f} MB -> {t.bytes_after / 1e6:.1f} MB (ratio {ratio:.2f}) in "
          f"{seconds:.1f} s ({t.bytes_before / 1e6 / max(seconds, 1e-6):.1f} MB/s read)")
    return EXIT_OK
