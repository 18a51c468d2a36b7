"""`pacsd` command line: subcommands, exit codes, and the only place that configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pacsd import __version__, logbook
from pacsd import config as config_mod
from pacsd.config import Config
from pacsd.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, IndexUnavailable, PacsError

if TYPE_CHECKING:
    from pacsd.accounts import Accounts
    from pacsd.index import Index

log = logging.getLogger("pacsd")

EXIT_NOT_RUNNING = 3   # `pacsd status`: no server answers (LSB convention)
EXIT_INTERRUPTED = 130   # `pacsd index copy` stopped by Ctrl-C (128 + SIGINT)


def setup_logging(cfg: Config, to_file: bool = True) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path, problem = cfg.log_path, None
    if to_file and path is not None:
        try:
            handlers.append(logbook.rotating_file(path, max_mb=10, backups=5))
        except OSError as e:
            problem = e.strerror
    logbook.log_to(cfg.log_level, handlers)
    if problem:
        log.warning("cannot write the log file %s (%s); logging to standard error only",
                    path, problem)
    # pynetdicom narrates every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if cfg.log_level == "DEBUG"
                                             else logging.WARNING)


def _load(args: argparse.Namespace) -> Config:
    overrides = {f"{s.section}.{s.key}": getattr(args, s.cli.lstrip("-").replace("-", "_"), None)
                 for s in config_mod.SETTINGS if s.cli}
    return config_mod.load(getattr(args, "config", None), overrides=overrides)


# --- subcommands ------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from pacsd.daemon import Server
    cfg = _load(args)
    setup_logging(cfg)
    server = Server(cfg).start()
    server.serve_forever()
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    if args.list:
        print(config_mod.describe())
        return EXIT_OK
    cfg = _load(args)
    if args.check:
        print(f"configuration OK ({cfg.source}): AE {cfg.dicom_aet} on "
              f"{cfg.dicom_bind}:{cfg.dicom_port}, data {cfg.data}, storage {cfg.storage_path}, "
              f"{len(cfg.nodes)} node(s)")
        return EXIT_OK
    for key, value in sorted(vars(cfg).items()):
        if key == "index_url":   # its password never goes to a terminal or a ticket
            from pacsd.index import backends
            value = backends.redacted(value)
        print(f"{key} = {value!r}")
    return EXIT_OK


def _index(cfg: Config) -> "Index":
    """The index, opened without a writer thread, for a one-shot command. A running server may
    hold it: SQLite lets us read (and wait for our turn to write); PostgreSQL does anyway."""
    from pacsd.index import Index
    return Index(cfg.index_url, node=f"cli-{os.getpid()}", pool_size=2,
                 auto_migrate=cfg.index_auto_migrate).open(writer=False)


@contextmanager
def _accounts(cfg: Config) -> Iterator["Accounts"]:
    """Nodes and users of the config file plus those added on the admin page (in the index).
    Opened without a writer: a running server may hold the index; SQLite lets us read."""
    from pacsd.accounts import Accounts
    index = _index(cfg)
    try:
        yield Accounts(cfg, index).open()
    finally:
        index.close()


def cmd_nodes(args: argparse.Namespace) -> int:
    from pacsd.nodes import remote
    cfg = _load(args)
    with _accounts(cfg) as accounts:
        nodes = accounts.nodes()
    if not nodes:
        print("no nodes: add [[nodes]] to the config file or use the admin page")
        return EXIT_OK
    failed = 0
    for n, source in nodes:
        line = f"{n.name:<20} {n.aet:<16} {n.host}:{n.port}  ({source})"
        if args.echo:
            ok, ms, message = remote.echo(cfg, n)
            failed += not ok
            detail = f"{ms:.0f} ms" + ("" if ok else f": {message}")
            line += f"  C-ECHO {'ok' if ok else 'FAILED'} ({detail})"
        print(line)
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_retrieve(args: argparse.Namespace) -> int:
    """C-FIND the studies a node holds that match, then C-MOVE each to our own AE title:
    the running pacsd receives them (the node must list us as a destination)."""
    from pacsd.nodes import remote
    cfg = _load(args)
    logging.basicConfig(level=logging.WARNING, format="pacsd: %(message)s")
    with _accounts(cfg) as accounts:
        node = accounts.node(args.node)
    if node is None:
        print(f"pacsd: no node named {args.node!r} (see `pacsd nodes`)", file=sys.stderr)
        return EXIT_FAILURE
    keys = {"StudyInstanceUID": "\\".join(args.study_uid or []), "PatientName": "",
            "PatientID": "", "StudyDate": "", "AccessionNumber": "", "StudyDescription": "",
            "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}
    for value, key in ((args.patient_name, "PatientName"), (args.patient_id, "PatientID"),
                       (args.date, "StudyDate"), (args.accession, "AccessionNumber"),
                       (args.modality, "ModalitiesInStudy")):
        if value:
            keys[key] = value
    if not any(keys[k] for k in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                                 "AccessionNumber")):
        print("pacsd: say what to retrieve (--patient-id, --patient-name, --date, "
              "--accession or --study-uid)", file=sys.stderr)
        return EXIT_FAILURE
    studies = [m for m in remote.find(cfg, node, "STUDY", keys) if m.get("StudyInstanceUID")]
    print(f"{len(studies)} study(ies) on {node.name} ({node.aet}@{node.host}:{node.port})")
    for m in studies:
        print(f"  {m.get('StudyDate', ''):<8}  {m.get('PatientID', ''):<16} "
              f"{m.get('PatientName', ''):<24} {m.get('AccessionNumber', ''):<12} "
              f"{m.get('StudyDescription', '')}  ({m.get('NumberOfStudyRelatedInstances') or '?'}"
              " instances)")
    if args.list or not studies:
        return EXIT_OK
    failed_studies = 0
    for n, m in enumerate(studies, 1):
        uid = m["StudyInstanceUID"]
        shown = [-1.0]

        def progress(done: int, failed: int, total: int | None) -> None:
            if time.monotonic() - shown[0] >= 1.0:   # a line a second at most
                shown[0] = time.monotonic()
                print(f"  study {n}/{len(studies)}: {done} of {total or '?'} received"
                      + (f", {failed} failed" if failed else ""), flush=True)
        try:
            counts = remote.move_here(cfg, node, {"StudyInstanceUID": uid}, progress=progress)
        except PacsError as e:
            print(f"  study {n}/{len(studies)} {uid}: {e}", file=sys.stderr)
            failed_studies += 1
            continue
        failed_studies += counts["failed"] > 0
        print(f"  study {n}/{len(studies)} {uid}: {counts['completed'] + counts['warning']} "
              f"retrieved, {counts['failed']} failed", flush=True)
    return EXIT_FAILURE if failed_studies else EXIT_OK


def _files(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in sorted(filenames):
                    if not f.startswith("."):
                        yield Path(dirpath) / f
        else:
            yield p


class Progress:
    """A one-line progress bar on a terminal; periodic log lines otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        pct = 100 * done / self.total if self.total else 100
        if self.tty:
            bar = "#" * int(pct / 4)
            sys.stderr.write(f"\r{self.label} [{bar:<25}] {done}/{self.total} {extra}")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            print(f"{self.label}: {done}/{self.total} ({pct:.0f}%) {extra}", file=sys.stderr)


