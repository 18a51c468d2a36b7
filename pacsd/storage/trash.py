"""The recycle bin: deleting never removes an image at once.

    delete:   rows out of the index and into the bin (one transaction) -> files moved to
              STORAGE/.trash/<their path> (renames: byte-identical, instant on one volume)
    restore:  files moved back -> rows back into the index as they were (one transaction)
    empty:    bin rows forgotten (one transaction) -> files removed

Each order leaves, after a crash between its two steps, nothing that points at nothing: a
deletion cut short leaves files in place whose rows are in the bin, moved at the next start
(`settle`, before recovery's scan would take them for new files); a restore cut short leaves
files in place without rows, which recovery indexes, and `settle` then drops their bin rows;
an emptying cut short leaves files in the bin without rows (space, never an image lost).

The bin is emptied by age ([storage] trash_days, by housekeeping) and, oldest deletion first,
when the storage volume comes within ROOM_MB of its floor ([storage] min_free_mb), before new
images would be refused; a log line per deletion emptied.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from pacsd.errors import IndexUnavailable, PacsError
from pacsd.imaging.header import check_and_extract, read_header
from pacsd.index import Index
from pacsd.index.trash import BinEntry
from pacsd.storage.store import TRASH_DIR, Store

log = logging.getLogger(__name__)

# Free space above the floor below which the bin is emptied, oldest deletion first: enough
# for a day of a small site's images, so that storing never stops while the bin holds any.
ROOM_MB = 1024


@dataclass
class Restored:
    """What a restore did: instances put back, those left in the bin because their SOP Instance
    UID was stored again meanwhile, and those whose file was not found in the bin."""

    restored: int = 0
    already_stored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def binned_path(rel: str) -> str:
    return f"{TRASH_DIR}/{rel}"


class Bin:
    def __init__(self, store: Store, index: Index, days: int = 30) -> None:
        self.store, self.index, self.days = store, index, days

    def delete(self, level: str, uids: list[str], who: str) -> int:
        """Move the studies, series or instances with these UIDs to the bin; how many
        instances. Raises IndexUnavailable when the index cannot commit."""
        try:
            paths = self.index.bin(level, uids, who)
        except TimeoutError:
            raise IndexUnavailable("the index did not commit the deletion in time") from None
        if not paths:
            return 0
        missing = self.store.move([(rel, binned_path(rel)) for rel in paths])
        if missing:
            log.warning("%d deleted instance(s) had no file in storage (%s...)", len(missing),
                        missing[0])
        log.info("moved %d instance(s) of %d %s(s) to the recycle bin (%s)", len(paths),
                 len(uids), level.lower(), who)
        return len(paths)

    def entries(self) -> list[BinEntry]:
        return self.index.bin_entries()

    def restore(self, uid: str, who: str) -> Restored:
        """Put back what the bin holds of a study, series or instance UID (or of a deletion,
        by its number): files first, then their rows."""
        items = self.index.binned(uid)
        done = Restored()
        if not items:
            return done
        stored = self.index.live_sops([i.sop_instance_uid for i in items])
        done.already_stored = sorted(i.sop_instance_uid for i in items
                                     if i.sop_instance_uid in stored)
        items = [i for i in items if i.sop_instance_uid not in stored]
        missing = set(self.store.move([(binned_path(i.path), i.path) for i in items]))
        done.missing = sorted(i.sop_instance_uid for i in items
                              if binned_path(i.path) in missing)
        pairs = []
        for item in items:
            if binned_path(item.path) in missing:
                continue
            try:
                with open(self.store.path(item.path), "rb") as f:
                    record = check_and_extract(read_header(f))
            except (PacsError, OSError, AttributeError, ValueError) as e:
                log.warning("binned file %s cannot be read back (%s); it stays in the bin",
                            item.path, e)
                self.store.move([(item.path, binned_path(item.path))])
                done.missing.append(item.sop_instance_uid)
                continue
            pairs.append((item, record))
        try:
            back = set(self.index.unbin(pairs, who))
        except BaseException:
            # Not indexed: back into the bin, so that nothing is half restored.
            self.store.move([(i.path, binned_path(i.path)) for i, _ in pairs])
            raise
        lost_race = [i for i, _ in pairs if i.sop_instance_uid not in back]
        if lost_race:   # stored again between our check and the commit
            self.store.move([(i.path, binned_path(i.path)) for i in lost_race])
            done.already_stored += [i.sop_instance_uid for i in lost_race]
        done.restored = len(back)
        if done.missing:
            log.warning("restore of %s: %d binned instance(s) have no readable file in the bin",
                        uid, len(done.missing))
        log.info("restored %d instance(s) of %s from the recycle bin (%s)", done.restored, uid,
                 who)
        return done

    def empty(self, older_than_s: float | None, who: str, why: str) -> tuple[int, int, int]:
        """Empty the deletions made more than `older_than_s` seconds ago (None: all); a log
        line per deletion. (deletions, instances, bytes) emptied."""
        limit = None if older_than_s is None else time.time() - older_than_s
        return self._purge(self.index.bin_entries(older_than=limit), who, why)

    def _purge(self, entries: list[BinEntry], who: str, why: str) -> tuple[int, int, int]:
        if not entries:
            return 0, 0, 0
        paths = self.index.forget_binned([e.deletion for e in entries], who, why)
        for rel in paths:
            try:
                os.unlink(self.store.path(binned_path(rel)))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("binned file %s could not be removed: %s", rel, e)
        self._prune_folders({binned_path(rel).rsplit("/", 1)[0] for rel in paths})
        for entry in entries:
            log.info("recycle bin: %s %s (patient %s, %d instance(s), %.1f MB, deleted %s by "
                     "%s) emptied: %s", entry.level.lower() or "deletion", entry.uid,
                     entry.patient_id, entry.instances, entry.bytes / 1e6,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.deleted)), entry.who,
                     why)
        return len(entries), sum(e.instances for e in entries), sum(e.bytes for e in entries)

    def _prune_folders(self, folders: set[str]) -> None:
        """Remove the bin's folders left empty (deepest first; a folder in use stays)."""
        for folder in sorted(folders, key=lambda f: -f.count("/")):
            parts = folder.split("/")
            while len(parts) > 1:
                try:
                    os.rmdir(self.store.path("/".join(parts)))
                except OSError:
                    break
                parts.pop()

    def expire(self) -> int:
        """Housekeeping: empty what was deleted more than [storage] trash_days ago."""
        n, _, _ = self.empty(self.days * 86400, "housekeeping",
                             f"older than {self.days} day(s) ([storage] trash_days)")
        return n

    def make_room(self) -> int:
        """Housekeeping: while the volume is within ROOM_MB of its floor, empty the oldest
        deletion; how many were emptied."""
        floor = self.store.space.floor
        wanted = floor + ROOM_MB * 2**20
        emptied = 0
        if self.store.space.free_bytes() >= wanted:
            return 0   # the usual case: no look at the bin
        for entry in self.index.bin_entries():
            if self.store.space.free_bytes() >= wanted:
                break
            n, _, _ = self._purge([entry], "housekeeping",
                                  f"storage volume within {ROOM_MB} MiB of its floor "
                                  f"([storage] min_free_mb = {floor // 2**20})")
            emptied += n
        return emptied

    def settle(self, since: float) -> int:
        """At the start after a crash, before recovery indexes new files: finish the
        deletions that run made (files still in place whose rows are in the bin); and drop
        the bin rows of files a cut-short restore put back (recovery indexes those files:
        `settle_restored`). How many files were moved."""
        rows = self.index.binned_since(since)
        if not rows:
            return 0
        live = self.index.live_paths([p for _, p in rows])
        left = [p for _, p in rows
                if p not in live and os.path.exists(self.store.path(p))]
        if left:
            self.store.move([(p, binned_path(p)) for p in left])
            log.warning("moved %d file(s) to the recycle bin whose deletion an interrupted "
                        "run had not finished", len(left))
        return len(left)

    def settle_restored(self, paths: set[str]) -> int:
        """After recovery indexed `paths`: drop the bin rows of those among them that a
        cut-short restore had moved back."""
        if not paths:
            return 0
        return self.index.drop_binned_rows(sorted(paths))

