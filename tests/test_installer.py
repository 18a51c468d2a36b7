"""pacsd-install into a staging root (--root), as a subprocess, with the OS commands that cannot
run here replaced by recording stand-ins (tests/standins.py) and nothing else on PATH.

The rendered systemd units are checked by the real `systemd-analyze verify`, the launchd plists
by plistlib (keys, types, and paths that exist after the staged install), and the commands
pacsd runs from them are started for real."""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import standins
from conftest import dcmtk, free_port, terminate
from pacsd.config import load
from pacsd.web.auth import check_password
from pacsd_installer import kcpassword
from pacsd_installer.layout import python_readable_by_others

PEOPLE = {"alice": {"uid": 501, "gid": 20, "home": "/Users/alice", "shell": "/bin/zsh",
                    "password": "password"},
          "root": {"uid": 0, "gid": 0, "home": "/var/root", "shell": "/bin/sh"},
          "_www": {"uid": 250, "gid": 250, "home": "/", "shell": "/usr/bin/false"}}


class Staged:
    """A staging root, its stand-in commands, and pacsd-install run against them."""

    def __init__(self, tmp: Path, state: dict) -> None:
        self.root = tmp / "root"
        self.root.mkdir(parents=True)
        self.box = tmp / "standins"
        self.bin = standins.install(self.box, self.root, state)
        self.dicom_port, self.http_port = free_port(), free_port()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": str(self.bin), "LANG": "C.UTF-8", "HOME": str(self.root)}
        r = subprocess.run([sys.executable, "-m", "pacsd_installer", *args, "--root",
                            str(self.root)], capture_output=True, text=True, env=env,
                           stdin=subprocess.DEVNULL, timeout=120, check=False)
        if check:
            assert r.returncode == 0, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def apply(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("apply", "--dicom-port", str(self.dicom_port),
                        "--http-port", str(self.http_port), *args, check=check)

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def changes(self) -> list[list[str]]:
        """The recorded calls that change something, and forget them."""
        out = standins.changes(self.box)
        (self.box / "calls.jsonl").unlink(missing_ok=True)
        return out

    def state(self) -> dict:
        return json.loads((self.box / "state.json").read_text())

    def snapshot(self) -> dict[str, tuple]:
        """Every file and folder under the root: content, mode, owner, mtime."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            st = p.lstat()
            out[str(p.relative_to(self.root))] = (
                p.read_bytes() if p.is_file() else None, st.st_mode, st.st_uid, st.st_gid,
                st.st_mtime_ns)
        return out


@pytest.fixture
def linux(tmp_path: Path) -> Staged:
    return Staged(tmp_path / "linux", {"users": {"bob": {"uid": 1000, "gid": 1000, "home": "/home/bob",
                                               "shell": "/bin/bash"}}})


@pytest.fixture
def mac(tmp_path: Path) -> Staged:
    return Staged(tmp_path / "mac", {"users": dict(PEOPLE), "groups": {"_www": {"gid": 250}},
                             "logged_in": [501]})


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def systemd_verify(*units: Path) -> None:
    """The real systemd-analyze: any complaint (even an ignored setting) fails the test."""
    exe = dcmtk("systemd-analyze", package="systemd")
    r = subprocess.run([exe, "verify", "--man=no", *map(str, units)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr + r.stdout


# --- Linux ------------------------------------------------------------------------------------

def test_plan_prints_every_change_and_makes_none(linux: Staged) -> None:
    r = linux.run("plan", "--os", "linux")
    out = r.stdout
    for expected in ("useradd --system --user-group", "write /etc/pacsd/pacsd.toml",
                     "write /etc/systemd/system/pacsd.service",
                     "write /etc/systemd/system/pacsd-watchdog.service",
                     "create folder /var/lib/pacsd", "systemctl daemon-reload",
                     "systemctl enable pacsd.service pacsd-watchdog.service",
                     "systemctl start pacsd.service pacsd-watchdog.service",
                     "firmware setting"):
        assert expected in out, out
    assert list(linux.root.iterdir()) == [] and linux.changes() == []


def test_linux_apply_renders_valid_units_and_starts_them(linux: Staged) -> None:
    r = linux.apply("--os", "linux")
    assert linux.changes() == [
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
         "/var/lib/pacsd", "--shell", "/usr/sbin/nologin", "--comment", "pacsd PACS server",
         "pacsd"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "pacsd.service", "pacsd-watchdog.service"],
        ["systemctl", "start", "pacsd.service", "pacsd-watchdog.service"]]
    uid = linux.state()["users"]["pacsd"]["uid"]
    server = linux.path("/etc/systemd/system/pacsd.service")
    watchdog = linux.path("/etc/systemd/system/pacsd-watchdog.service")
    systemd_verify(server, watchdog)
    s = unit_settings(server.read_text())
    assert s["Type"] == ["notify"] and s["WatchdogSec"] == ["60"]
    assert s["Restart"] == ["always"] and s["StartLimitIntervalSec"] == ["0"]
    assert s["User"] == ["pacsd"] and s["ProtectSystem"] == ["strict"]
    assert s["NoNewPrivileges"] == ["yes"] and s["CapabilityBoundingSet"] == [""]
    assert s["ReadWritePaths"] == ["/var/lib/pacsd /var/lib/pacsd/storage /var/log/pacsd"]
    assert s["ExecStart"] == [f"{sys.executable} -m pacsd serve --config /etc/pacsd/pacsd.toml"]
    w = unit_settings(watchdog.read_text())
    assert w["ExecStart"] == [f"{sys.executable} -m pacsd_watchdog --config "
                              "/etc/pacsd/pacsd.toml"]
    assert w["User"] == ["pacsd"] and w["Restart"] == ["always"]
    # Owners and modes: the service owns its folders; the config is root's, readable by it.
    for path, mode, owner in (("/var/lib/pacsd", 0o750, uid), ("/var/log/pacsd", 0o750, uid),
                              ("/etc/pacsd", 0o750, 0), ("/etc/pacsd/pacsd.toml", 0o640, 0),
                              ("/etc/systemd/system/pacsd.service", 0o644, 0)):
        st = linux.path(path).stat()
        assert (st.st_mode & 0o7777, st.st_uid) == (mode, owner), path
    assert linux.path("/etc/pacsd/pacsd.toml").stat().st_gid == uid
    # The config is valid, and the password shown once opens the admin account.
    cfg = load(linux.path("/etc/pacsd/pacsd.toml"), env={})
    assert (cfg.data, cfg.dicom_port, cfg.http_bind) == (Path("/var/lib/pacsd"),
                                                         linux.dicom_port, "0.0.0.0")
    password = r.stdout.split("user 'admin', password ")[1].split()[0]
    assert cfg.users[0].admin and check_password(password, cfg.users[0].password_hash)
    assert linux.state()["active"] == ["pacsd.service", "pacsd-watchdog.service"]


def test_second_apply_changes_nothing(linux: Staged) -> None:
    linux.apply("--os", "linux")
    linux.changes()
    before = linux.snapshot()
    r = linux.apply("--os", "linux")
    assert "nothing to change" in r.stdout and "password" not in r.stdout
    assert linux.changes() == [] and linux.snapshot() == before


def test_apply_mends_an_edited_unit_and_restarts(linux: Staged) -> None:
    linux.apply("--os", "linux")
    linux.changes()
    unit = linux.path("/etc/systemd/system/pacsd.service")
    good = unit.read_text()
    unit.write_text(good.replace("Restart=always", "Restart=no"))
    linux.apply("--os", "linux")
    assert unit.read_text() == good
    assert linux.changes() == [["systemctl", "daemon-reload"],
                               ["systemctl", "restart", "pacsd.service",
                                "pacsd-watchdog.service"]]


def test_uninstall_keeps_images_and_purge_removes_them(linux: Staged) -> None:
    linux.apply("--os", "linux")
    image = linux.path("/var/lib/pacsd/storage/1.2.3/image.dcm")
    image.parent.mkdir(parents=True)
    image.write_bytes(b"DICM")
    linux.changes()
    r = linux.run("uninstall", "--os", "linux")
    assert linux.changes() == [["systemctl", "disable", "--now", "pacsd-watchdog.service",
                                "pacsd.service"], ["systemctl", "daemon-reload"]]
    assert not linux.path("/etc/systemd/system/pacsd.service").exists()
    assert image.read_bytes() == b"DICM" and linux.path("/etc/pacsd/pacsd.toml").exists()
    assert "kept the images" in r.stdout and "pacsd" in linux.state()["users"]
    # Installing again finds the kept config: no new password.
    again = linux.apply("--os", "linux")
    assert "password" not in again.stdout and "kept the config file" in again.stdout
    linux.changes()
    linux.run("uninstall", "--os", "linux", "--purge")
    assert not linux.path("/var/lib/pacsd").exists() and not linux.path("/etc/pacsd").exists()
    assert ["userdel", "pacsd"] in linux.changes()
    assert "pacsd" not in linux.state()["users"]


def test_low_port_gets_only_the_bind_capability(linux: Staged) -> None:
    linux.run("apply", "--os", "linux", "--dicom-port", "104", "--http-port",
              str(linux.http_port))
    unit = linux.path("/etc/systemd/system/pacsd.service")
    systemd_verify(unit)
    s = unit_settings(unit.read_text())
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]


def test_linux_console_auto_login_only_when_asked(linux: Staged) -> None:
    linux.apply("--os", "linux")
    dropin = linux.path("/etc/systemd/system/getty@tty1.service.d/pacsd-autologin.conf")
    assert not dropin.exists()
    linux.apply("--os", "linux", "--auto-login", "bob")
    s = unit_settings(dropin.read_text())
    assert s["ExecStart"][0] == "" and "--autologin bob" in s["ExecStart"][1]
    missing = linux.apply("--os", "linux", "--auto-login", "nobody-here", check=False)
    assert missing.returncode == 1 and "no user 'nobody-here'" in missing.stderr


def test_units_commands_run_pacsd_and_status_sees_it(linux: Staged, tmp_path: Path) -> None:
    """Start pacsd and its watchdog with the very command lines of the rendered units (paths
    moved into the staging root by environment overrides), then `status` finds all well."""
    linux.apply("--os", "linux")
    data = linux.path("/var/lib/pacsd")
    env = {**os.environ, "PACSD_SERVER_DATA": str(data), "PACSD_DICOM_BIND": "127.0.0.1",
           "PACSD_HTTP_BIND": "127.0.0.1",
           "PACSD_LOG_FILE": str(linux.path("/var/log/pacsd/pacsd.log")),
           "PACSD_WATCHDOG_LOG_FILE": str(linux.path("/var/log/pacsd/watchdog.log")),
           "PACSD_WATCHDOG_INTERVAL": "0.5", "PACSD_WATCHDOG_GRACE": "0"}
    procs = []
    try:
        for unit in ("pacsd.service", "pacsd-watchdog.service"):
            text = linux.path(f"/etc/systemd/system/{unit}").read_text()
            argv = shlex.split(unit_settings(text)["ExecStart"][0])
            argv = [a if a != "/etc/pacsd/pacsd.toml" else str(linux.path(a)) for a in argv]
            if unit == "pacsd-watchdog.service":
                argv += ["--log-level", "DEBUG"]   # each probe's result, for the rounds below
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{linux.http_port}/testdbalive"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(url, timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        r = linux.run("status", "--os", "linux")
        assert "FAIL" not in r.stdout and f"pacsd answers {url}" in r.stdout
        # The watchdog, from its unit's command line, finds this pacsd and finds it healthy.
        wlog = linux.path("/var/log/pacsd/watchdog.log")

        def logged() -> str:
            return wlog.read_text() if wlog.exists() else ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and logged().count("probe echo ok") < 4:
            time.sleep(0.1)
        assert f"watching pacsd pid {procs[0].pid}" in logged()
        assert logged().count("probe echo ok") >= 4, "four rounds of probes did not pass"
        assert "round failed" not in logged() and procs[0].poll() is None
    finally:
        for p in reversed(procs):
            terminate(p)
    r = linux.run("status", "--os", "linux", check=False)
    assert r.returncode == 1 and "FAIL  pacsd does not answer" in r.stdout


# --- macOS ------------------------------------------------------------------------------------

def check_plist(staged: Staged, path: str, label: str, user: str | None) -> dict:
    raw = staged.path(path).read_bytes()
    assert raw.startswith(b"<?xml") and b"<!DOCTYPE plist" in raw
    p = plistlib.loads(raw)
    types = {"Label": str, "ProgramArguments": list, "RunAtLoad": bool, "KeepAlive": bool,
             "ThrottleInterval": int, "ExitTimeOut": int, "StandardOutPath": str,
             "StandardErrorPath": str, "EnvironmentVariables": dict}
    for key, kind in types.items():
        assert isinstance(p[key], kind), (key, p.get(key))
    assert p["Label"] == label == Path(path).stem
    assert p["RunAtLoad"] is True and p["KeepAlive"] is True and p["ThrottleInterval"] >= 10
    args = p["ProgramArguments"]
    assert all(isinstance(a, str) for a in args) and Path(args[0]) == Path(sys.executable)
    assert os.access(args[0], os.X_OK)
    assert staged.path(args[args.index("--config") + 1]).is_file()
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert staged.path(str(Path(p[key]).parent)).is_dir(), key
    if "WorkingDirectory" in p:
        assert staged.path(p["WorkingDirectory"]).is_dir()
    assert p.get("UserName") == user and p.get("GroupName") == user
    return p


def test_macos_daemon_apply(mac: Staged) -> None:
    r = mac.apply("--os", "macos")
    calls = mac.changes()
    uid = mac.state()["users"]["_pacsd"]["uid"]
    assert 250 < uid < 500   # a hidden system account, not the ID _www already has
    assert ["dscl", ".", "-create", "/Users/_pacsd", "UniqueID", str(uid)] in calls
    assert ["dscl", ".", "-create", "/Users/_pacsd", "IsHidden", "1"] in calls
    assert ["pmset", "-a", "autorestart", "1", "sleep", "0"] in calls
    assert ["systemsetup", "-setrestartpowerfailure", "on"] in calls
    tail = calls[-4:]
    assert tail == [
        ["launchctl", "enable", "system/org.pacsd.server"],
        ["launchctl", "bootstrap", "system", "/Library/LaunchDaemons/org.pacsd.server.plist"],
        ["launchctl", "enable", "system/org.pacsd.watchdog"],
        ["launchctl", "bootstrap", "system", "/Library/LaunchDaemons/org.pacsd.watchdog.plist"]]
    assert not any(c[0] == "defaults" for c in calls)   # no auto-login in daemon mode
    assert not mac.path("/etc/kcpassword").exists()
    server = check_plist(mac, "/Library/LaunchDaemons/org.pacsd.server.plist",
                         "org.pacsd.server", "_pacsd")
    assert server["ProgramArguments"][1:4] == ["-m", "pacsd", "serve"]
    watchdog = check_plist(mac, "/Library/LaunchDaemons/org.pacsd.watchdog.plist",
                           "org.pacsd.watchdog", "_pacsd")
    assert watchdog["ProgramArguments"][1:3] == ["-m", "pacsd_watchdog"]
    assert mac.path("/Users/Shared/pacsd").stat().st_uid == uid
    assert "ok    restart after a power failure" in r.stdout
    assert "ok    system sleep off" in r.stdout
    before = mac.snapshot()
    again = mac.apply("--os", "macos")
    assert "nothing to change" in again.stdout
    assert mac.changes() == [] and mac.snapshot() == before
    status = mac.run("status", "--os", "macos", check=False)
    assert "ok    org.pacsd.server is loaded" in status.stdout
    assert "ok    org.pacsd.watchdog is loaded" in status.stdout
    assert status.returncode == 1 and "FAIL  pacsd does not answer" in status.stdout


def test_macos_daemon_auto_login_only_when_asked(mac: Staged, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("password\n")
    mac.apply("--os", "macos", "--auto-login", "alice", "--auto-login-password-file", str(pw))
    calls = mac.changes()
    loginwindow = str(mac.path("/Library/Preferences/com.apple.loginwindow"))
    assert ["defaults", "write", loginwindow, "autoLoginUser", "-string", "alice"] in calls
    assert kcpassword.decode(mac.path("/etc/kcpassword").read_bytes()) == "password"
    # Still a daemon of its own user: the log-in is for the person, not for pacsd.
    check_plist(mac, "/Library/LaunchDaemons/org.pacsd.server.plist", "org.pacsd.server",
                "_pacsd")


def test_macos_agent_mode_logs_the_user_in(mac: Staged, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("password\n")
    r = mac.apply("--os", "macos", "--mode", "agent", "--user", "alice",
                  "--auto-login-password-file", str(pw))
    calls = mac.changes()
    agents = "/Users/alice/Library/LaunchAgents"
    p = check_plist(mac, f"{agents}/org.pacsd.server.plist", "org.pacsd.server", None)
    assert p["LimitLoadToSessionType"] == "Aqua"
    check_plist(mac, f"{agents}/org.pacsd.watchdog.plist", "org.pacsd.watchdog", None)
    assert mac.path(f"{agents}/org.pacsd.server.plist").stat().st_uid == 501
    # The published encoding of "password" (see test_kcpassword_known_vectors).
    kc = mac.path("/etc/kcpassword")
    assert kc.read_bytes().hex() == "0de82150a5d3af8ea3b91f7d"
    assert kc.stat().st_mode & 0o777 == 0o600 and kc.stat().st_uid == 0
    loginwindow = str(mac.path("/Library/Preferences/com.apple.loginwindow"))
    assert ["defaults", "write", loginwindow, "autoLoginUser", "-string", "alice"] in calls
    assert ["launchctl", "bootstrap", "gui/501", f"{agents}/org.pacsd.server.plist"] in calls
    assert not any(c[:3] == ["dscl", ".", "-create"] for c in calls)   # a person, not created
    assert "ok    automatic log-in of alice" in r.stdout
    assert "ok    /etc/kcpassword holds that user's password" in r.stdout
    again = mac.apply("--os", "macos", "--auto-login-password-file", str(pw))
    assert "nothing to change" in again.stdout and mac.changes() == []
    # Uninstall: jobs stopped, automatic log-in undone, images kept.
    mac.run("uninstall", "--os", "macos")
    calls = mac.changes()
    assert ["launchctl", "bootout", "gui/501/org.pacsd.watchdog"] in calls
    assert ["defaults", "delete", loginwindow, "autoLoginUser"] in calls
    assert not kc.exists() and not mac.path(f"{agents}/org.pacsd.server.plist").exists()
    assert mac.path("/Users/Shared/pacsd").is_dir()


def test_macos_filevault_wrong_password_and_absent_session(mac: Staged, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("not-alices\n")
    wrong = mac.apply("--os", "macos", "--mode", "agent", "--user", "alice",
                      "--auto-login-password-file", str(pw), check=False)
    assert wrong.returncode == 1 and "not the password of alice" in wrong.stderr
    assert mac.changes() == [] and list(mac.root.iterdir()) == []
    state = mac.state()
    state.update(filevault=True, logged_in=[])
    (mac.box / "state.json").write_text(json.dumps(state))
    pw.write_text("password\n")
    r = mac.apply("--os", "macos", "--mode", "agent", "--user", "alice",
                  "--auto-login-password-file", str(pw), check=False)
    assert r.returncode == 1, r.stdout   # applied, but automatic log-in cannot take
    assert "WARNING: FileVault is on" in r.stdout
    assert "FAIL  FileVault is off" in r.stdout
    assert "starts pacsd at the next log-in" in r.stdout
    assert not any(c[:2] == ["launchctl", "bootstrap"] for c in mac.changes())


def test_kcpassword_known_vectors() -> None:
    """Vectors made with Joel Bruner's published setAutoLogin encoder (MIT; pads to a multiple
    of 12, a whole 12 more when already one), plus the first bytes of the example in
    mb4n6/Decrypt-macOS-Autologin ('A' -> 0x3C, 'a' -> 0xE8)."""
    vectors = {"password": "0de82150a5d3af8ea3b91f7d", "": "7d895223d2bcddeaa3b91f7d",
               "a": "1c895223d2bcddeaa3b91f7d",
               "abcdefghijkl": "1ceb3147b7daba82cad37411895223d2bcddeaa3b91f7d89",
               "Pacs-Admin-2026!": "2de83150fffdb987cad7324fb96015f3bcddeaa3b91f7d89"}
    for password, hexed in vectors.items():
        assert kcpassword.encode(password).hex() == hexed, password
        assert kcpassword.decode(bytes.fromhex(hexed)) == password
    assert kcpassword.encode("Aa")[:2] == bytes((0x3C, 0xE8))


# --- refusals ---------------------------------------------------------------------------------

def test_refusals_change_nothing(mac: Staged, linux: Staged) -> None:
    cases = [
        (linux, ["--os", "freebsd"], "unsupported OS 'freebsd'"),
        (mac, ["--os", "macos", "--data", "/Volumes/PACS/images"],
         "/Volumes/PACS is not a mounted volume"),
        (linux, ["--os", "linux", "--min-free-gb", "1e9"], "GB free for /var/lib/pacsd"),
        (linux, ["--os", "linux", "--data", "/var/lib/my pacs"], "systemd unit files split"),
        (linux, ["--os", "linux", "--mode", "agent"], "agent mode is for macOS"),
        (mac, ["--os", "macos", "--mode", "agent", "--user", "nobody-here"],
         "no user 'nobody-here'"),
    ]
    for staged, args, message in cases:
        r = staged.apply(*args, check=False)
        assert r.returncode == 1 and message in r.stderr, (args, r.stdout, r.stderr)
        assert staged.changes() == [] and list(staged.root.iterdir()) == [], args


def test_port_taken_is_refused(linux: Staged) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = linux.run("apply", "--os", "linux", "--dicom-port", str(port), "--http-port",
                      str(linux.http_port), check=False)
    assert r.returncode == 1 and f"DICOM port {port} is taken" in r.stderr, r.stderr
    assert linux.changes() == [] and list(linux.root.iterdir()) == []


def test_plan_shows_a_busy_port_as_a_warning(linux: Staged) -> None:
    """plan shows the whole plan whatever the ports (the conflict as a warning, exit 0), and
    looks at them without binding them; apply still refuses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = linux.run("plan", "--os", "linux", "--dicom-port", str(port), "--http-port",
                      str(linux.http_port))
    assert "systemctl start pacsd.service pacsd-watchdog.service" in r.stdout, r.stdout
    warnings = [line for line in r.stdout.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f"DICOM port {port} is taken" in warnings[0], r.stdout
    assert "apply would refuse" in warnings[0] and r.stderr == "", r.stderr
    assert list(linux.root.iterdir()) == [] and linux.changes() == []


def test_install_sh_plan_builds_no_environment(linux: Staged, tmp_path: Path) -> None:
    """`install.sh plan` prints the plan from the clone, with the system's Python: no venv
    made in the prefix, nothing installed, nothing written."""
    prefix = tmp_path / "prefix"
    root = Path(__file__).parent.parent
    env = {"PATH": f"{linux.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(linux.root),
           "PACSD_PREFIX": str(prefix)}
    r = subprocess.run(["sh", str(root / "installer" / "install.sh"), "plan", "--os", "linux",
                        "--root", str(linux.root), "--dicom-port", str(linux.dicom_port),
                        "--http-port", str(linux.http_port)], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "apply would make these changes" in r.stdout and "write /etc/pacsd/pacsd.toml" in \
        r.stdout, r.stdout
    assert not prefix.exists()
    assert list(linux.root.iterdir()) == [] and linux.changes() == []
    assert "The web pages' administrator" not in r.stdout   # a plan makes no password


def test_not_root_is_refused(linux: Staged) -> None:
    """The real effective UID of nobody: modules are imported first, as root, because this
    machine's Python lives in /root, which nobody may read."""
    code = ("import os, sys; import pacsd_installer.cli as c; os.setgid(65534); "
            "os.setuid(65534); sys.exit(c.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "apply", "--os", "linux", "--root",
                        str(linux.root)], capture_output=True, text=True, timeout=60,
                       env={"PATH": str(linux.bin)}, check=False)
    assert r.returncode == 1 and "must run as root" in r.stderr, r.stderr
    assert list(linux.root.iterdir()) == []


def test_python_closed_to_the_service_user_is_named(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "bin").mkdir(parents=True)
    (closed / "bin" / "python3").write_text("")
    closed.chmod(0o700)
    why = python_readable_by_others(str(closed / "bin" / "python3"))
    assert why and str(closed) in why and "/opt/pacsd" in why
    # Open all the way down (this checkout too, as in CI under /work): nothing to say.
    assert python_readable_by_others("/usr/bin/env") is None
