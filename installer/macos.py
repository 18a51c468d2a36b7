"""macOS: launchd jobs for pacsd and its watchdog, restart after a power failure, no sleep, and
the automatic log-in that a LaunchAgent install needs.

Daemon mode (default): LaunchDaemons running as the hidden system user _pacsd, started at boot
before anyone logs in. Agent mode: LaunchAgents of a person's account (the OsiriX way), which run
only in a logged-in session, hence automatic log-in for that user."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from pacsd_installer import kcpassword, shared, units
from pacsd_installer.layout import LABELS, Layout, Options
from pacsd_installer.system import (Host, InstallError, Plan, ensure_file, remembered,
                                    remove_path, root_and_group_of, root_ids)

KCPASSWORD = PurePosixPath("/etc/kcpassword")
LOGINWINDOW = PurePosixPath("/Library/Preferences/com.apple.loginwindow")
FIRST_SYSTEM_ID, LAST_SYSTEM_ID = 250, 499   # hidden service accounts, below people's 501+


def user_ids(host: Host, user: str) -> tuple[int, int] | None:
    rc, out = host.query("dscl", ".", "-read", f"/Users/{user}", "UniqueID", "PrimaryGroupID")
    found = dict(re.findall(r"^(UniqueID|PrimaryGroupID):\s*(-?\d+)", out, re.MULTILINE))
    if rc != 0 or len(found) != 2:
        return None
    return int(found["UniqueID"]), int(found["PrimaryGroupID"])


def user_home(host: Host, user: str) -> str:
    rc, out = host.query("dscl", ".", "-read", f"/Users/{user}", "NFSHomeDirectory")
    m = re.search(r"NFSHomeDirectory:\s*(\S.*)$", out, re.MULTILINE)
    if rc != 0 or not m:
        raise InstallError(f"there is no user {user!r} on this Mac")
    return m.group(1).strip()


def _free_id(host: Host) -> int:
    taken: set[int] = set()
    for kind, key in (("/Users", "UniqueID"), ("/Groups", "PrimaryGroupID")):
        _, out = host.query("dscl", ".", "-list", kind, key)
        taken |= {int(n) for n in re.findall(r"\s(-?\d+)\s*$", out, re.MULTILINE)}
    for n in range(FIRST_SYSTEM_ID, LAST_SYSTEM_ID + 1):
        if n not in taken:
            return n
    raise InstallError("no free system user ID between 250 and 499")


def _create_user(plan: Plan, host: Host, name: str) -> None:
    n = str(_free_id(host))
    argvs: list[tuple[str, ...]] = []
    for path, attrs in ((f"/Groups/{name}", [("PrimaryGroupID", n), ("RealName", "pacsd"),
                                             ("Password", "*")]),
                        (f"/Users/{name}", [("UniqueID", n), ("PrimaryGroupID", n),
                                            ("RealName", "pacsd PACS server"),
                                            ("UserShell", "/usr/bin/false"),
                                            ("NFSHomeDirectory", "/var/empty"),
                                            ("Password", "*"), ("IsHidden", "1")])):
        argvs.append(("dscl", ".", "-create", path))
        argvs += [("dscl", ".", "-create", path, key, value) for key, value in attrs]
    plan.command(f"create the hidden system user and group {name} (ID {n})", host, *argvs)


def _domain(host: Host, layout: Layout) -> str | None:
    """launchd domain of the jobs; None when the agent's user is not logged in now."""
    if layout.mode == "daemon":
        return "system"
    ids = user_ids(host, layout.user)
    if ids is None:
        return None
    domain = f"gui/{ids[0]}"
    return domain if host.query("launchctl", "print", domain)[0] == 0 else None


def loaded(host: Host, domain: str | None, label: str) -> bool:
    return domain is not None and host.query("launchctl", "print", f"{domain}/{label}")[0] == 0


