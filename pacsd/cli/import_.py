"""`pacsd import`: import DICOM files and folders through the archive's one durable path."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterator

from pacsd.cli.common import Progress, audit_record, audited, open_archive
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK, PacsError

log = logging.getLogger(__name__)

NAME = "import"   # a Python keyword: the module is import_
HELP = "import DICOM files and folders"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="DICOM files, or folders read with all their subfolders")


def files_in(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in sorted(filenames):
                    if not f.startswith("."):
                        yield Path(dirpath) / f
        else:
            yield p


def run(args: argparse.Namespace, cfg: Config) -> int:
    files = list(files_in(args.paths))
    archive = open_archive(cfg)
    stored = dup = bad = 0
    progress = Progress(len(files), "import")
    studies: dict[str, int] = {}
    record = audit_record("import", detail=" ".join(args.paths)[:512])
    try:
        with audited(cfg, record):
            for i, path in enumerate(files, 1):
                try:
                    put = archive.put_file(path)
                    studies[put.study_instance_uid] = studies.get(put.study_instance_uid, 0) + 1
                    if put.duplicate:
                        dup += 1
                    else:
                        stored += 1
                except PacsError as e:
                    bad += 1
                    log.warning("%s: not imported: %s", path, e)
                progress(i, f"{dup} duplicate(s), {bad} refused")
            # One record for the command (its studies, the patients looked up when written).
            record.studies, record.count = sorted(studies)[:100], stored + dup
            if bad and not (stored or dup):
                record.outcome = "refused"
    finally:
        archive.index.close()
    print(f"imported {stored} file(s), {dup} duplicate(s), {bad} refused")
    # Failure only when nothing was importable; images already archived (duplicates) count as
    # success, so that running the same import again gives the same answer.
    return EXIT_FAILURE if bad and not (stored or dup) else EXIT_OK
