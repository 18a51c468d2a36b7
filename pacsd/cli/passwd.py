"""`pacsd passwd`: print a [[users]] entry with a hashed password."""

from __future__ import annotations

import argparse
import sys

from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "print a [[users]] entry with a hashed password"
LOGGING = None
CONFIG = None   # reads no configuration: no --config, --data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the user's log-in name")
    parser.add_argument("--admin", action="store_true",
                        help="an administrator: the admin page (nodes, users, the routing "
                             "queue, recent errors), deleting studies, sending them to nodes")
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from the first line of standard input (also "
                             "when standard input is not a terminal)")


def run(args: argparse.Namespace, cfg: Config | None) -> int:
    import getpass
    from pacsd.web.auth import hash_password
    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("pacsd: the passwords differ", file=sys.stderr)
            return EXIT_FAILURE
    if len(password) < 8:
        print("pacsd: use at least 8 characters", file=sys.stderr)
        return EXIT_FAILURE
    print(f'[[users]]\nname = "{args.name}"\npassword_hash = "{hash_password(password)}"\n'
          f'admin = {"true" if args.admin else "false"}')
    return EXIT_OK
