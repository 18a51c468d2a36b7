"""Stand-ins for the OS commands pacsd-install runs that cannot run here (systemctl without a
running systemd, useradd on the test machine, and macOS's dscl, launchctl, pmset, systemsetup,
defaults, fdesetup). `install(folder, root, state)` makes a bin/ folder of them: put only it on
PATH, so that any other command the installer tried would fail instead of touching this machine.

Each call is recorded (calls.jsonl) and acts on a small model of the machine (state.json), so
that what apply did is visible to the next query, as on a real system; the test reads both."""

from __future__ import annotations

import itertools
import json
import plistlib
import re
import sys
from pathlib import Path

COMMANDS = ("getent", "useradd", "userdel", "systemctl", "dscl", "launchctl", "pmset",
            "systemsetup", "defaults", "fdesetup")
# The calls that only read; every other call is a change.
READS = {("getent",), ("systemctl", "is-active"), ("systemctl", "is-enabled"),
         ("dscl", "-read"), ("dscl", "-list"), ("dscl", "-authonly"), ("launchctl", "print"),
         ("pmset", "-g"), ("systemsetup", "-getrestartpowerfailure"), ("defaults", "read"),
         ("fdesetup", "status")}


def install(folder: Path, root: Path, state: dict) -> Path:
    """Write the stand-ins into folder/bin and the initial state; return the bin folder."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    state = {"root": str(root), "users": {}, "groups": {}, "enabled": [], "active": [],
             "loaded": [], "logged_in": [], "pmset": {"autorestart": "0", "sleep": "10"},
             "restart_power_failure": "Off", "defaults": {}, "filevault": False, **state}
    (folder / "state.json").write_text(json.dumps(state))
    here = Path(__file__).resolve().parent
    for name in COMMANDS:
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(here)!r})\n"
                       f"import standins\nsys.exit(standins.main({str(folder)!r}))\n")
        exe.chmod(0o755)
    return bin_dir


def calls(folder: Path) -> list[list[str]]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def is_read(argv: list[str]) -> bool:
    key = (argv[0], argv[2]) if argv[0] == "dscl" and len(argv) > 2 else tuple(argv[:2])
    return (argv[0],) in READS or key in READS


def changes(folder: Path) -> list[list[str]]:
    return [c for c in calls(folder) if not is_read(c)]


def main(folder: str) -> int:
    base = Path(folder)
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]]
    with open(base / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\n")
    state = json.loads((base / "state.json").read_text())
    rc = globals()["_" + argv[0]](state, argv[1:])
    (base / "state.json").write_text(json.dumps(state))
    return rc


def _fail(message: str, rc: int = 1) -> int:
    print(message, file=sys.stderr)
    return rc


# --- Linux ------------------------------------------------------------------------------------

def _getent(s: dict, a: list[str]) -> int:
    u = s["users"].get(a[1]) if a[0] == "passwd" else None
    if u is None:
        return 2
    print(f"{a[1]}:x:{u['uid']}:{u['gid']}:{u.get('comment', '')}:{u['home']}:{u['shell']}")
    return 0


def _useradd(s: dict, a: list[str]) -> int:
    name = a[-1]
    if name in s["users"]:
        return _fail(f"useradd: user '{name}' already exists", 9)
    opts = dict(itertools.pairwise(a[:-1]))
    uid = 999 - len(s["users"])
    s["users"][name] = {"uid": uid, "gid": uid, "home": opts.get("--home-dir", "/"),
                        "shell": opts.get("--shell", "/bin/sh"),
                        "comment": opts.get("--comment", "")}
    return 0


def _userdel(s: dict, a: list[str]) -> int:
    return 0 if s["users"].pop(a[-1], None) else _fail(f"userdel: user '{a[-1]}' does not exist", 6)


def _systemctl(s: dict, a: list[str]) -> int:
    verb, units = a[0], [x for x in a[1:] if not x.startswith("-")]
    unit_dir = Path(s["root"], "etc/systemd/system")
    if verb == "is-active":
        return 0 if units[0] in s["active"] else 3
    if verb == "is-enabled":
        return 0 if units[0] in s["enabled"] else 1
    if verb == "daemon-reload":
        return 0
    missing = [u for u in units if verb in ("enable", "start", "restart")
               and not (unit_dir / u).is_file()]
    if missing:
        return _fail(f"Failed to {verb} unit: Unit file {missing[0]} does not exist.", 5)
    for u in units:
        if verb == "enable" and u not in s["enabled"]:
            s["enabled"].append(u)
        if verb in ("start", "restart") and u not in s["active"]:
            s["active"].append(u)
        if verb == "disable":
            s["enabled"] = [x for x in s["enabled"] if x != u]
            if "--now" in a:
                s["active"] = [x for x in s["active"] if x != u]
        if verb == "stop":
            s["active"] = [x for x in s["active"] if x != u]
    return 0


# --- macOS ------------------------------------------------------------------------------------

_KEYS = {"UniqueID": "uid", "PrimaryGroupID": "gid", "NFSHomeDirectory": "home",
         "UserShell": "shell", "RealName": "comment", "Password": "pw", "IsHidden": "hidden"}


def _dscl(s: dict, a: list[str]) -> int:
    if a[0] != ".":
        return _fail("dscl: only the local node here")
    verb, path = a[1], a[2] if len(a) > 2 else ""
    kind, _, name = path.strip("/").partition("/")
    table = s["users"] if kind == "Users" else s["groups"]
    if verb == "-authonly":
        u = s["users"].get(a[2])
        return 0 if u and u.get("password") == a[3] else _fail("Authentication failed", 70)
    if verb == "-list":
        key = _KEYS[a[3]]
        for n, rec in sorted(table.items()):
            if key in rec:
                print(f"{n:<24}{rec[key]}")
        return 0
    if verb == "-read":
        rec = table.get(name)
        if rec is None:
            return _fail("<dscl_cmd> DS Error: -14136 (eDSRecordNotFound)", 56)
        for key in a[3:] or list(_KEYS):
            if _KEYS[key] in rec:
                print(f"{key}: {rec[_KEYS[key]]}")
        return 0
    if verb == "-create":
        rec = table.setdefault(name, {})
        if len(a) == 5:
            value = a[4]
            rec[_KEYS[a[3]]] = int(value) if a[3] in ("UniqueID", "PrimaryGroupID") else value
        return 0
    if verb == "-delete":
        return 0 if table.pop(name, None) is not None else _fail("eDSRecordNotFound", 56)
    return _fail(f"dscl: {verb}?")


def _launchctl(s: dict, a: list[str]) -> int:
    verb = a[0]
    if verb == "print":
        target = a[1]
        if target == "system" or re.fullmatch(r"gui/\d+", target):
            ok = target == "system" or target in [f"gui/{u}" for u in s["logged_in"]]
            return 0 if ok else _fail(f"Could not find domain for {target}", 113)
        return 0 if target in s["loaded"] else _fail(f"Could not find service {target}", 113)
    if verb == "bootstrap":
        domain, plist_path = a[1], Path(s["root"], a[2].lstrip("/"))
        try:
            label = plistlib.loads(plist_path.read_bytes())["Label"]
        except (OSError, plistlib.InvalidFileException, KeyError) as e:
            return _fail(f"Bootstrap failed: 5: Input/output error ({e})", 5)
        if f"{domain}/{label}" in s["loaded"]:
            return _fail("Bootstrap failed: 5: Input/output error", 5)
        s["loaded"].append(f"{domain}/{label}")
        return 0
    if verb == "bootout":
        if a[1] not in s["loaded"]:
            return _fail("Boot-out failed: 3: No such process", 3)
        s["loaded"].remove(a[1])
        return 0
    if verb in ("enable", "kickstart"):
        return 0
    return _fail(f"launchctl: {verb}?")


def _pmset(s: dict, a: list[str]) -> int:
    if a == ["-g"]:
        print("System-wide power settings:\nCurrently in use:")
        for k, v in s["pmset"].items():
            print(f" {k:<20} {v}")
        return 0
    if a[0] == "-a":
        pairs = a[1:]
        s["pmset"].update(dict(zip(pairs[::2], pairs[1::2])))
        return 0
    return _fail("pmset: usage")


def _systemsetup(s: dict, a: list[str]) -> int:
    if a[0] == "-getrestartpowerfailure":
        print(f"Restart After Power Failure: {s['restart_power_failure']}")
        return 0
    if a[0] == "-setrestartpowerfailure":
        s["restart_power_failure"] = "On" if a[1].lower() == "on" else "Off"
        return 0
    return _fail("systemsetup: usage")


def _defaults(s: dict, a: list[str]) -> int:
    verb, domain, key = a[0], a[1], a[2]
    table = s["defaults"].setdefault(domain, {})
    if verb == "read":
        if key not in table:
            return _fail(f"The domain/default pair of ({domain}, {key}) does not exist")
        print(table[key])
        return 0
    if verb == "write":
        table[key] = a[-1]
        return 0
    if verb == "delete":
        return 0 if table.pop(key, None) is not None else _fail("not found")
    return _fail("defaults: usage")


def _fdesetup(s: dict, a: list[str]) -> int:
    print("FileVault is On." if s["filevault"] else "FileVault is Off.")
    return 0

