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
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
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
    path = store.placed(rel)
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


# --- a series' metadata joined, in memory ----------------------------------------------------
# A 1,000-slice series costs the cache above 1,000 opens and reads (some 150 ms, which a viewer
# waits for before it can ask for any pixels); joined, it costs a stat per instance. Kept in
# memory only (a deleted study leaves nothing behind on disk), the least recently used dropped
# beyond JOINED_CHARS, and used only while every file's stamp (path, size, modification time)
# is what it was when it was joined.
JOINED_CHARS = 64 << 20
BASE = "\x00"   # stands for the URL base in a joined text; JSON text never holds a raw NUL
_joined: OrderedDict[tuple, tuple[tuple, str]] = OrderedDict()
_joined_chars = 0


def _stamp(store: Store, rels: list[str]) -> tuple:
    out = []
    for rel in rels:
        st = os.stat(store.path_text(rel))
        out.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(out)


def joined_json_text(store: Store, key: tuple, rels: list[str],
                     texts: Callable[[], Iterable[str | None]]) -> str:
    """The JSON array of the metadata of the stored files `rels`, from memory when each file is
    as it was. `texts()` yields each file's text (its URLs starting with BASE, for the caller to
    fill in), or None for a file that cannot be read (then the answer is not kept). OSError if a
    file is gone."""
    global _joined_chars
    stamp = _stamp(store, rels)
    slot = (store.root, key)
    with _lock:
        hit = _joined.get(slot)
        if hit is not None and hit[0] == stamp:
            _joined.move_to_end(slot)
            return hit[1]
    parts = list(texts())
    text = "[" + ",".join(t for t in parts if t is not None) + "]"
    if None in parts or len(text) > JOINED_CHARS // 4:
        return text
    with _lock:
        old = _joined.pop(slot, None)
        _joined_chars -= len(old[1]) if old else 0
        _joined[slot] = (stamp, text)
        _joined_chars += len(text)
        while _joined_chars > JOINED_CHARS:
            _slot, (_stamp_, dropped) = _joined.popitem(last=False)
            _joined_chars -= len(dropped)
    return text
