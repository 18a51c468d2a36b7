"""`pacsd retention plan`: what each [[retention]] rule would move to the recycle bin now."""

from __future__ import annotations

import argparse
import json
import sys

from pacsd.cli.common import open_index
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK

HELP = "what the [[retention]] rules would move to the recycle bin, before they are enabled"
LOGGING = "stderr"
SHOWN = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("plan",), help="plan: list what each rule takes now")
    parser.add_argument("--rule", metavar="NAME", help="only this rule")
    parser.add_argument("--json", action="store_true", help="every study, as JSON")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from pacsd.storage.retention import applies, plan
    rules = [r for r in cfg.retention if args.rule in (None, r.name)]
    if not rules:
        print("pacsd: " + (f"no [[retention]] rule named {args.rule!r}" if args.rule else
                           f"no [[retention]] rules in {cfg.source}"), file=sys.stderr)
        return EXIT_FAILURE
    index = open_index(cfg)
    try:
        plans = [(r, plan(index, r)) for r in rules]
    finally:
        index.close()
    if args.json:
        print(json.dumps([{"rule": r.name, "enabled": r.enabled,
                           "applies_now": applies(r, str(cfg.storage_path)), "studies": found}
                          for r, found in plans], indent=1))
        return EXIT_OK
    for rule, found in plans:
        state = "enabled" if rule.enabled else "not enabled (set enabled = true to apply it)"
        now = "" if applies(rule, str(cfg.storage_path)) else \
            f"; free space is above {rule.free_below_percent:g}% now, so it takes nothing yet"
        print(f"rule {rule.name}: {state}{now}")
        print(f"  would move {len(found)} study(ies), "
              f"{sum(int(s['instances'] or 0) for s in found)} instance(s), to the recycle bin "
              f"(received more than {rule.older_than_days} day(s) ago)")
        for s in found[:SHOWN]:
            print(f"  {s['received']} {s['study_instance_uid']} patient {s['patient_id']} "
                  f"{s['patient_name']}, {s['study_date']} {s['modalities']} "
                  f"{s['study_description']!r}, {s['instances']} instance(s)")
        if len(found) > SHOWN:
            print(f"  ... and {len(found) - SHOWN} more (--json lists them all)")
    return EXIT_OK
