"""`pacsd-install plan|apply|uninstall|status`: the entry point.

Exit codes: 0 done (status: all well), 1 refused or failed (the reason on stderr; status: some
check failed), 2 bad usage."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

from pacsd_installer import checks, linux, macos, shared
from pacsd_installer.layout import OSES, Layout, Options, check_os, choose, this_os
from pacsd_installer.system import Host, InstallError, Plan

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _module(os_name: str) -> ModuleType:
    return linux if os_name == "linux" else macos


def _print_plan(plan: Plan, title: str) -> None:
    print(title)
    if not plan.steps:
        print("  nothing to change: it is as asked")
    for n, step in enumerate(plan.steps, 1):
        print(f"  {n:2d}. {step.what}")


def _print_notes(plan: Plan) -> None:
    for note in plan.notes:
        print(f"  note: {note}")
    for warning in plan.warnings:
        print(f"  WARNING: {warning}")


def _health(layout: Layout, host: Host, seconds: float = 60) -> tuple[bool, str]:
    """Does the installed pacsd answer /testdbalive on this machine?"""
    try:
        cfg = shared.read_config(host, layout)
    except InstallError as e:
        return False, str(e)
    url = f"http://127.0.0.1:{cfg.http_port}/testdbalive"
    deadline = time.monotonic() + seconds
    last = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return True, f"pacsd answers {url}"
        except OSError as e:
            last = str(e)
        if time.monotonic() >= deadline:
            return False, f"pacsd does not answer {url} ({last})"
        time.sleep(1)


def _report(lines: list[tuple[bool, str]]) -> bool:
    for ok, text in lines:
        print(f"  {'ok  ' if ok else 'FAIL'}  {text}")
    return all(ok for ok, _ in lines)


def run(opts: Options) -> int:
    host = Host(opts.os, opts.root)
    if opts.action in ("apply", "uninstall"):
        checks.need_root(opts.action)
    layout = choose(host, opts)
    mod = _module(opts.os)
    where = f" into {host.root}" if host.staging else ""
    if opts.action == "status":
        print(f"pacsd on {opts.os} ({layout.mode} mode), config {layout.config}")
        lines = mod.status(host, layout)
        lines.append(_health(layout, host, seconds=0))
        return EXIT_OK if _report(lines) else EXIT_FAILED
    secret = shared.Secret()
    plan = mod.plan_apply(host, layout, opts, secret) if opts.action in ("plan", "apply") \
        else mod.plan_uninstall(host, layout, opts)
    title = f"pacsd-install {opts.action}{where} ({opts.os}, {layout.mode} mode)"
    if opts.action == "plan":
        _print_plan(plan, f"{title}: apply would make these changes")
        _print_notes(plan)
        return EXIT_OK
    print(f"{title}:" if plan.steps else f"{title}: nothing to change, it is as asked")
    for n, step in enumerate(plan.steps, 1):
        try:
            step.do()
        except (InstallError, OSError) as e:
            _reveal(secret, host, layout)   # the config written is kept: so is its password
            raise InstallError(f"step {n} ({step.what}) failed: {e}\nNothing after it was "
                               "done; what was done stays done. Run apply again when mended."
                               if opts.action == "apply" else f"step {n} failed: {e}") from None
        print(f"  {n:2d}. {step.what}: done")
    _print_notes(plan)
    if opts.action == "uninstall":
        return EXIT_OK
    ok = True
    if opts.os == "macos":
        print("checked after apply:")
        ok = _report(macos.verify(host, layout, opts))
    if not host.staging:
        ok &= _report([_health(layout, host)])
    _reveal(secret, host, layout)
    return EXIT_OK if ok else EXIT_FAILED


def _reveal(secret: shared.Secret, host: Host, layout: Layout) -> None:
    """The new administrator password, once, when the config holding its hash was written."""
    if secret.password and host.path(layout.config).exists():
        print(f"\nThe web pages' administrator: user 'admin', password {secret.password}\n"
              "It is shown this once and kept nowhere in clear: write it down now. "
              "Change it with `pacsd passwd admin --admin` and the config file.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pacsd-install",
        description="Set pacsd up as a service that starts at boot and restarts by itself.")
    p.add_argument("action", choices=("plan", "apply", "uninstall", "status"),
                   help="plan: print every change apply would make, and make none (a port in "
                        "use is a warning); apply: make them; uninstall: remove the service "
                        "(images kept unless --purge); status: is it installed and up")
    p.add_argument("--os", default=this_os(),
                   help=f"the target system: {' or '.join(OSES)} (default: this one)")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="write every file under DIR (a staging root); OS commands still run")
    p.add_argument("--mode", choices=("daemon", "agent"),
                   help="macOS: daemon (default; starts at boot, no log-in) or agent (in a "
                        "user's session, with automatic log-in)")
    p.add_argument("--user", help="the account pacsd runs as (default: pacsd / _pacsd; in agent "
                                  "mode the person's account)")
    p.add_argument("--data", metavar="DIR",
                   help="the data folder: images, index, logs (default: the installed one, else "
                        "/var/lib/pacsd on Linux, /Users/Shared/pacsd on macOS)")
    p.add_argument("--aet", default="PACSD", help="the AE title (a new config only)")
    p.add_argument("--dicom-port", type=int, default=11112, metavar="N",
                   help="the DICOM port (a new config only; default 11112)")
    p.add_argument("--http-port", type=int, default=8080, metavar="N",
                   help="the web pages' port (a new config only; default 8080)")
    p.add_argument("--auto-login", metavar="USER",
                   help="log USER in automatically at boot (macOS loginwindow; Linux console)")
    p.add_argument("--auto-login-password-file", type=Path, metavar="FILE",
                   help="macOS: the auto-login user's password, first line of FILE")
    p.add_argument("--purge", action="store_true",
                   help="uninstall: also delete the images, the index, the logs and the config")
    p.add_argument("--min-free-gb", type=float, default=5.0, metavar="GB",
                   help="refuse a data folder with less free space (default 5)")
    return p


def _password(args: argparse.Namespace, os_name: str) -> str | None:
    if os_name != "macos" or args.action not in ("plan", "apply"):
        return None
    if args.auto_login_password_file:
        try:
            return args.auto_login_password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise InstallError(f"cannot read {args.auto_login_password_file}: {e}") from None
    if (args.auto_login or args.mode == "agent") and args.action == "apply" and sys.stdin.isatty():
        return getpass.getpass("password of the user who logs in automatically: ")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        os_name = check_os(args.os)
        opts = Options(action=args.action, os=os_name, root=args.root, mode=args.mode,
                       user=args.user, data=args.data, aet=args.aet, dicom_port=args.dicom_port,
                       http_port=args.http_port, auto_login=args.auto_login,
                       auto_login_password=_password(args, os_name), purge=args.purge,
                       min_free_gb=args.min_free_gb)
        return run(opts)
    except InstallError as e:
        print(f"pacsd-install: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pacsd-install: interrupted; run it again to finish", file=sys.stderr)
        return EXIT_FAILED
