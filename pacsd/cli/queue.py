"""`pacsd queue`: the routing queue ([[routes]]): list jobs, queue dead ones again, forget."""

from __future__ import annotations

import argparse
import json

from pacsd.cli.common import open_index, positive_int
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "the routing queue: list jobs (default: the dead letters), queue them again, forget them"
LOGGING = "stderr"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "retry", "forget"), default="list",
                        help="list the jobs (default), queue them again, or forget them")
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="job numbers")
    parser.add_argument("--state", choices=("queued", "done", "dead", "all"), default="dead",
                        help="which jobs to list (default dead)")
    parser.add_argument("--dead", action="store_true", help="retry: every dead job")
    parser.add_argument("--limit", type=positive_int, default=200, metavar="N",
                        help="list at most N jobs (default 200)")
    parser.add_argument("--json", action="store_true", help="the counts and jobs as JSON")


def refuse(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, checked before the config is read."""
    if args.action != "list" and not args.ids and not (args.action == "retry" and args.dead):
        return (f"pacsd queue {args.action}: name the job numbers"
                + (" (or --dead)" if args.action == "retry" else ""))
    return None


def run(args: argparse.Namespace, cfg: Config) -> int:
    """The routing queue ([[routes]]): list jobs of a state, queue dead ones again, forget."""
    from pacsd.index.outbox import RouteQueue
    index = open_index(cfg)
    try:
        outbox = RouteQueue(index)
        if args.action == "retry":
            n = outbox.retry(None if args.dead else args.ids)
            print(f"{n} job(s) queued again")
            return EXIT_OK if n or args.dead else EXIT_FAILURE
        if args.action == "forget":
            n = outbox.forget(args.ids)
            print(f"{n} job(s) forgotten")
            return EXIT_OK if n else EXIT_FAILURE
        counts = outbox.counts()
        jobs = outbox.jobs(None if args.state == "all" else args.state, args.limit)
        if args.json:
            print(json.dumps({"counts": counts, "jobs": [j.as_dict() for j in jobs]}, indent=1))
            return EXIT_OK
        print(", ".join(f"{n} {state}" for state, n in counts.items()))
        for j in jobs:
            what = f"{j.study_uid}" + (f" / {j.sop_uid}" if j.sop_uid else "")
            due = "" if j.state != "queued" else \
                (" due now" if j.next_try_in <= 0 else f" next try in {j.next_try_in:.0f} s")
            print(f"#{j.id} {j.state} route {j.route} -> {j.destination}: {what}; "
                  f"{j.attempts} failed tr{'y' if j.attempts == 1 else 'ies'}{due}"
                  + (f"; last error: {j.last_error}" if j.last_error else ""))
        return EXIT_OK
    finally:
        index.close()