def _archive(cfg: Config):
    from pacsd.imaging import bounds
    from pacsd.storage.archive import Archive
    from pacsd.storage.store import Store
    bounds.configure(bounds.Limits.from_config(cfg))   # import and reindex read headers
    # Temporary files in a folder of their own: a node starting meanwhile cleans only its own.
    store = Store(cfg.storage_path, cfg.storage_min_free_mb, node="cli")
    store.open(clean=False)   # a running server may have temporary files in flight
    return Archive(store, _index(cfg), overwrite=cfg.storage_overwrite,
                   patient_mismatch=cfg.storage_patient_mismatch,
                   on_conflict=cfg.storage_on_conflict)


def cmd_import(args: argparse.Namespace) -> int:
    cfg = _load(args)
    setup_logging(cfg, to_file=False)
    files = list(_files(args.paths))
    archive = _archive(cfg)
    stored = dup = bad = 0
    progress = Progress(len(files), "import")
    try:
        for i, path in enumerate(files, 1):
            try:
                if archive.put_file(path).duplicate:
                    dup += 1
                else:
                    stored += 1
            except PacsError as e:
                bad += 1
                log.warning("%s: not imported: %s", path, e)
            progress(i, f"{dup} duplicate(s), {bad} refused")
    finally:
        archive.index.close()
    print(f"imported {stored} file(s), {dup} duplicate(s), {bad} refused")
    # Failure only when nothing was importable; images already archived (duplicates) count as
    # success, so that running the same import again gives the same answer.
    return EXIT_FAILURE if bad and not (stored or dup) else EXIT_OK


