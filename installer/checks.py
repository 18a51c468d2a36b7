"""What apply checks before it changes anything: root, ports, the data folder and its volume."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path, PurePosixPath

from pacsd_installer.system import Host, InstallError

# Where removable and network volumes are mounted: a data folder below one of these must be on
# the mounted volume, never on the empty mount point of the system disk.
_MOUNT_ROOTS = {"macos": ("/Volumes",), "linux": ("/mnt", "/media", "/run/media")}


def need_root(action: str) -> None:
    if os.geteuid() != 0:
        raise InstallError(f"`pacsd-install {action}` changes the system and must run as root: "
                           f"sudo pacsd-install {action} ...")


def port_free(bind: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InstallError(f"{what} port {port} is taken by another program; stop it or "
                                   f"choose another port (--{what.lower()}-port)") from None
            if e.errno == errno.EACCES:
                raise InstallError(f"{what} port {port} may not be opened here: {e}") from None
            raise


def port_in_use(bind: str, port: int, what: str) -> str | None:
    """Whether something listens on the port, found by connecting to it (never by binding it:
    `plan` must not take a port from a server starting at that moment); what to say, or None."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect((host, port))
        except OSError:
            return None
    return (f"{what} port {port} is taken by another program (something answers on "
            f"{host}:{port}); stop it or choose another port (--{what.lower()}-port)")


def existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def mount_point_missing(host: Host, data: PurePosixPath) -> str | None:
    """The volume the data folder should be on, when it is not mounted."""
    for top in _MOUNT_ROOTS[host.os]:
        rel = data.relative_to(top) if data.is_relative_to(top) else None
        if rel is None or not rel.parts:
            continue
        # /Volumes/NAME, /mnt/NAME, /media/NAME or /media/USER/NAME
        depth = 2 if top in ("/media", "/run/media") and len(rel.parts) > 2 else 1
        volume = PurePosixPath(top, *rel.parts[:depth])
        local = host.path(volume)
        if not os.path.ismount(local):
            return str(volume)
    return None


def data_folder(host: Host, data: PurePosixPath, min_free_gb: float) -> None:
    volume = mount_point_missing(host, data)
    if volume:
        raise InstallError(f"{volume} is not a mounted volume: the images would go to the system "
                           f"disk instead. Mount it (and make it mount at boot), then run again")
    local = host.path(data)
    base = existing_ancestor(local)
    if not base.is_dir():
        raise InstallError(f"{data} cannot be a folder: {base} is a file")
    st = os.statvfs(base)
    if st.f_flag & os.ST_RDONLY:
        raise InstallError(f"{data} is on a read-only volume")
    if not os.access(base, os.W_OK):
        raise InstallError(f"{base} is not writable")
    free_gb = shutil.disk_usage(base).free / 2**30
    if free_gb < min_free_gb:
        raise InstallError(f"only {free_gb:.1f} GB free for {data} (at least {min_free_gb:g} GB "
                           "wanted, --min-free-gb); images need room")
