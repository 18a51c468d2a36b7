#!/usr/bin/env python3
"""The long run of the reliability suite: tests/reliability/ again and again, bigger, and the
figures they add up to.

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/soak.py --minutes 30            # scale 5
    .venv/bin/python benchmarks/soak.py --minutes 5 --scale 2

Each round runs `pytest tests/reliability` with PACSD_SOAK_SCALE (more clients, kills, bad
inputs, longer storms) and PACSD_RELIABILITY_REPORT (each test appends what it measured: see
tests/reliability/report.py). Rounds go on until --minutes have passed (a round that has begun
finishes). Then it prints, summed over every round: associations served, instances stored,
kills survived, bad inputs tried, acknowledged-but-lost (must be 0), and the servers' peak
memory; and per test, its runs and failures. Exit status 1 if any test failed or anything
acknowledged was lost.

Everything runs on 127.0.0.1, as the tests do; every round is bounded by pytest's timeouts and
by --round-timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMMED = ("associations", "stored", "kills", "bad_inputs", "lost")
# Attack figures: the worst of any round (None when no test recorded it).
WORST = {"bomb_peak_rss_mb": ("server peak RSS under bombs", "MB"),
         "health_p99_ms": ("/testdbalive p99 under slow bodies", "ms"),
         "hang_to_kill_s": ("hang (SIGSTOP) to SIGKILL", "s")}


def run_round(n: int, scale: float, report: Path, timeout: float) -> dict[str, str]:
    """One pytest run of the suite; {test id: outcome}."""
    junit = report.with_name(f"round{n}.xml")
    env = {**os.environ, "PACSD_SOAK_SCALE": str(scale),
           "PACSD_RELIABILITY_REPORT": str(report), "PACSD_REQUIRE_PEERS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-o", f"timeout={int(timeout)}", f"--junitxml={junit}", "tests/reliability"]
    try:
        subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"(round)": f"timed out after {timeout:.0f} s"}
    return outcomes(junit)


def outcomes(junit: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET   # our own pytest's report, not input from a peer
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        return {"(round)": f"no report: {e}"}
    out = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        out[name] = "failed" if failed else "skipped" if skipped else "passed"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--scale", type=float, default=5,
                   help="PACSD_SOAK_SCALE: how much bigger than in CI each test runs")
    p.add_argument("--round-timeout", type=float, default=1800)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsd-soak-"))
    report = work / "figures.jsonl"
    runs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    began = time.monotonic()
    end = began + args.minutes * 60
    n = 0
    while time.monotonic() < end and n < 10_000:
        n += 1
        t0 = time.monotonic()
        result = run_round(n, args.scale, report, args.round_timeout)
        for test, outcome in result.items():
            runs[test][outcome] += 1
        bad = [t for t, o in result.items() if o not in ("passed",)]
        print(f"round {n}: {len(result)} tests in {time.monotonic() - t0:.0f} s"
              + (f", NOT PASSED: {', '.join(bad)}" if bad else ", all passed"), flush=True)
    figures = [json.loads(line) for line in report.read_text().splitlines()] \
        if report.exists() else []
    total = {k: sum(f.get(k, 0) for f in figures) for k in SUMMED}
    peak = max((f.get("peak_rss_mb", 0) for f in figures), default=0)
    worst = {k: max((f[k] for f in figures if k in f), default=None) for k in WORST}
    failed = sum(v for r in runs.values() for k, v in r.items() if k != "passed")
    print(f"\nsoak: {n} rounds at scale {args.scale:g} in "
          f"{(time.monotonic() - began) / 60:.1f} min")
    print(f"  associations served      {total['associations']:>10,}")
    print(f"  instances stored         {total['stored']:>10,}")
    print(f"  kills survived (SIGKILL) {total['kills']:>10,}")
    print(f"  bad inputs tried         {total['bad_inputs']:>10,}")
    print(f"  acknowledged but lost    {total['lost']:>10,}   (must be 0)")
    print(f"  server peak RSS          {peak:>10,.0f} MB")
    for key, (label, unit) in WORST.items():
        value = worst[key]
        shown = "not measured" if value is None else f"{value:,.1f} {unit}"
        print(f"  {label:<36} {shown} (worst)")
    print("  per test (runs passed / not passed):")
    for test, r in sorted(runs.items()):
        print(f"    {test:<60} {r.get('passed', 0):>4} / {sum(r.values()) - r.get('passed', 0)}")
    print(f"  figures kept in {report}")
    return 1 if failed or total["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
