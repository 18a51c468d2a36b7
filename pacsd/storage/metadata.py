"""Each instance's WADO-RS metadata, kept in the store's derived cache (pacsd.storage.derived):
its header as DICOM JSON (pacsd.imaging.dicom_json), the instance's URL left as a placeholder
(dicom_json.INSTANCE) that the web side fills in as the client reached us.

Built on first use, and warmed when its study turns stable (pacsd.nodes.routing.watcher,
`[storage] warm_metadata`), so that the first DICOMweb metadata request of a study is served
from the cache like the next ones: reading 300 headers with pydicom costs about a second, a
stat and a read per instance some tens of milliseconds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pacsd.imaging import dicom_json
from pacsd.storage.derived import DerivedCache
from pacsd.storage.store import Store

log = logging.getLogger(__name__)

# Bumped whenever what dicom_json.metadata_json makes changes: older entries are rebuilt.
CACHE_VERSION = 1
_caches: dict[Path, DerivedCache] = {}
_lock = threading.Lock()


def dumps(obj: Any) -> str:
    """DICOM JSON as pacsd writes it: UTF-8, no spaces."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _cache(store: Store) -> DerivedCache:
    with _lock:
        cache = _caches.get(store.root)
        if cache is None:
            cache = _caches[store.root] = DerivedCache(store.root, "metadata", CACHE_VERSION)
        return cache


def json_text(store: Store, rel: str, transfer_syntax_uid: str) -> str:
    """The stored file's metadata as DICOM JSON text (BulkDataURIs holding dicom_json.INSTANCE),
    from the cache when it is current. OSError if the file is gone; the parse errors of
    dicom_json.metadata_json for a file that cannot be read."""
    path = store.path(rel)
    return _cache(store).get(path, rel, lambda: dumps(
        dicom_json.metadata_json(path, transfer_syntax_uid)))


def warm(store: Store, instances: Iterable[tuple[str, str]]) -> int:
    """Make sure each (relative path, transfer syntax) has a current cache entry; how many
    could be read. A file that cannot be is left to the request that asks for it (which says
    so in its own words)."""
    n = 0
    for rel, ts in instances:
        try:
            json_text(store, rel, ts)
            n += 1
        except Exception as e:  # noqa: BLE001 - a warm-up never fails anything
            log.debug("metadata of %s not cached: %s", rel, e)
    return n
