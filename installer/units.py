"""Fill in the unit templates of systemd/ and launchd/ for one install."""

from __future__ import annotations

import plistlib
import re
from importlib.resources import files
from string import Template
from xml.sax.saxutils import escape

from pacsd_installer.layout import LABELS, Layout
from pacsd_installer.system import InstallError

from pacsd.config import Config

# systemd splits paths at spaces and expands % and $ in some settings: keep to plain paths.
_SYSTEMD_SAFE = re.compile(r"^/[A-Za-z0-9_./@+-]*$")


def _template(folder: str, name: str) -> Template:
    return Template(files(f"pacsd_installer.{folder}").joinpath(name).read_text())


def systemd_paths(*paths: str) -> str:
    for p in paths:
        if not _SYSTEMD_SAFE.match(p):
            raise InstallError(f"{p!r}: on Linux, use a path of letters, digits and ._-+@/ only "
                               "(systemd unit files split paths at spaces)")
    return " ".join(dict.fromkeys(paths))   # unique, in order


def systemd_units(layout: Layout, cfg: Config, writable: list[str]) -> dict[str, str]:
    """{"server": text, "watchdog": text} of the two .service files."""
    low_port = min(cfg.dicom_port, cfg.http_port) < 1024
    home_like = ("/home/", "/root/", "/run/user/")
    under_home = any((p + "/").startswith(home_like) for p in [*writable, layout.python])
    caps = "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE" \
        if low_port else "# No privileges at all (ports 1024 and up).\nCapabilityBoundingSet="
    values = {
        "user": layout.user, "group": layout.group,
        "python": systemd_paths(layout.python), "config": systemd_paths(str(layout.config)),
        "mounts": systemd_paths(str(cfg.data), str(cfg.storage_path)),
        "writable": systemd_paths(*writable),
        "watchdog_writable": systemd_paths(*[str(p.parent) for p in (cfg.watchdog_log_path,)
                                             if p is not None] or [str(cfg.data)]),
        # ProtectHome=yes hides /home entirely; read-only lets a data folder there be listed
        # in ReadWritePaths.
        "protect_home": "read-only" if under_home else "yes",
        "capabilities": caps,
    }
    return {"server": _template("systemd", "pacsd.service").substitute(values),
            "watchdog": _template("systemd", "pacsd-watchdog.service").substitute(values)}


def getty_autologin(user: str, agetty: str) -> str:
    return _template("systemd", "autologin.conf").substitute(
        login_user=user, agetty=systemd_paths(agetty))


def launchd_plists(layout: Layout) -> dict[str, bytes]:
    """{"server": plist, "watchdog": plist}. A LaunchAgent runs as the logged-in user: no
    UserName/GroupName, and it asks for the resources of an app (no background throttling)."""
    out = {}
    for name, template in (("server", "org.pacsd.server.plist"),
                           ("watchdog", "org.pacsd.watchdog.plist")):
        values = {"label": LABELS[name], "python": layout.python, "config": str(layout.config),
                  "user": layout.user, "group": layout.group, "data": layout.data,
                  "log_dir": layout.log_dir}
        text = _template("launchd", template).substitute(
            {k: escape(v) for k, v in values.items()})
        plist = plistlib.loads(text.encode())
        if layout.mode == "agent":
            del plist["UserName"], plist["GroupName"]
            plist["LimitLoadToSessionType"] = "Aqua"
            plist["ProcessType"] = "Interactive"
        out[name] = plistlib.dumps(plist, sort_keys=False)
    return out

