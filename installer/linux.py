"""Linux: a system user, systemd units (pacsd Type=notify with WatchdogSec, and the watchdog),
enabled and started; optionally a console automatic log-in (getty drop-in)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pacsd_installer import shared, units
from pacsd_installer.layout import Layout, Options
from pacsd_installer.system import (Host, InstallError, Plan, ensure_file, remembered,
                                    remove_path, root_and_group_of, root_ids)

SERVICES = ("pacsd.service", "pacsd-watchdog.service")
GETTY_DROPIN = PurePosixPath("/etc/systemd/system/getty@tty1.service.d/pacsd-autologin.conf")
POWER_NOTE = ("restart after a power cut is a firmware setting on Linux machines: in the "
              "BIOS/UEFI set 'Restore on AC power loss' (or 'After power loss') to 'Power On'; "
              "then systemd starts pacsd at boot")


def user_ids(host: Host, user: str) -> tuple[int, int] | None:
    rc, out = host.query("getent", "passwd", user)
    if rc != 0 or out.count(":") < 6:
        return None
    fields = out.strip().split(":")
    return int(fields[2]), int(fields[3])


def _nologin() -> str:
    for p in ("/usr/sbin/nologin", "/sbin/nologin"):
        if Path(p).exists():
            return p
    return "/bin/false"


def _agetty() -> str:
    for p in ("/sbin/agetty", "/usr/sbin/agetty", "/usr/bin/agetty"):
        if Path(p).exists():
            return p
    return "/sbin/agetty"


def active(host: Host, service: str) -> bool:
    return host.query("systemctl", "is-active", "--quiet", service)[0] == 0


def plan_apply(host: Host, layout: Layout, opts: Options, secret: shared.Secret) -> Plan:
    plan = Plan()
    svc = remembered(lambda: user_ids(host, layout.user))   # known once useradd/dscl made it
    group_ids, root = root_and_group_of(svc), root_ids
    if svc() is None:
        plan.command(f"create the system user {layout.user} (no log-in, no home)", host,
                     ("useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
                      layout.data, "--shell", _nologin(), "--comment", "pacsd PACS server",
                      layout.user))
    cfg = shared.config_step(plan, host, layout, opts, group_ids, f"root:{layout.group}", secret)
    shared.before_apply(host, layout, opts, cfg, running=active(host, SERVICES[0]), plan=plan)
    writable = shared.folders(plan, host, layout, cfg, svc)
    texts = units.systemd_units(layout, cfg, writable)
    changed = False
    for name, text in texts.items():
        changed |= ensure_file(plan, host, layout.unit(name), text.encode(), 0o644, root, "root")
    if layout.auto_login:
        if user_ids(host, layout.auto_login) is None:
            raise InstallError(f"--auto-login: there is no user {layout.auto_login!r}")
        changed |= ensure_file(plan, host, GETTY_DROPIN,
                               units.getty_autologin(layout.auto_login, _agetty()).encode(),
                               0o644, root, "root", why=f"(console log-in of {layout.auto_login})")
    shared.manifest_step(plan, host, layout, root)
    if changed:
        plan.command("make systemd read them", host, ("systemctl", "daemon-reload"))
    if any(host.query("systemctl", "is-enabled", "--quiet", s)[0] != 0 for s in SERVICES):
        plan.command("start both at every boot", host, ("systemctl", "enable", *SERVICES))
    if not all(active(host, s) for s in SERVICES):
        plan.command("start them now", host, ("systemctl", "start", *SERVICES))
    elif changed:
        plan.command("restart them with the new unit files", host,
                     ("systemctl", "restart", *SERVICES))
    plan.notes.append(POWER_NOTE)
    return plan


def plan_uninstall(host: Host, layout: Layout, opts: Options) -> Plan:
    plan = Plan()
    present = [s for s in SERVICES if host.path(layout.unit(
        "server" if s == SERVICES[0] else "watchdog")).exists()]
    if present:
        plan.command("stop them and no longer start them at boot", host,
                     ("systemctl", "disable", "--now", *reversed(present)))
    for name in ("watchdog", "server"):
        remove_path(plan, host, layout.unit(name))
    if layout.auto_login:
        remove_path(plan, host, GETTY_DROPIN, "the console automatic log-in")
    if plan.steps:
        plan.command("make systemd forget them", host, ("systemctl", "daemon-reload"))
    remove_path(plan, host, layout.manifest)
    shared.purge_or_keep(plan, host, layout, opts.purge)
    if opts.purge and user_ids(host, layout.user) is not None:
        plan.command(f"remove the system user {layout.user}", host, ("userdel", layout.user))
    return plan


def status(host: Host, layout: Layout) -> list[tuple[bool, str]]:
    lines = [(user_ids(host, layout.user) is not None, f"system user {layout.user}")]
    for name, service in zip(("server", "watchdog"), SERVICES):
        lines.append((host.path(layout.unit(name)).exists(), f"unit file {layout.unit(name)}"))
        enabled = host.query("systemctl", "is-enabled", "--quiet", service)[0] == 0
        lines.append((enabled, f"{service} starts at boot"))
        lines.append((active(host, service), f"{service} is running"))
    return lines
