#!/usr/bin/env python3
"""Cluster benchmark: the C-STORE rate of two pacsd nodes on one PostgreSQL index and one
storage folder, versus one node (issue 9).

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/cluster.py                    # 1,600 images, K = 4 and 8, 3 runs
    .venv/bin/python benchmarks/cluster.py --studies 4 --series-images 10 --parallel 2,4 \\
        --runs 1                                              # a quick look (~1 min)
    .venv/bin/python benchmarks/cluster.py --split image --json cluster.json --keep

What it does (127.0.0.1 only; DCMTK's storescu with TCP_NODELAY=1):
  images    --studies one-patient studies of 2 series x --series-images 512x512 CT slices
            (tests/data.py, cached in --workdir, default <repo>/bench-data)
  setups    pg-1:     one `pacsd serve` on PostgreSQL
            pg-2:     two `pacsd serve` on the same PostgreSQL database and the same storage
                      folder ([storage] path), each with its own data folder
            sqlite-1: one `pacsd serve` on SQLite (the default), for reference
            PostgreSQL is a throw-away cluster (tests/postgres.py) durable like production:
            fsync, synchronous_commit and full_page_writes on, shared_buffers 1GB.
  a run     a fresh database (a new one on the cluster, or a new SQLite file) and a fresh
            storage folder; the node(s) started (not timed); CHECKPOINT and os.sync(); then K
            storescu associations started together, association i sending to node i mod nodes;
            the time until the last one is done. --split study: each association sends whole
            studies (as modalities do; studies a multiple of K); --split image: the images of
            every study dealt out over the associations (several associations, and with pg-2
            both nodes, write the same study and series at once).
  checks    every storescu exits 0; then, in the index: as many instance rows as images, each
            SOP Instance UID and path once, the files on disk exactly the indexed paths, no
            temporary file left, and the counters (series, study, patient) adding up to the
            images; any difference fails the run.
  figures   median images/s of --runs runs per setup and K (setups interleaved run by run),
            the ratio pg-2 / pg-1, and the CPU seconds the nodes, PostgreSQL and the clients
            used per run (on a 2-core machine two nodes, PostgreSQL and the clients share the
            same 2 cores: the ratio then says more about the overhead of a second node than
            about scaling out).

Every subprocess is stopped at exit (Ctrl-C included), the PostgreSQL cluster too; run folders
are removed unless --keep.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import sys
import time
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

from harness import (
    LOCAL,
    PROCS,
    REPO,
    BenchError,
    MiB,
    Pacsd,
    ensure_data,
    git_state,
    grid,
    keep_postgres_log,
    postgres_cluster,
    postgres_module,
    postmaster_pid,
    reporter,
    run_bench,
    run_clients,
    say,
    tool,
    tree_cpu,
)

SETUPS = {"pg-1": ("postgresql", 1), "pg-2": ("postgresql", 2), "sqlite-1": ("sqlite", 1)}
TITLES = {"pg-1": "PostgreSQL, 1 node", "pg-2": "PostgreSQL, 2 nodes",
          "sqlite-1": "SQLite, 1 node"}


def split(files: list[Path], k: int, how: str) -> list[list[Path]]:
    """The files of each of k associations: whole studies dealt out in turn, or every image."""
    if how == "image":
        return [files[i::k] for i in range(k)]
    studies: dict[str, list[Path]] = {}
    for f in files:   # tests/data.py names files p<patient>s<study>r<series>i<number>.dcm
        studies.setdefault(f.name.split("r", 1)[0], []).append(f)
    groups = [studies[key] for key in sorted(studies)]
    return [[f for g in groups[i::k] for f in g] for i in range(k)]


def expected_counts(files: list[Path]) -> dict[str, int]:
    names = [f.name for f in files]
    return {"instances": len(files),
            "patients": len({n.split("s", 1)[0] for n in names}),
            "studies": len({n.split("r", 1)[0] for n in names}),
            "series": len({n.split("i", 1)[0] for n in names})}


COUNTS_SQL = {
    "instances": "SELECT count(*) FROM instance",
    "distinct_sop_uids": "SELECT count(DISTINCT sop_instance_uid) FROM instance",
    "distinct_paths": "SELECT count(DISTINCT path) FROM instance",
    "patients": "SELECT count(*) FROM patient",
    "studies": "SELECT count(*) FROM study",
    "series": "SELECT count(*) FROM series",
    "series_counters": "SELECT coalesce(sum(number_of_instances), 0) FROM series",
    "study_counters": "SELECT coalesce(sum(number_of_instances), 0) FROM study",
    "patient_counters": "SELECT coalesce(sum(number_of_instances), 0) FROM patient",
    "study_series_counters": "SELECT coalesce(sum(number_of_series), 0) FROM study",
}


def check(conn: Any, storage: Path, want: dict[str, int]) -> None:
    """Every image indexed exactly once, its file where the index says, counters right."""
    got = {k: int(conn.execute(sql).fetchone()[0]) for k, sql in COUNTS_SQL.items()}
    n = want["instances"]
    expect = {"instances": n, "distinct_sop_uids": n, "distinct_paths": n,
              "patients": want["patients"], "studies": want["studies"],
              "series": want["series"], "series_counters": n, "study_counters": n,
              "patient_counters": n, "study_series_counters": want["series"]}
    bad = {k: (got[k], v) for k, v in expect.items() if got[k] != v}
    indexed = {str(r[0]) for r in conn.execute("SELECT path FROM instance").fetchall()}
    on_disk = set()
    for dirpath, dirnames, filenames in os.walk(storage):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        on_disk |= {str((Path(dirpath) / f).relative_to(storage)) for f in filenames
                    if f.endswith(".dcm")}
    if indexed != on_disk:
        bad["files"] = (f"{len(on_disk - indexed)} not indexed",
                        f"{len(indexed - on_disk)} indexed but missing")
    temp = storage / ".tmp"
    left = sum(len(f) for _, _, f in os.walk(temp)) if temp.exists() else 0
    if left:
        bad["temporary files left"] = (left, 0)
    if bad:
        raise BenchError("counts differ (got, expected): " +
                         ", ".join(f"{k} {v}" for k, v in bad.items()))


def one_run(run_dir: Path, tag: str, setup: str, chunks: list[list[Path]],
            want: dict[str, int], server: Any, keep: bool, timeout: float) -> dict[str, Any]:
    """One setup, one K: fresh index and storage, nodes up, K storescu at once, checked."""
    backend, n_nodes = SETUPS[setup]
    pg = postgres_module()
    storage = run_dir / f"{tag}-storage"
    url = pg.create_database(server, "bench_cluster_") if backend == "postgresql" else ""
    nodes = [Pacsd(run_dir, f"{tag}-node{i + 1}", index_url=url, storage=storage)
             for i in range(n_nodes)]
    try:
        for node in nodes:
            node.start(timeout=120)
        if server is not None:
            with server.admin() as conn:
                conn.execute("CHECKPOINT")   # no write-back of earlier runs inside this one
        os.sync()
        pg_pid = postmaster_pid(server) if backend == "postgresql" else None
        cpu0 = ([tree_cpu(node.proc.pid if node.proc else None) for node in nodes],
                tree_cpu(pg_pid), resource.getrusage(resource.RUSAGE_CHILDREN))
        cmds = [[tool("storescu"), "-aet", f"BENCH{i + 1}", "-aec", nodes[i % n_nodes].aet,
                 LOCAL, str(nodes[i % n_nodes].port), *map(str, chunk)]
                for i, chunk in enumerate(chunks)]
        logs = [run_dir / f"{tag}-storescu{i + 1}.log" for i in range(len(chunks))]
        seconds = run_clients(cmds, logs, timeout)
        nodes_cpu = sum(tree_cpu(node.proc.pid if node.proc else None) for node in nodes) - \
            sum(cpu0[0])
        pg_cpu = tree_cpu(pg_pid) - cpu0[1]
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        clients_cpu = (ru.ru_utime + ru.ru_stime) - (cpu0[2].ru_utime + cpu0[2].ru_stime)
        # Each image was indexed before its C-STORE was answered: check with the nodes up.
        if backend == "postgresql":
            import psycopg
            with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
                check(conn, storage, want)
        else:
            db = nodes[0].data / "index.sqlite3"
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
                check(conn, storage, want)
        problems: dict[str, int] = {}
        for node in nodes:
            for k, v in node.log_problems().items():
                problems[k] = problems.get(k, 0) + v
        return {"seconds": round(seconds, 3),
                "images_per_s": round(want["instances"] / seconds, 1),
                "cpu_s": {"nodes": round(nodes_cpu, 2), "postgresql": round(pg_cpu, 2),
                          "clients": round(clients_cpu, 2)},
                "pacsd_log": problems}
    finally:
        for node in nodes:
            node.stop()
        if url:
            pg.drop_database(server, url)
        if not keep:
            shutil.rmtree(storage, ignore_errors=True)
            for node in nodes:
                shutil.rmtree(node.data, ignore_errors=True)


def bench(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    files, _ = ensure_data(args.workdir, patients=args.studies, studies=1, series=2,
                           images=args.series_images, size=512, find_studies=0)
    want = expected_counts(files)
    mb = sum(f.stat().st_size for f in files) / MiB
    res: dict[str, Any] = {
        "images": len(files), "megabytes": round(mb, 1), "studies": want["studies"],
        "split": args.split, "parallel": args.parallel, "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version, "git": git_state()},
        "setups": {s: {} for s in args.setups}}
    needs_pg = any(SETUPS[s][0] == "postgresql" for s in args.setups)
    # The cluster's folder sits in --workdir, on the disk the SQLite runs use (run_dir is 0700:
    # closed to the postgres user); it is deleted when the block ends, Ctrl-C included.
    with postgres_cluster(args.workdir) if needs_pg else nullcontext() as server:
        if server is not None:
            with server.admin() as conn:
                res["machine"]["postgresql"] = \
                    conn.execute("SHOW server_version").fetchone()[0].split()[0]
            res["machine"]["postgresql_settings"] = postgres_module().DURABLE
        try:
            for k in args.parallel:
                chunks = split(files, k, args.split)
                for r in range(args.runs):
                    order = args.setups[r % len(args.setups):] + \
                        args.setups[:r % len(args.setups)]
                    for setup in order:
                        tag = f"k{k}-{setup}-{r + 1}"
                        say(f"K={k}, run {r + 1}/{args.runs}: {TITLES[setup]}, {len(files)} "
                            "images ...")
                        out = one_run(run_dir, tag, setup, chunks, want, server, args.keep,
                                      args.timeout)
                        say(f"  {out['images_per_s']:.0f} img/s ({out['seconds']:.2f} s); CPU s "
                            f"{out['cpu_s']}; pacsd log {out['pacsd_log']}")
                        res["setups"][setup].setdefault(str(k), []).append(out)
        finally:
            PROCS.stop_all()   # no pacsd left connected when the cluster stops
            if server is not None:
                res["postgres_log"] = keep_postgres_log(server, run_dir / "postgres.log")
    for setup, by_k in res["setups"].items():
        for k, runs in by_k.items():
            by_k[k] = {"runs": runs, "median_images_per_s": round(statistics.median(
                r["images_per_s"] for r in runs), 1)}
    if "pg-1" in res["setups"] and "pg-2" in res["setups"]:
        res["ratio_two_to_one"] = {
            str(k): round(res["setups"]["pg-2"][str(k)]["median_images_per_s"] /
                          res["setups"]["pg-1"][str(k)]["median_images_per_s"], 3)
            for k in args.parallel}
    return res


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    ks = [str(k) for k in res["parallel"]]
    how = {"study": "whole studies per association",
           "image": "every study's images dealt out over the associations"}[res["split"]]
    out = [(f"C-STORE of {res['images']} CT 512x512 images ({res['megabytes']:.0f} MB, "
            f"{res['studies']} studies; {how}), K storescu associations at once, median of "
            f"{res['runs']} run(s), images/s"),
           (f"machine: {m['cpus']} CPU cores, Python {m['python']}, SQLite {m['sqlite']}, "
            f"PostgreSQL {m.get('postgresql', '-')}, commit {m['git']['commit']}"
            + (" + uncommitted pacsd changes" if m["git"]["pacsd_modified"] else ""))]
    if "postgresql_settings" in m:
        out.append("PostgreSQL: a throw-away cluster on the same disk, " + ", ".join(
            f"{k}={v}" for k, v in m["postgresql_settings"].items()))
    out.append("")
    head = ("", *(f"K={k}" for k in ks))
    rows: list[tuple[str, ...]] = []
    for setup, by_k in res["setups"].items():
        rows.append((TITLES[setup], *(f"{by_k[k]['median_images_per_s']:.0f}" for k in ks)))
    if "ratio_two_to_one" in res:
        rows.append(("ratio 2 nodes / 1 node", *(f"{res['ratio_two_to_one'][k]:.2f}"
                                                 for k in ks)))
    for setup, by_k in res["setups"].items():
        def cpu(k: str, s: str = setup) -> str:
            runs = res["setups"][s][k]["runs"]
            c = {p: statistics.median(r["cpu_s"][p] for r in runs)
                 for p in ("nodes", "postgresql", "clients")}
            wall = statistics.median(r["seconds"] for r in runs)
            return (f"{c['nodes']:.1f}+{c['postgresql']:.1f}+{c['clients']:.1f} s "
                    f"({sum(c.values()) / wall:.1f} cores)")
        rows.append((f"CPU {setup}: pacsd+PostgreSQL+storescu", *(cpu(k) for k in ks)))
    out += [*grid(head, rows), ""]
    for setup, by_k in res["setups"].items():
        for k in ks:
            runs = by_k[k]["runs"]
            logs = {key: sum(r["pacsd_log"].get(key, 0) for r in runs)
                    for key in ("warnings", "errors", "retried_batches")}
            out.append(f"{setup} K={k}: runs {[r['images_per_s'] for r in runs]} img/s; "
                       f"pacsd log: {logs['warnings']} warning(s), {logs['errors']} error(s), "
                       f"{logs['retried_batches']} batch(es) retried")
    if res.get("postgres_log"):
        p = res["postgres_log"]
        out.append(f"PostgreSQL's log: {p['errors']} ERROR, {p['fatal']} FATAL, "
                   f"{p['deadlocks']} deadlock(s)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=16,
                    help="one-patient studies of 2 series each (default 16)")
    ap.add_argument("--series-images", type=int, default=50,
                    help="512x512 CT images per series (default 50: 1,600 images in all)")
    ap.add_argument("--parallel", default="4,8",
                    help="numbers K of storescu associations at once, comma-separated "
                         "(default 4,8)")
    ap.add_argument("--split", choices=("study", "image"), default="study",
                    help="what each association sends: whole studies (default) or a share of "
                         "every study's images")
    ap.add_argument("--setups", default=",".join(SETUPS),
                    help=f"comma-separated, from {', '.join(SETUPS)} (default all)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each setup and K (default 3)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds one run's clients may take (default 900)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data",
                    help="cache of test images, the PostgreSQL cluster and run folders")
    ap.add_argument("--keep", action="store_true", help="keep this run's data folders and logs")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    try:
        args.parallel = sorted({int(k) for k in args.parallel.split(",")})
    except ValueError:
        ap.error("--parallel: comma-separated whole numbers")
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not args.setups or any(s not in SETUPS for s in args.setups):
        ap.error(f"--setups: from {', '.join(SETUPS)}")
    if not 1 <= args.studies <= 1000 or not 1 <= args.series_images <= 1000:
        ap.error("--studies and --series-images must be 1..1000")
    if not 1 <= args.runs <= 100 or not 1 <= args.timeout <= 7200:
        ap.error("--runs must be 1..100, --timeout 1..7200")
    for k in args.parallel:
        if not 1 <= k <= 64:
            ap.error("--parallel: each K must be 1..64")
        if args.split == "study" and args.studies % k:
            ap.error(f"--split study: --studies ({args.studies}) must be a multiple of each K "
                     f"({k}), so that every association sends as much")
        if args.split == "image" and 2 * args.series_images * args.studies < k:
            ap.error("fewer images than associations")
    args.workdir = args.workdir.expanduser().absolute()
    tool("storescu")

    t0 = time.monotonic()
    rc = run_bench(args.workdir, args.keep, "run-cluster", lambda run_dir: bench(args, run_dir),
                   reporter(table, args.json), PROCS.stop_all)
    say(f"done in {time.monotonic() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
