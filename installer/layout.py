"""What goes where on each OS, the choices of an install, and the config file it writes."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from pacsd_installer.system import Host, InstallError

OSES = ("linux", "macos")
LABELS = {"server": "org.pacsd.server", "watchdog": "org.pacsd.watchdog"}


@dataclass(frozen=True)
class Options:
    """What was asked on the command line; None means "the default, or what is installed"."""
    action: str
    os: str
    root: Path
    mode: str | None = None          # macOS: daemon (default) or agent
    user: str | None = None
    data: str | None = None
    aet: str = "PACSD"
    dicom_port: int = 11112
    http_port: int = 8080
    auto_login: str | None = None
    auto_login_password: str | None = None
    purge: bool = False
    min_free_gb: float = 5.0


@dataclass(frozen=True)
class Layout:
    """Every path and name of one install. Paths are those of the installed system."""
    os: str
    mode: str
    user: str
    group: str
    config_dir: str
    data: str
    log_dir: str
    python: str
    auto_login: str | None = None

    @property
    def config(self) -> PurePosixPath:
        return PurePosixPath(self.config_dir, "pacsd.toml")

    @property
    def manifest(self) -> PurePosixPath:
        return PurePosixPath(self.config_dir, "install.json")

    def unit(self, name: str, home: str = "") -> PurePosixPath:
        """Where the unit file of `name` (server or watchdog) goes."""
        if self.os == "linux":
            return PurePosixPath("/etc/systemd/system",
                                 "pacsd.service" if name == "server" else "pacsd-watchdog.service")
        folder = "/Library/LaunchDaemons" if self.mode == "daemon" \
            else f"{home}/Library/LaunchAgents"
        return PurePosixPath(folder, LABELS[name] + ".plist")

    def manifest_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()


def defaults(os_name: str) -> dict[str, str]:
    if os_name == "linux":
        return {"config_dir": "/etc/pacsd", "data": "/var/lib/pacsd", "log_dir": "/var/log/pacsd"}
    return {"config_dir": "/Library/Application Support/pacsd", "data": "/Users/Shared/pacsd",
            "log_dir": "/Library/Logs/pacsd"}


def installed(host: Host, os_name: str) -> Layout | None:
    """The layout recorded by an earlier apply, if any."""
    path = host.path(PurePosixPath(defaults(os_name)["config_dir"], "install.json"))
    try:
        return Layout(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise InstallError(f"{path} is damaged ({e}); remove it and run apply again") from None


def choose(host: Host, opts: Options) -> Layout:
    """The layout of this run: the options, else what is installed, else the defaults."""
    before = installed(host, opts.os)
    if before and opts.action in ("uninstall", "status"):
        return before
    mode = opts.mode or (before.mode if before else "daemon")
    if opts.os == "linux" and mode != "daemon":
        raise InstallError("agent mode is for macOS; on Linux pacsd runs as a system service")
    if mode == "agent":
        user = opts.user or (before.user if before and before.mode == "agent" else "") \
            or os.environ.get("SUDO_USER", "")
        if not user or user == "root":
            raise InstallError("agent mode runs pacsd in a user's log-in session: name the user "
                               "with --user (not root)")
    else:
        user = opts.user or (before.user if before else "") \
            or ("pacsd" if opts.os == "linux" else "_pacsd")
    d = defaults(opts.os)
    data = opts.data or (before.data if before else d["data"])
    if not data.startswith("/"):
        raise InstallError(f"--data must be an absolute path, not {data!r}")
    auto_login = opts.auto_login or (user if mode == "agent" else None) \
        or (before.auto_login if before else None)
    return Layout(os=opts.os, mode=mode, user=user, group=user, config_dir=d["config_dir"],
                  data=os.path.normpath(data), log_dir=d["log_dir"], python=sys.executable,
                  auto_login=auto_login)


def config_text(layout: Layout, opts: Options, password_hash: str) -> str:
    """The first config file: the install's paths and ports, and one administrator."""
    def q(s: str) -> str:
        return json.dumps(s)   # a TOML basic string is a JSON string for these values
    return f"""\
# pacsd configuration, written by pacsd-install. Every setting, its value in effect and where
# it comes from: pacsd config --list --config THIS_FILE (their meanings: the manual's settings
# reference). Check it after an edit: pacsd config --check --config THIS_FILE
# Then restart the service ({'systemctl restart pacsd' if layout.os == 'linux'
                             else 'launchctl kickstart -k ' + ('system/' if layout.mode == 'daemon'
                                                               else 'gui/UID/') + LABELS['server']}).

[server]
data = {q(layout.data)}

[dicom]
aet = {q(opts.aet)}
port = {opts.dicom_port}
bind = "0.0.0.0"

[http]
port = {opts.http_port}
# Workstations and browsers on the network reach the web side; users below log in.
bind = "0.0.0.0"

[log]
file = {q(layout.log_dir + '/pacsd.log')}

[watchdog]
log_file = {q(layout.log_dir + '/watchdog.log')}

# The administrator of the web pages and XML-RPC. Add users with `pacsd passwd NAME`.
[[users]]
name = "admin"
password_hash = {q(password_hash)}
admin = true
"""


def python_readable_by_others(python: str) -> str | None:
    """Why a service user could not run this Python and its packages, or None."""
    import pacsd
    for target in (Path(python).resolve(), Path(pacsd.__file__).resolve().parent):
        for folder in target.parents:
            if os.stat(folder).st_mode & 0o001 == 0:
                return (f"{folder} is closed to other users, so the service user could not "
                        f"run {target}. Install pacsd with a Python made for every user "
                        "(Debian: /usr/bin/python3; macOS: python.org or Homebrew) into a "
                        "folder they can read: installer/install.sh does (/opt/pacsd or "
                        "/usr/local/pacsd)")
    return None


def check_os(name: str) -> str:
    if name not in OSES:
        raise InstallError(f"unsupported OS {name!r}: pacsd-install knows Linux with systemd and "
                           "macOS (launchd)")
    return name


def this_os() -> str:
    return {"linux": "linux", "darwin": "macos"}.get(sys.platform, sys.platform)