def power_settings(host: Host) -> dict[str, str]:
    _, out = host.query("pmset", "-g")
    return dict(re.findall(r"^\s*(autorestart|sleep)\s+(\d+)", out, re.MULTILINE))


def _power(plan: Plan, host: Host) -> None:
    if power_settings(host) != {"autorestart": "1", "sleep": "0"}:
        plan.command("restart after a power failure, and never sleep", host,
                     ("pmset", "-a", "autorestart", "1", "sleep", "0"))
    _, out = host.query("systemsetup", "-getrestartpowerfailure")
    if not re.search(r":\s*On\b", out):
        def do() -> None:
            try:
                host.run("systemsetup", "-setrestartpowerfailure", "on")
            except InstallError as e:   # laptops: "Not supported on this machine"
                plan.warnings.append(f"systemsetup could not set restart after power failure "
                                     f"({e}); pmset's autorestart is set")
        plan.add("restart after a power failure, for models that need it: "
                 "systemsetup -setrestartpowerfailure on", do)


def _auto_login(plan: Plan, host: Host, layout: Layout, opts: Options) -> None:
    user = layout.auto_login
    assert user
    if user_ids(host, user) is None:
        raise InstallError(f"automatic log-in: there is no user {user!r} on this Mac")
    if "FileVault is On" in host.query("fdesetup", "status")[1]:
        plan.warnings.append("FileVault is on: macOS never logs in automatically with FileVault, "
                             + ("so pacsd starts only after someone logs in. Use daemon mode, or "
                                "turn FileVault off" if layout.mode == "agent" else
                                "so the automatic log-in will not happen (pacsd itself does not "
                                "need it in daemon mode)"))
    password = opts.auto_login_password
    if password is None:
        if not host.path(KCPASSWORD).exists():
            raise InstallError(f"automatic log-in of {user} needs that user's password: "
                               "--auto-login-password-file FILE, or run from a terminal")
        plan.notes.append(f"kept the automatic log-in password of {user} (/etc/kcpassword)")
    else:
        if host.query("dscl", ".", "-authonly", user, password)[0] != 0:
            raise InstallError(f"that is not the password of {user}: automatic log-in would fail")
        ensure_file(plan, host, KCPASSWORD, kcpassword.encode(password), 0o600, root_ids,
                    "root:wheel", why=f"(automatic log-in password of {user})")
    domain = str(host.path(LOGINWINDOW))
    if host.query("defaults", "read", domain, "autoLoginUser")[1].strip() != user:
        plan.command(f"log {user} in automatically at boot", host,
                     ("defaults", "write", domain, "autoLoginUser", "-string", user))


def plan_apply(host: Host, layout: Layout, opts: Options, secret: shared.Secret) -> Plan:
    plan = Plan()
    if layout.mode == "daemon" and user_ids(host, layout.user) is None:
        _create_user(plan, host, layout.user)
    svc = remembered(lambda: user_ids(host, layout.user))   # known once useradd/dscl made it
    group_ids, root = root_and_group_of(svc), root_ids
    home = user_home(host, layout.user) if layout.mode == "agent" else ""
    # A person's account owns its agent's files; a daemon's config is root's, readable by _pacsd.
    cfg = shared.config_step(plan, host, layout, opts, *(
        (group_ids, f"root:{layout.group}") if layout.mode == "daemon" else (svc, layout.user)),
        secret)
    domain = _domain(host, layout)
    shared.before_apply(host, layout, opts, cfg, running=loaded(host, domain, LABELS["server"]),
                        plan=plan)
    shared.folders(plan, host, layout, cfg, svc)
    changed = {}
    owner, ids = ("root:wheel", root) if layout.mode == "daemon" else (layout.user, svc)
    for name, data in units.launchd_plists(layout).items():
        changed[name] = ensure_file(plan, host, layout.unit(name, home), data, 0o644, ids, owner)
    _power(plan, host)
    if layout.auto_login:
        _auto_login(plan, host, layout, opts)
    shared.manifest_step(plan, host, layout, root)
    if domain is None:
        plan.notes.append(f"{layout.user} is not logged in now: launchd starts pacsd at the next "
                          "log-in (automatic after a reboot)")
        return plan
    for name in ("server", "watchdog"):
        target, plist = f"{domain}/{LABELS[name]}", str(layout.unit(name, home))
        if loaded(host, domain, LABELS[name]):
            if changed[name]:
                plan.command(f"restart {LABELS[name]} with its new plist", host,
                             ("launchctl", "bootout", target),
                             ("launchctl", "bootstrap", domain, plist))
        else:
            plan.command(f"start {LABELS[name]} now and at every boot", host,
                         ("launchctl", "enable", target),
                         ("launchctl", "bootstrap", domain, plist))
    return plan


