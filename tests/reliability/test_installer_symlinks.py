"""The installer runs as root: a symbolic link that the service user planted in its data folder
(which it owns) must never make the installer change the owner or mode of what the link points
at (a folder or file outside, e.g. /etc). The installer refuses, says why, and changes nothing
there. Run as in tests/test_installer.py: pacsd-install into a staging root, with stand-ins.
"""

from __future__ import annotations

import os
from pathlib import Path

from test_installer import Staged, linux  # noqa: F401  (the fixture)


def owner_and_mode(p: Path) -> tuple[int, int, int]:
    st = os.stat(p)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def test_a_planted_symlink_in_the_data_folder_is_not_followed(linux: Staged, tmp_path: Path
                                                              ) -> None:  # noqa: F811
    linux.apply("--os", "linux")
    data = linux.path("/var/lib/pacsd")
    service_uid = data.stat().st_uid
    assert service_uid != 0, "the data folder belongs to the service user"

    # Outside the data folder, root's: a folder and a file the service user must never own.
    secret_dir = tmp_path / "etc-like"
    secret_dir.mkdir(mode=0o700)
    secret_file = secret_dir / "shadow"
    secret_file.write_text("root:*:1:0:99999:7:::\n")
    os.chmod(secret_file, 0o600)
    before = {p: owner_and_mode(p) for p in (secret_dir, secret_file)}

    # The service user swaps its storage folder (and the log folder) for links to them.
    storage = data / "storage"
    os.rename(storage, data / "storage.old")
    storage.symlink_to(secret_dir)
    logs = data / "logs"
    if logs.exists():
        os.rename(logs, data / "logs.old")
    logs.symlink_to(secret_file)
    for link in (storage, logs):
        os.lchown(link, service_uid, service_uid)

    r = linux.apply("--os", "linux", check=False)
    assert {p: owner_and_mode(p) for p in (secret_dir, secret_file)} == before
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "is a symbolic link" in r.stderr and "not following it as root" in r.stderr, r.stderr
    assert secret_file.read_text() == "root:*:1:0:99999:7:::\n"
    assert storage.is_symlink() and logs.is_symlink()   # left as they are, for a person
