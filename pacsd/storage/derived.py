"""Text derived from stored files, kept beside the store to answer faster: the DICOM JSON of
each instance, for WADO-RS metadata (pacsd.imaging.dicom_json). Knows nothing of DICOM.

STORAGE/.cache/KIND/<the stored file's relative path>.json, written on first use. It can always
be built again from the stored file, so it is written atomically (a temporary file renamed into
place) but never fsynced, and each entry starts with a stamp (format version, the stored file's
size and modification time) that must match the stored file before the entry is used: a file
replaced, restored from a backup or rewritten gets a new entry. Deleting the folder is safe.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

from pacsd.storage.store import CACHE_DIR, DERIVED_KINDS

log = logging.getLogger(__name__)


class DerivedCache:
    """One kind of derived text, `version` bumped whenever what `build` makes changes."""

    def __init__(self, root: Path, kind: str, version: int) -> None:
        if kind not in DERIVED_KINDS:   # Store.delete removes the entries of these only
            raise ValueError(f"{kind!r} is not one of {DERIVED_KINDS}")
        self.base = root / CACHE_DIR / kind
        self.version = version
        self._failed = False

    def entry(self, rel: str) -> Path:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"refusing storage path {rel!r}")
        return self.base / (rel + ".json")

    def get(self, source: Path, rel: str, build: Callable[[], str]) -> str:
        """The text derived from the stored file `source` (at `rel` in the store): the cached
        entry if its stamp matches the file, else `build()`, cached for next time. OSError if
        the stored file is gone."""
        st = os.stat(source)
        stamp = f"v{self.version} {st.st_size} {st.st_mtime_ns}\n"
        path = self.entry(rel)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text.startswith(stamp):
                return text[len(stamp):]
        except (OSError, UnicodeDecodeError):
            pass
        value = build()
        self._write(path, stamp + value)
        return value

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
            self._failed = False
        except OSError as e:
            # Answers are built from the stored files all the same, only slower: say so once.
            if not self._failed:
                log.warning("cannot cache in %s (answers are built without it): %s",
                            self.base, e)
                self._failed = True
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def forget(self, rel: str) -> None:
        try:
            os.unlink(self.entry(rel))
        except (FileNotFoundError, ValueError):
            pass
