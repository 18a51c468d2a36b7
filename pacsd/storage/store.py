"""Files on disk: layout, durable atomic writes, reads. Knows nothing of DICOM or the index.

Layout: STORAGE/YYYY/MM/DD/xx/<32 hex>.dcm, dated by reception, xx the first two hex digits of
the random name, so a day of a million images spreads over 256 folders. Names never come from
a UID or anything else a peer sends.

A write is: temporary file in STORAGE/.tmp -> write -> fsync -> rename into place -> fsync the
folder (F_FULLFSYNC on macOS, where fsync does not flush the drive's cache). A `NewFile` does
the same with bytes that are still arriving: each piece is written as soon as it is given, by
the thread that received it (the peer goes on sending meanwhile), and `finishing()` runs the
syncs and the rename in a thread of the store's pool while the caller checks the data set;
nothing about durability changes. (Pieces handed to a pool of writers instead cost more CPU in
thread hand-overs than they saved: measured, 4 associations at 183 img/s against 205.)

Several pacsd nodes may share one storage volume: each writes its temporary files into a folder
of its own (STORAGE/.tmp/NODE), so that a node starting up never removes another's unfinished
writes; `sweep` removes what a node that never came back left there.

A free-space floor ([storage] min_free_mb, SpaceGuard) refuses new files before the volume is
full, so that the index, its journal and the logs, usually on the same volume, still have room.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from pacsd.errors import FolderNotWritable, OutOfResources, StorageFull

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
# Copies of a stored SOP Instance UID that came with other content (pacsd.storage.archive): kept, never
# indexed as instances, never walked (so neither recovery nor reindex takes them for images).
CONFLICTS_DIR = ".conflicts"
# The recycle bin (pacsd.storage.trash): deleted files, moved here under their own path; never
# walked, so neither recovery nor reindex brings them back.
TRASH_DIR = ".trash"
SUFFIX = ".dcm"
PART = ".part"          # a file being written: STORAGE/.tmp/NODE/<name>.dcm.part
# A reader or a duplicate waits this long at most for a file being placed (its row committed
# while its fsync runs): a sync slower than this is a sick disk, and the wait ends anyway.
PLACE_WAIT_S = 10.0
# Its writer holds a lock on each temporary file (flock) until the file is placed or dropped, so
# a file whose lock is free is a dead writer's (a killed DICOM worker's), at once. Where the
# volume has no locks, one not written to for this long is taken for a dead writer's.
PART_STALE_S = 60.0
# Text derived from stored files (pacsd.storage.derived): never walked, removed with its file.
CACHE_DIR = ".cache"
DERIVED_KINDS = ("metadata",)


def fsync_fd(fd: int) -> None:
    if sys.platform == "darwin":
        import fcntl
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


class SpaceGuard:
    """The storage volume's fill state: refuses new files that would leave less than `floor_mb`
    MiB free, and logs once when storing stops and once when it resumes (never per image).

    Cheap on the C-STORE path: the volume is asked (statvfs) at most once per REFRESH seconds;
    in between, what we wrote since is subtracted from the last answer. Only when that estimate
    crosses the floor is the volume asked again at once (space may have been freed meanwhile),
    so a system call per image happens only near or below the floor, where refusing is the job.
    """

    REFRESH = 1.0   # seconds; also the longest wait for storing to resume once space is freed

    def __init__(self, root: Path, floor_mb: int = 0, flag: Path | None = None) -> None:
        self.root = root
        # Shared by the processes of one server (its DICOM workers, its web side): a file that
        # exists while the volume is full. Whoever makes it logs that storing stops, whoever
        # removes it that storing resumes: one line each for the server, not one per process;
        # and while it exists every process asks the volume before each file.
        self.flag = flag
        self.floor = floor_mb * 2**20
        self.full = False          # storing is refused (floor crossed, or the disk said ENOSPC)
        self.refused = 0           # since the volume became full
        self._lock = threading.Lock()
        self._free = 0             # bytes available at the last statvfs
        self._written = 0          # bytes accepted since then
        self._next = 0.0           # monotonic time of the next statvfs

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize   # what an unprivileged writer may still use

    def reserve(self, size: int) -> None:
        """Account for `size` bytes about to be written; StorageFull if that would leave less
        than the floor free."""
        if not self.floor:
            return
        with self._lock:
            now = time.monotonic()
            flagged = self.flag is not None and not self.full and self.flag.exists()
            if now >= self._next or self._free - self._written - size < self.floor or flagged:
                try:
                    self._free = self.free_bytes()
                except OSError:
                    return   # cannot tell: the write itself will find out
                self._written, self._next = 0, now + self.REFRESH
            if self._free - self._written - size < self.floor:
                raise self._refuse(f"{self._free // 2**20} MiB free, below [storage] "
                                   f"min_free_mb = {self.floor // 2**20}")
            if flagged and self._flag(make=False):   # another process saw it full: not now
                log.info("storage %s accepts new images again (%d MiB free)", self.root,
                         self._free // 2**20)
            self._written += size

    def disk_full(self, reason: str) -> StorageFull:
        """The write itself failed for lack of space (ENOSPC/EDQUOT): the error to raise."""
        with self._lock:
            return self._refuse(reason)

    def _refuse(self, reason: str) -> StorageFull:
        """Count a refusal (under the lock); log only the first of a full spell."""
        if not self.full:
            self.full = True
            if self._flag(make=True):
                log.warning("storage %s is full (%s): refusing new images (C-STORE 0xA700, "
                            "STOW-RS 507) until space is freed; nothing is deleted to make "
                            "room", self.root, reason)
        self.refused += 1
        return StorageFull(f"storage {self.root} is full ({reason})")

    def _flag(self, make: bool) -> bool:
        """Make (or remove) the shared flag; True if this call changed it, or there is none."""
        if self.flag is None:
            return True
        try:
            if make:
                os.close(os.open(self.flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
            else:
                os.unlink(self.flag)
            return True
        except (FileExistsError, FileNotFoundError):
            return False   # another process of ours said it already
        except OSError:
            return True    # cannot tell (no room even for an empty file): say it here

    def stored(self) -> None:
        """A file was written: if storing had stopped (here, or in another process of this
        server: the flag), it has resumed."""
        if not self.full and (self.flag is None or not self.flag.exists()):
            return
        with self._lock:
            if self.full or (self.flag is not None and self.flag.exists()):
                self.full = False
                try:
                    free = f"{self.free_bytes() // 2**20} MiB free"
                except OSError:
                    free = "space freed"
                if self._flag(make=False):
                    log.info("storage %s accepts new images again (%s; %d refused while "
                             "full)", self.root, free, self.refused)
                self.refused = 0


def _checked(rel: str) -> str:
    # Relative paths come only from our own index, but refuse anything that could escape.
    if rel.startswith("/") or ".." in rel.split("/"):
        raise ValueError(f"refusing storage path {rel!r}")
    return rel


class Store:
    def __init__(self, root: Path, min_free_mb: int = 0, node: str = "") -> None:
        self.root = root
        # This node's temporary files; node is a name safe for a folder
        # (pacsd.daemon.server.node_id).
        self.tmp = root / TMP_DIR / node if node else root / TMP_DIR
        self.space = SpaceGuard(root, min_free_mb,
                                flag=root / (f".full-{node}" if node else ".full"))
        self._known_dirs: set[str] = set()
        self._dirs_lock = threading.Lock()
        # The threads that finish NewFiles (made only as files wait; syncs release the GIL).
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # --- set-up -----------------------------------------------------------------------------

    def open(self, clean: bool = True) -> None:
        """Create the folders, prove they are writable, and (`clean`, for the server that owns
        them) drop temporary files left by a crash."""
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            probe = self.tmp / f"probe-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                probe.write_bytes(b"ok")
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # Writable but full: start anyway, so that queries and retrieves still work
                # and C-ECHO answers; storing is refused until space is freed.
                self.space.disk_full(str(e.strerror))
                self.space.refused = 0
            probe.unlink(missing_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise FolderNotWritable(f"storage folder {self.root} is not writable: it, or a "
                                    "folder above it, is a file") from None
        except OSError as e:
            raise FolderNotWritable(f"storage folder {self.root} is not writable: "
                                    f"{e.strerror or e}") from None
        if not clean:
            return
        removed = 0
        folders = {self.tmp, self.root / TMP_DIR}   # ours, and where versions before 0.2 wrote
        for folder in folders:
            for entry in os.scandir(folder):
                if entry.is_file(follow_symlinks=False):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except OSError:
                        pass
        if removed:
            log.warning("removed %d unfinished temporary file(s) left by an interrupted run",
                        removed)

    # --- writing ----------------------------------------------------------------------------

    def _new_relpath(self) -> str:
        name = secrets.token_hex(16)
        return time.strftime("%Y/%m/%d/") + f"{name[:2]}/{name}{SUFFIX}"

    def _ensure_dir(self, rel_dir: str) -> None:
        if rel_dir in self._known_dirs:
            return
        with self._dirs_lock:
            # Create each missing level and fsync its parent, so that the new folder itself
            # survives a power cut along with the file we are about to put in it.
            current = self.root
            for part in rel_dir.split("/"):
                nxt = current / part
                if not nxt.is_dir():
                    try:
                        nxt.mkdir()
                    except FileExistsError:
                        pass
                    fsync_dir(current)
                current = nxt
            self._known_dirs.add(rel_dir)

    def begin(self) -> "NewFile":
        """A new file, written piece by piece as its bytes arrive (see NewFile)."""
        return NewFile(self)

    def _finisher(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(64, thread_name_prefix="store-sync")
            return self._pool

    def _failed(self, e: OSError) -> Exception:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.space.disk_full(str(e.strerror))
        return OutOfResources(f"cannot write to storage {self.root}: {e.strerror or e}")

    def set_aside(self, rel: str) -> str:
        """Move a stored file into CONFLICTS_DIR, durably (rename, then fsync both folders);
        its new relative path."""
        new = f"{CONFLICTS_DIR}/{rel}"
        new_dir = new.rsplit("/", 1)[0]
        try:
            self._ensure_dir(new_dir)
            os.rename(self.path(rel), self.root / new)
            fsync_dir(self.root / new_dir)
            fsync_dir(self.path(rel).parent)
        except OSError as e:
            raise OutOfResources(f"cannot keep a copy aside in {self.root / CONFLICTS_DIR}: "
                                 f"{e.strerror or e}") from None
        return new

    def move(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Rename each (from, to) relative path, then fsync every folder touched, once; for the
        recycle bin (files are moved, never copied: byte-identical, and instant on one volume).
        A file already at its destination counts as moved; the sources that were found at
        neither end are returned."""
        touched: set[str] = set()
        missing = []
        for src, dst in pairs:
            dst_dir = dst.rsplit("/", 1)[0]
            self._ensure_dir(dst_dir)
            try:
                os.rename(self.path(src), self.path(dst))
            except FileNotFoundError:
                if os.path.exists(self.path(dst)):
                    continue   # moved before (a run interrupted after the move)
                if not os.path.exists(self.path(src)):
                    missing.append(src)
                    continue
                # The destination's folder went (an emptied bin) after we last made it.
                with self._dirs_lock:
                    self._known_dirs.discard(dst_dir)
                self._ensure_dir(dst_dir)
                os.rename(self.path(src), self.path(dst))
            touched |= {dst_dir, src.rsplit("/", 1)[0]}
            for kind in DERIVED_KINDS:   # derived text follows no file into the bin
                try:
                    os.unlink(self.root / CACHE_DIR / kind / (src + ".json"))
                except OSError:
                    pass
        for rel_dir in sorted(touched):
            fsync_dir(self.root / rel_dir)
        return missing

    def sweep(self, older_than_s: float) -> int:
        """Remove temporary files of any node older than `older_than_s` (a write takes seconds;
        a file that old belongs to a node that died and never came back). Files removed."""
        removed, limit = 0, time.time() - older_than_s
        for dirpath, _dirs, files in os.walk(self.root / TMP_DIR):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime < limit:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    pass   # gone already, or renamed into place by its writer
        return removed

    def close(self) -> None:
        """Stop the finishing threads (after the files given to them are finished)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self.path(rel))
        except FileNotFoundError:
            pass
        for kind in DERIVED_KINDS:   # what was derived from it (pacsd.storage.derived)
            try:
                os.unlink(self.root / CACHE_DIR / kind / (rel + ".json"))
            except OSError:
                pass

    # --- reading ----------------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        return self.root / _checked(rel)

    def placing(self, rel: str) -> bool:
        """Whether a write of `rel` is in flight, by this node or another sharing the volume:
        its temporary file (STORAGE/.tmp/NODE/<name>.part) is there and its writer is alive
        (it holds the file's lock; one left by a killed process is not waited for)."""
        part = rel.rsplit("/", 1)[-1] + PART
        try:
            folders = [e.path for e in os.scandir(self.root / TMP_DIR) if e.is_dir()]
        except OSError:
            return False
        return any(_being_written(os.path.join(folder, part)) for folder in folders)

    def placed(self, rel: str, wait_s: float | None = None) -> Path:
        """`path(rel)`, for a reader: a file whose row is committed while it is still being
        synced and renamed into place (Archive.put commits both at once) is waited for,
        at most `wait_s`. A file that is simply missing is not (the caller's open fails)."""
        path = self.path(rel)
        if os.path.exists(path) or not self.placing(rel):
            return path
        deadline = time.monotonic() + (PLACE_WAIT_S if wait_s is None else wait_s)
        while time.monotonic() < deadline and not os.path.exists(path) and self.placing(rel):
            time.sleep(0.002)
        return path

    def path_text(self, rel: str) -> str:
        """`path` as a string, without pathlib's parsing (a stat per instance of a series)."""
        return os.path.join(str(self.root), _checked(rel))

    def walk(self, since: float | None = None) -> Iterator[str]:
        """Relative paths of stored files; with `since`, only in folders changed after it."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root):
                dirnames[:] = sorted(d for d in dirnames
                                     if d not in (TMP_DIR, CONFLICTS_DIR, CACHE_DIR, TRASH_DIR))
            else:
                dirnames.sort()
            if since is not None and not dirnames:
                try:
                    if os.stat(dirpath).st_mtime < since:
                        continue
                except OSError:
                    continue
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for f in sorted(filenames):
                if f.endswith(SUFFIX):
                    yield f"{rel_dir}/{f}" if rel_dir != "." else f


def _being_written(path: str) -> bool:
    """Whether a temporary file exists and its writer still holds it (NewFile's lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False   # nobody holds it: its writer is gone
    except BlockingIOError:
        return True
    except OSError:   # no locks on this volume: by its age
        try:
            return os.fstat(fd).st_mtime >= time.time() - PART_STALE_S
        except OSError:
            return False
    finally:
        os.close(fd)   # and with it our lock, if we took one


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    finally:
        view.release()


class NewFile:
    """A file written as its bytes arrive: `add(piece)` for each, written at once; then
    `finishing()` starts the rest in the store's pool (the fsync), which waits for the caller's
    `keep()` to rename the file into place and fsync its folder (a Future of (relative path,
    size)), or `drop()`. So the syncs overlap the caller's checks, and a refused file never
    reaches the storage folders. A failed write is kept and raised by the Future; later pieces
    are ignored."""

    DECISION_WAIT = 600.0   # s a finished file waits for keep() or drop() (a bug otherwise)

    def __init__(self, store: Store) -> None:
        self.store = store
        self.rel = store._new_relpath()
        self.tmp = store.tmp / (self.rel.rsplit("/", 1)[1] + PART)
        self.size = 0
        self.error: Exception | None = None
        self._decided = threading.Event()
        self._keep = False
        self._started = False
        self._lock = threading.Lock()
        self.fd = -1
        try:
            store.space.reserve(0)
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:   # held until placed or dropped: readers tell a live writer from a dead one
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass   # a volume without locks: readers go by the file's age (placing)
        except OSError as e:
            self.error = store._failed(e)
        except StorageFull as e:
            self.error = e

    def add(self, piece: memoryview | bytes) -> None:
        if self.error is not None or self._decided.is_set():
            return
        try:
            self.store.space.reserve(len(piece))
            _pwrite_all(self.fd, piece, self.size)
        except OSError as e:
            # Not raised here (the caller goes on reading the peer's data), nor kept with its
            # traceback, which would keep the caller's buffer exported (STOW-RS cuts the next
            # part out of the same bytearray).
            self.error = self.store._failed(OSError(e.errno, e.strerror))
            return
        except StorageFull as e:
            self.error = e
            return
        self.size += len(piece)

    def finishing(self) -> "Future[tuple[str, int]]":
        self._started = True   # from now on the finishing thread cleans up
        return self.store._finisher().submit(self._finish)

    def keep(self) -> None:
        self._keep = True
        self._decided.set()

    def drop(self) -> None:
        """Forget the file."""
        self._keep = False
        self._decided.set()
        if not self._started:
            self._cleanup()

    def _finish(self) -> tuple[str, int]:
        store, rel = self.store, self.rel
        try:
            if self.error is not None:
                raise self.error
            fsync_fd(self.fd)
            if not self._decided.wait(self.DECISION_WAIT) or not self._keep:
                raise FileDropped(f"{self.tmp.name} was not kept")
            rel_dir = rel.rsplit("/", 1)[0]
            store._ensure_dir(rel_dir)
            with self._lock:
                # Renamed before it is closed: the temporary file is never there unlocked.
                os.rename(self.tmp, store.root / rel)
                os.close(self.fd)
                self.fd = -1
            fsync_dir(store.root / rel_dir)
        except OSError as e:
            self._cleanup()
            raise store._failed(e) from None
        except BaseException:
            self._cleanup()
            raise
        store.space.stored()
        return rel, self.size

    def _cleanup(self) -> None:
        with self._lock:
            if self.fd >= 0:
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass
                os.close(self.fd)
                self.fd = -1


class FileDropped(Exception):
    """A NewFile dropped (or never kept) before it was placed."""