def plan_uninstall(host: Host, layout: Layout, opts: Options) -> Plan:
    plan = Plan()
    domain = _domain(host, layout)
    home = user_home(host, layout.user) if layout.mode == "agent" else ""
    for name in ("watchdog", "server"):
        if loaded(host, domain, LABELS[name]):
            plan.command(f"stop {LABELS[name]}", host,
                         ("launchctl", "bootout", f"{domain}/{LABELS[name]}"))
        remove_path(plan, host, layout.unit(name, home))
    if layout.auto_login:
        remove_path(plan, host, KCPASSWORD, "the automatic log-in password")
        domain_file = str(host.path(LOGINWINDOW))
        if host.query("defaults", "read", domain_file, "autoLoginUser")[0] == 0:
            plan.command("turn automatic log-in off", host,
                         ("defaults", "delete", domain_file, "autoLoginUser"))
    remove_path(plan, host, layout.manifest)
    shared.purge_or_keep(plan, host, layout, opts.purge)
    if opts.purge and layout.mode == "daemon" and user_ids(host, layout.user) is not None:
        plan.command(f"remove the system user and group {layout.user}", host,
                     ("dscl", ".", "-delete", f"/Users/{layout.user}"),
                     ("dscl", ".", "-delete", f"/Groups/{layout.user}"))
    plan.notes.append("left as they are: restart after power failure and no sleep (pmset)")
    return plan


def verify(host: Host, layout: Layout, opts: Options) -> list[tuple[bool, str]]:
    """Read back what apply set: it must have taken."""
    power = power_settings(host)
    lines = [(power.get("autorestart") == "1", "restart after a power failure (pmset autorestart 1)"),
             (power.get("sleep") == "0", "system sleep off (pmset sleep 0)")]
    if layout.auto_login:
        user = layout.auto_login
        who = host.query("defaults", "read", str(host.path(LOGINWINDOW)), "autoLoginUser")[1]
        lines.append((who.strip() == user, f"automatic log-in of {user} (loginwindow)"))
        try:
            stored = kcpassword.decode(host.path(KCPASSWORD).read_bytes())
            ok = opts.auto_login_password is None or stored == opts.auto_login_password
        except (OSError, UnicodeDecodeError):
            ok = False
        lines.append((ok, "/etc/kcpassword holds that user's password"))
        filevault = "FileVault is On" in host.query("fdesetup", "status")[1]
        lines.append((not filevault, "FileVault is off (automatic log-in possible)"))
    return lines


def status(host: Host, layout: Layout) -> list[tuple[bool, str]]:
    domain = _domain(host, layout)
    home = user_home(host, layout.user) if layout.mode == "agent" else ""
    lines = [(user_ids(host, layout.user) is not None, f"user {layout.user}")]
    for name in ("server", "watchdog"):
        lines.append((host.path(layout.unit(name, home)).exists(),
                      f"launchd job {layout.unit(name, home)}"))
        lines.append((loaded(host, domain, LABELS[name]), f"{LABELS[name]} is loaded"))
    return lines + verify(host, layout, Options(action="status", os="macos", root=host.root))
