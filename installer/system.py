"""The machine being set up: where its files are (`--root` puts them under a staging folder),
how its commands are run, and the steps of a plan.

Every OS command goes through `Host.query` (read-only, also run by `plan`) or `Host.run`
(a change, only in a Step), found on PATH by name. Tests put recording stand-ins first on PATH
for the commands that cannot run here (launchctl, pmset, systemctl, ...)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


class InstallError(Exception):
    """Something the installer cannot do; the message says what and what to do about it."""


@dataclass
class Step:
    """One change: `what` is its line in the plan, `do` makes it."""
    what: str
    do: Callable[[], None]


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # said, not done
    warnings: list[str] = field(default_factory=list)

    def add(self, what: str, do: Callable[[], None]) -> None:
        self.steps.append(Step(what, do))

    def command(self, what: str, host: Host, *argvs: tuple[str, ...]) -> None:
        """A step made of OS commands, shown as they will run."""
        shown = "; ".join(shlex.join(a) for a in argvs)

        def do() -> None:
            for argv in argvs:
                host.run(*argv)
        self.add(f"{what}: {shown}", do)


class Host:
    def __init__(self, os_name: str, root: Path) -> None:
        self.os = os_name
        self.root = root.resolve()

    @property
    def staging(self) -> bool:
        return self.root != Path("/")

    def path(self, p: PurePosixPath | str) -> Path:
        """A path of the installed system, as a file here (under --root)."""
        return self.root / PurePosixPath(p).relative_to("/")

    def _argv(self, argv: tuple[str, ...]) -> list[str]:
        exe = shutil.which(argv[0])
        if exe is None:
            raise InstallError(f"the command {argv[0]!r} is not on this machine: is this really "
                               f"{'macOS' if self.os == 'macos' else 'Linux with systemd'}?")
        return [exe, *argv[1:]]

    def query(self, *argv: str) -> tuple[int, str]:
        """Run a command that changes nothing: (exit status, standard output)."""
        r = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=60,
                           check=False)
        return r.returncode, r.stdout

    def run(self, *argv: str) -> str:
        """Run a command that makes a change; InstallError when it fails."""
        r = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=300,
                           check=False)
        if r.returncode != 0:
            raise InstallError(f"`{' '.join(argv)}` failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[:300]}")
        return r.stdout


def remembered(lookup: Callable[[], tuple[int, int] | None]
               ) -> Callable[[], tuple[int, int] | None]:
    """`lookup` (an OS query) asked again until it finds the account, then remembered."""
    found: tuple[int, int] | None = None

    def ids() -> tuple[int, int] | None:
        nonlocal found
        if found is None:
            found = lookup()
        return found
    return ids


def root_ids() -> tuple[int, int] | None:
    return 0, 0


def root_and_group_of(ids: Callable[[], tuple[int, int] | None]
                      ) -> Callable[[], tuple[int, int] | None]:
    """Owned by root, group of the service user: it may read, not change."""
    def both() -> tuple[int, int] | None:
        found = ids()
        return (0, found[1]) if found else None
    return both


def owner_ids(path: Path) -> tuple[int, int, int]:
    st = path.stat()   # planted symbolic links are refused before (refuse_planted_link)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def refuse_planted_link(path: PurePosixPath, local: Path) -> None:
    """InstallError if `local` is a symbolic link in a folder that someone other than root
    owns (the service user can plant one in its data folder, pointing at /etc): we run as
    root, and following it would hand the target to the service user. A link that only root
    could have made (an admin's /var/lib/pacsd -> /data/pacsd) is followed as before."""
    if not local.is_symlink():
        return
    try:
        parent_owner = local.parent.lstat().st_uid
    except OSError:
        parent_owner = -1
    if parent_owner != 0:
        raise InstallError(f"{path} is a symbolic link (to {os.readlink(local)}) in a folder "
                           f"that uid {parent_owner} owns: not following it as root, and "
                           "changing nothing. Remove the link (or make it a real folder) and "
                           "run the installer again")


def _open_nofollow(local: Path, path: PurePosixPath, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses a symbolic link at the last component (ELOOP), with our words."""
    try:
        return os.open(local, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if local.is_symlink():
            raise InstallError(f"{path} became a symbolic link (to {os.readlink(local)}): "
                               "not following it as root") from None
        raise e


def _give(fd: int, want: tuple[int, int], mode: int) -> None:
    """Owner and mode through an open descriptor: what was opened is what changes."""
    os.fchown(fd, *want)
    os.fchmod(fd, mode)


def ensure_dir(plan: Plan, host: Host, path: PurePosixPath, mode: int,
               ids: Callable[[], tuple[int, int] | None], owner: str) -> None:
    """Create a folder (and its parents) or mend its owner and mode."""
    local = host.path(path)
    refuse_planted_link(path, local)
    now = ids()
    if local.is_dir() and now is not None and owner_ids(local) == (*now, mode):
        return

    def do() -> None:
        refuse_planted_link(path, local)
        local.mkdir(parents=True, exist_ok=True)
        want = ids()
        if want is None:
            raise InstallError(f"{owner} does not exist, so {path} cannot be given to it")
        if local.is_symlink():   # one only root could make (refuse_planted_link): followed
            fd = os.open(local, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd = _open_nofollow(local, path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _give(fd, want, mode)
        finally:
            os.close(fd)
    state = "create" if not local.exists() else "set owner and mode of"
    plan.add(f"{state} folder {path} ({mode:04o}, {owner})", do)


def ensure_file(plan: Plan, host: Host, path: PurePosixPath, content: bytes, mode: int,
                ids: Callable[[], tuple[int, int] | None], owner: str,
                why: str = "") -> bool:
    """Write a file atomically when its content, owner or mode differ; True if it will."""
    local = host.path(path)
    refuse_planted_link(path, local)
    now = ids()
    try:
        same = local.read_bytes() == content and now is not None \
            and owner_ids(local) == (*now, mode)
    except OSError:
        same = False
    if same:
        return False

    def do() -> None:
        want = ids()
        if want is None:
            raise InstallError(f"{owner} does not exist, so {path} cannot be given to it")
        refuse_planted_link(path, local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".pacsd-install")
        try:   # a leftover, or a link planted there: removed, never written through
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = _open_nofollow(tmp, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
            _give(f.fileno(), want, mode)
        os.replace(tmp, local)   # replaces a link at `local` itself, never its target
    verb = "write" if not local.exists() else "update"
    plan.add(f"{verb} {path} ({mode:04o}, {owner}){' ' + why if why else ''}", do)
    return True


def remove_path(plan: Plan, host: Host, path: PurePosixPath, what: str = "") -> None:
    local = host.path(path)
    if not local.exists() and not local.is_symlink():
        return

    def do() -> None:
        if local.is_dir() and not local.is_symlink():
            shutil.rmtree(local)
        else:
            local.unlink()
    plan.add(f"remove {what or path}{' (' + str(path) + ')' if what else ''}", do)