def cmd_reindex(args: argparse.Namespace) -> int:
    from pacsd.daemon import lock_data_folder
    cfg = _load(args)
    setup_logging(cfg, to_file=False)
    fd = lock_data_folder(cfg.data)   # the server must be stopped
    try:
        archive = _archive(cfg)
        try:
            bar = Progress(0, "reindex")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar(done)
            # Several nodes: this one is stopped, and so must the others be (a node storing
            # meanwhile would lose its rows); a running node holds its housekeeping leases.
            others = [(n, h, left) for n, h, left in archive.index.leases() if n != "reindex"]
            if others and not cfg.index_is_sqlite and not args.force:
                name, holder, left = others[0]
                raise PacsError(f"node {holder} still uses this index (it holds lease {name!r} "
                                f"for {left:.0f} s more): stop every pacsd node first, or, if "
                                "it is really gone, wait or use --force")
            if not archive.index.lease("reindex", 24 * 3600):
                raise PacsError("another node is rebuilding this index (lease 'reindex' held by "
                                f"{archive.index.lease_holder('reindex')})")
            try:
                n = archive.reindex(progress)
            finally:
                archive.index.release("reindex")
        finally:
            archive.index.close()
    finally:
        os.close(fd)
    print(f"reindexed {n} instance(s) from {cfg.storage_path}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import psutil
    cfg = _load(args)
    try:
        run = json.loads(cfg.runfile.read_text())
    except (OSError, ValueError):
        run = None
    report: dict = {"version": __version__, "data": str(cfg.data),
                    "storage": str(cfg.storage_path)}
    running = bool(run) and psutil.pid_exists(int(run["pid"]))
    report["running"] = running
    if running:
        host = "127.0.0.1" if run["dicom_bind"] in ("", "0.0.0.0") else run["dicom_bind"]
        from pacsd.nodes import remote
        from pacsd.config import Node
        ok, ms, message = remote.echo(cfg, Node("self", run["aet"], host, int(run["dicom_port"])),
                                       timeout=5.0, tls=remote.self_tls(cfg))
        report.update(pid=run["pid"], aet=run["aet"], dicom_port=run["dicom_port"],
                      uptime_s=round(time.time() - run["started"]),
                      echo=f"ok {ms:.0f} ms" if ok else f"FAILED ({message})")
        running = ok
    if not cfg.index_is_sqlite or cfg.index_path.exists():
        idx = _index(cfg)
        try:
            report["index"] = idx.counts()
        finally:
            idx.close()
    if cfg.storage_path.exists():
        report["disk_free_gb"] = round(shutil.disk_usage(cfg.storage_path).free / 1e9, 1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k:>12}: {v}")
    return EXIT_OK if running else EXIT_NOT_RUNNING


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the index's schema to this pacsd's version (what `serve` does at start-up unless
    [index] auto_migrate = false), or with --status only say where it stands."""
    from pacsd.index import backends
    from pacsd.index import migrations
    from pacsd.index.models import database
    cfg = _load(args)
    setup_logging(cfg, to_file=False)
    db = backends.connect(cfg.index_url, pool_size=2)
    database.initialize(db)
    try:
        with database.connection_context():
            before, todo = migrations.version(db), migrations.pending(db)
            if before > migrations.LATEST:   # refused ("upgrade pacsd"), not "up to date"
                migrations.check(db, cfg.index_label)
            if args.status or not todo:
                state = "up to date" if not todo else \
                    f"{len(todo)} migration(s) to run: " + "; ".join(m.what for m in todo)
                print(f"index {cfg.index_label}: schema {before or 'none'} "
                      f"(this pacsd: {migrations.LATEST}), {state}")
                return EXIT_OK
            for line in migrations.upgrade(db, cfg.index_label):
                print(f"index {cfg.index_label}: {line}")
    except PacsError:
        raise
    except Exception as e:   # the driver's own error: which index, and why
        raise IndexUnavailable(f"cannot migrate index {cfg.index_label}: {e}") from None
    finally:
        if not database.is_closed():
            database.close()
        getattr(db, "close_all", lambda: None)()
        database.initialize(None)
    return EXIT_OK


def cmd_index_copy(args: argparse.Namespace) -> int:
    """Copy the configured index, rows with their ids, into the database `--to` names; then say
    how to switch to it. Resumable; verified by counts (exit 1 if they differ)."""
    from pacsd.index import backends
    from pacsd.daemon import lock_data_folder
    from pacsd.index.copy import IndexCopy
    cfg = _load(args)
    setup_logging(cfg, to_file=False)
    try:
        backends.kind(args.to)
    except ValueError as e:
        print(f"pacsd: --to: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Rows stored while the copy runs would be missed: the source pacsd must be stopped, and
    # must stay stopped (its data folder is locked meanwhile).
    fd = lock_data_folder(cfg.data)
    try:
        with IndexCopy(cfg.index_url, args.to, batch=args.batch,
                       migrate_source=cfg.index_auto_migrate) as copy:
            print(f"copying index {copy.source_label} to {copy.target_label}, in batches of "
                  f"{args.batch} rows; pacsd must stay stopped until it is done", flush=True)
            if not cfg.index_is_sqlite:
                print("  the source is a shared index: stop every pacsd node that uses it, "
                      "not only this one", flush=True)
            for line in copy.prepare():
                print(f"  {line}", flush=True)
            bars: dict[str, Progress] = {}

            def progress(table: str, done: int, total: int, rate: float) -> None:
                bar = bars.setdefault(table, Progress(total, f"  {table:<12}"))
                bar(done, f"{rate:,.0f} rows/s" if rate else "")
            t0 = time.monotonic()
            tables = copy.copy(progress)
            seconds = time.monotonic() - t0
            checks = copy.verify()
    except KeyboardInterrupt:
        print("\npacsd: interrupted; the batches committed so far stay in the target: run the "
              "same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        os.close(fd)
    copied = sum(t.copied for t in tables)
    print(f"copied {copied:,} row(s) in {seconds:.1f} s ({copied / max(seconds, 1e-6):,.0f} "
          "rows/s)")
    for t in tables:
        resumed = f", {t.before:,} there already" if t.before else ""
        print(f"  {t.table:<12} {t.copied:>10,} row(s) in {t.seconds:6.1f} s "
              f"({t.copied / max(t.seconds, 1e-6):>9,.0f} rows/s){resumed}")
    print(f"  {'':<36} {'source':>12} {'target':>12}")
    for c in checks:
        print(f"  {c.what:<36} {c.source:>12,} {c.target:>12,}  {'ok' if c.ok else 'DIFFERENT'}")
    if not all(c.ok for c in checks):
        print(f"pacsd: the copy in {copy.target_label} differs from the source (see above): did "
              "a pacsd use the target meanwhile, or the source change after an interrupted "
              "copy? Empty the target and copy again.", file=sys.stderr)
        return EXIT_FAILURE
    where = cfg.source if cfg.source != "defaults" else "the config file"
    print(f"the copy is complete and verified. Next: in {where} set\n"
          f"  [index]\n  url = \"{backends.redacted(args.to)}\"\n"
          + ("(with the real password in place of ***) " if backends.redacted(args.to) != args.to
             else "")
          + "and start pacsd again; the storage folder stays as it is.")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check each node (or only NODE) and our own listener; plain words, OK / WARN / FAIL."""
    from pacsd import doctor
    cfg = _load(args)
    # pynetdicom narrates rejections and timeouts at ERROR: the findings say it in plain words.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL + 1)
    logging.basicConfig(level=logging.WARNING, format="pacsd: %(message)s")
    notes: list[str] = []
    try:
        with _accounts(cfg) as accounts:
            nodes = accounts.nodes()
            if args.node:
                node = accounts.node(args.node)
                nodes = [(n, s) for n, s in nodes if n == node]
    except PacsError as e:   # the index is unavailable: the config file's nodes still count
        notes.append(f"nodes added on the admin page not checked: {e}")
        nodes = [(n, "config") for n in cfg.nodes]
        if args.node:
            nodes = [(n, s) for n, s in nodes if args.node in (n.name, n.aet)]
    if args.node and not nodes:
        print(f"pacsd: no node named {args.node!r} (see `pacsd nodes`)", file=sys.stderr)
        return EXIT_FAILURE
    me = doctor.here(cfg, args.timeout)
    reports = []
    if not args.json:
        print(doctor.render_here(me), flush=True)
        for note in notes:
            print(f"  WARN  {'nodes':<10} {note}", flush=True)
        if not nodes:
            print("no nodes: add [[nodes]] to the config file or use the admin page")
    for report in doctor.check_all(cfg, nodes, me, args.timeout):
        reports.append(report)
        if not args.json:
            print(doctor.render(report), flush=True)
    failed = [r for r in reports if r.failed]
    here_failed = me.finding is not None and me.finding.level == doctor.FAIL
    if args.json:
        print(json.dumps({"ok": not failed and not here_failed, "aet": cfg.dicom_aet,
                          "listener": me.finding.as_dict() if me.finding else None,
                          "notes": notes, "nodes": [r.as_dict() for r in reports]}, indent=1))
    elif reports:
        print(f"{len(reports)} node(s) checked: {len(reports) - len(failed)} passed"
              + (f", {len(failed)} failed: " + ", ".join(r.node.name for r in failed)
                 if failed else ""))
    return EXIT_FAILURE if failed or here_failed else EXIT_OK


def cmd_queue(args: argparse.Namespace) -> int:
    """The routing queue ([[routes]]): list jobs of a state, queue dead ones again, forget."""
    from pacsd.index.outbox import RouteQueue
    if args.action != "list" and not args.ids and not (args.action == "retry" and args.dead):
        print(f"pacsd queue {args.action}: name the job numbers"
              + (" (or --dead)" if args.action == "retry" else ""), file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(args)
    setup_logging(cfg, to_file=False)
    index = _index(cfg)
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


def cmd_passwd(args: argparse.Namespace) -> int:
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


# --- parser -----------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacsd", description="A lean, set-and-forget PACS server.")
    p.add_argument("--version", action="version", version=f"pacsd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", metavar="FILE", help="TOML configuration file")
        sp.add_argument("--data", metavar="DIR", help="the server's data folder")
        return sp

    s = common(sub.add_parser("serve", help="run the server in the foreground"))
    s.add_argument("--aet", help="AE title")
    s.add_argument("--dicom-port", type=int, metavar="N")
    s.add_argument("--http-port", type=int, metavar="N")
    s.add_argument("--bind", metavar="ADDR", help="address for the DICOM listener")
    s.set_defaults(func=cmd_serve)

    c = common(sub.add_parser("config", help="show or check the configuration"))
    c.add_argument("--check", action="store_true", help="validate and exit 0, or exit 78")
    c.add_argument("--list", action="store_true", help="list every setting")
    c.set_defaults(func=cmd_config)

    n = common(sub.add_parser("nodes", help="list the remote DICOM nodes (config file and "
                                            "admin page)"))
    n.add_argument("--echo", action="store_true", help="C-ECHO each node")
    n.set_defaults(func=cmd_nodes)

    rt = common(sub.add_parser("retrieve", help="query a node and retrieve what matches into "
                                                "the running pacsd (C-FIND, then C-MOVE)"))
    rt.add_argument("node", help="node name or AE title (see `pacsd nodes`)")
    rt.add_argument("--patient-id", metavar="ID")
    rt.add_argument("--patient-name", metavar="NAME", help="DICOM wildcards allowed: DOE*")
    rt.add_argument("--date", metavar="DATE", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    rt.add_argument("--accession", metavar="NUMBER")
    rt.add_argument("--modality", metavar="CODE", help="e.g. CT")
    rt.add_argument("--study-uid", metavar="UID", action="append")
    rt.add_argument("--list", action="store_true", help="only list what matches")
    rt.set_defaults(func=cmd_retrieve)

    i = common(sub.add_parser("import", help="import DICOM files and folders"))
    i.add_argument("paths", nargs="+", metavar="PATH")
    i.set_defaults(func=cmd_import)

    r = common(sub.add_parser("reindex", help="rebuild the index from the stored files "
                                              "(server stopped; every node of a shared index)"))
    r.add_argument("--force", action="store_true",
                   help="rebuild even though another node seems to hold the index (it died "
                        "without giving back its leases)")
    r.set_defaults(func=cmd_reindex)

    mg = common(sub.add_parser("migrate", help="bring the index's schema up to date"))
    mg.add_argument("--status", action="store_true", help="only show the schema version")
    mg.set_defaults(func=cmd_migrate)

    ix = sub.add_parser("index", help="the index database as a whole: copy it to another")
    ixs = ix.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    cp = common(ixs.add_parser(
        "copy", help="copy the index (server stopped) into another database, e.g. PostgreSQL",
        description="Copy the configured index, every row with its id, into the database "
                    "--to names (sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE;"
                    " empty, or holding an interrupted copy), so that a clinic moves to "
                    "PostgreSQL without sending its images again. Stop pacsd first and keep it "
                    "stopped until the copy is done: rows stored meanwhile would be missed (its "
                    "data folder is locked meanwhile; with a PostgreSQL source, stop every node). "
                    "Interrupted (Ctrl-C, kill), the same command carries on where it stopped. "
                    "Verified by counts; then set [index] url to the URL and start pacsd."))
    cp.add_argument("--to", required=True, metavar="URL", help="the target database")
    cp.add_argument("--batch", type=_positive_int, default=5000, metavar="N",
                    help="rows per transaction (default 5000)")
    cp.set_defaults(func=cmd_index_copy)

    qu = common(sub.add_parser("queue", help="the routing queue: list jobs (default: the dead "
                                             "letters), queue them again, forget them"))
    qu.add_argument("action", nargs="?", choices=("list", "retry", "forget"), default="list")
    qu.add_argument("ids", nargs="*", type=int, metavar="ID", help="job numbers")
    qu.add_argument("--state", choices=("queued", "done", "dead", "all"), default="dead",
                    help="which jobs to list (default dead)")
    qu.add_argument("--dead", action="store_true", help="retry: every dead job")
    qu.add_argument("--limit", type=_positive_int, default=200, metavar="N")
    qu.add_argument("--json", action="store_true")
    qu.set_defaults(func=cmd_queue)

    pw = sub.add_parser("passwd", help="print a [[users]] entry with a hashed password")
    pw.add_argument("name")
    pw.add_argument("--admin", action="store_true", help="may delete and send to nodes")
    pw.add_argument("--stdin", action="store_true", help="read the password from stdin")
    pw.set_defaults(func=cmd_passwd)

    st = common(sub.add_parser("status", help="is the server up; what does it hold"))
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    dr = common(sub.add_parser("doctor", help="check the nodes: name, network, AE titles, "
                                              "C-ECHO, the way back to us, what they accept"))
    dr.add_argument("node", nargs="?", help="only this node (name or AE title)")
    dr.add_argument("--json", action="store_true", help="a machine-readable report")
    dr.add_argument("--timeout", type=float, default=5.0, metavar="S",
                    help="seconds each network step may take (default 5)")
    dr.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("aet", "dicom_port", "http_port", "bind"):
        args.__dict__.setdefault(name, None)
    try:
        return int(args.func(args) or 0)
    except PacsError as e:
        print(f"pacsd: {e}", file=sys.stderr)
        logging.getLogger("pacsd").debug("exit %d", e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_OK
