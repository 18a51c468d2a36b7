#!/usr/bin/env python3
"""Scale benchmark: pacsd with an index of a million instances (issue 8), on SQLite and on
PostgreSQL side by side (issue 9).

Not a test (pytest never collects it). Run it from the repository with the project's venv:

    .venv/bin/python benchmarks/scale.py                        # 1,000,000 instances, both
    .venv/bin/python benchmarks/scale.py --backend sqlite       # SQLite only (issue 8's run)
    .venv/bin/python benchmarks/scale.py --instances 10000000   # the long form
    .venv/bin/python benchmarks/scale.py --instances 20000 --runs 5 --store-runs 1  # a quick look
    .venv/bin/python benchmarks/scale.py --json scale.json --keep
    .venv/bin/python benchmarks/scale.py --fill-only            # build (or find) the index, print
                                                                # its size and sample keys, stop

What it does (127.0.0.1 only; DCMTK clients with TCP_NODELAY=1), on each --backend:
  fill      a pacsd index (the schema pacsd itself creates: `Index(url).open()`) filled with
            --instances rows, generated directly (no files): tens of thousands of patients with
            surnames from a frequency list (so `SMI*` matches a realistic share), ten years of
            studies in date order, a mix of modalities (CR/DX/MG of 1-4 images, US, XA, NM, CT
            and MR of hundreds, PET/CT), counters and ModalitiesInStudy consistent with the rows.
            Raw sqlite3, pacsd's indexes dropped during the fill and re-created from their own
            SQL afterwards; no ANALYZE (pacsd never runs it). Cached in --workdir (default
            <repo>/bench-data, git-ignored), keyed on the parameters and on pacsd's schema, so a
            re-run skips the fill. Prints the fill time and the size on disk.
  PostgreSQL  a throw-away cluster (tests/postgres.py) in --workdir, durable like production
            (fsync, synchronous_commit, full_page_writes on; shared_buffers 1GB, see DURABLE
            there), started for the run and deleted after it. The same rows are loaded into it
            from the SQLite fill by `pacsd index copy --to URL` (--pg-load copy: COPY, indexes
            built afterwards), then VACUUM ANALYZE and CHECKPOINT (what autovacuum and the
            checkpointer soon do on a live server). Each pacsd gets its own copy of that
            database (CREATE DATABASE ... TEMPLATE) or a new empty one; the size is
            pg_database_size.
  start-up  `pacsd serve` (ports 0) from process start until <data>/pacsd.json names it: on a
            copy of the big index, and on an empty index
  queries   median and p95 over --runs of: C-FIND with DCMTK `findscu -S` (process start and
            association included), the same with pynetdicom on one open association, and
            QIDO-RS on one keep-alive HTTP session: STUDY level by PatientID, by PatientName
            `SMI*`, by a one-month StudyDate range, by AccessionNumber, by that month and
            ModalitiesInStudy=CT (a worklist), by PatientID and ModalitiesInStudy=CT\\MR (a
            viewer's priors); SERIES level of one study; IMAGE level of one series. Every
            answer's number of matches is checked against what the generator put in. Also
            /status (Index.counts: the index's totals row, kept by the writer), the admin
            page's /api/status and `pacsd status`.
  C-STORE   --store-images 512x512 CT images (tests/data.py, cached) with one `storescu`
            association into a fresh copy of the big index and into an empty archive,
            interleaved, --store-runs of each; median throughput and the ratio big / empty.

One table, a column per backend. Every subprocess is stopped at exit (Ctrl-C included), the
PostgreSQL cluster too; run folders are removed unless --keep.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 3
PACSD_AET = "PACSD"

from harness import (
    LOCAL,
    PROCS,
    REPO,
    BenchError,
    MiB,
    Pacsd,
    grid,
    keep_postgres_log,
    postgres_cluster,
    postgres_module,
    reporter,
    run_bench,
    run_client,
    say,
    tool,
)

sys.path.insert(0, str(REPO))
from pacsd.index import counters  # noqa: E402 - the repository's pacsd, as the fill's schema
from pacsd.index.models import search_key  # noqa: E402


# --- the generator ----------------------------------------------------------------------------

# US census 2010 surnames, occurrences per 100,000 (the top 50): a realistic head; the rest of
# the names come from syllables (a long tail of rarer names).
SURNAMES = [
    ("SMITH", 828), ("JOHNSON", 655), ("WILLIAMS", 550), ("BROWN", 487), ("JONES", 483),
    ("GARCIA", 395), ("MILLER", 387), ("DAVIS", 382), ("RODRIGUEZ", 350), ("MARTINEZ", 340),
    ("HERNANDEZ", 315), ("LOPEZ", 250), ("GONZALEZ", 241), ("WILSON", 240), ("ANDERSON", 238),
    ("THOMAS", 230), ("TAYLOR", 228), ("MOORE", 217), ("JACKSON", 215), ("MARTIN", 213),
    ("LEE", 209), ("PEREZ", 199), ("THOMPSON", 198), ("WHITE", 197), ("HARRIS", 187),
    ("SANCHEZ", 183), ("CLARK", 174), ("RAMIREZ", 168), ("LEWIS", 168), ("ROBINSON", 166),
    ("WALKER", 164), ("YOUNG", 155), ("ALLEN", 154), ("KING", 153), ("WRIGHT", 152),
    ("SCOTT", 142), ("TORRES", 141), ("NGUYEN", 140), ("HILL", 139), ("FLORES", 137),
    ("GREEN", 135), ("ADAMS", 133), ("NELSON", 132), ("BAKER", 131), ("HALL", 126),
    ("RIVERA", 125), ("CAMPBELL", 121), ("MITCHELL", 120), ("CARTER", 118), ("ROBERTS", 117),
    ("SMILEY", 4), ("SMIRNOV", 3), ("SMITHSON", 2),
]
HEAD_SHARE = 0.12   # of patients named from the list above (it covers ~12% of the US)
SYLLABLES = ["AB", "AL", "AN", "AR", "BA", "BER", "BO", "CA", "CHEN", "DA", "DEL", "DO", "EL",
             "ER", "FA", "FER", "GA", "GO", "HA", "HOL", "IN", "KA", "KO", "LA", "LIN", "LO",
             "MA", "MEN", "MO", "NA", "NI", "NO", "OR", "PA", "PE", "RA", "RI", "RO", "SA",
             "SEN", "SO", "TA", "TER", "TO", "VA", "VI", "WA", "WEN", "YA", "ZA"]
GIVEN_F = ["MARY", "PATRICIA", "JENNIFER", "LINDA", "ELIZABETH", "BARBARA", "SUSAN", "JESSICA",
           "SARAH", "KAREN", "NANCY", "LISA", "BETTY", "MARGARET", "SANDRA", "ASHLEY", "EMILY",
           "DONNA", "MICHELLE", "CAROL", "AMANDA", "MELISSA", "DEBORAH", "STEPHANIE", "ANNA"]
GIVEN_M = ["JAMES", "JOHN", "ROBERT", "MICHAEL", "WILLIAM", "DAVID", "RICHARD", "JOSEPH",
           "THOMAS", "CHARLES", "CHRISTOPHER", "DANIEL", "MATTHEW", "ANTHONY", "MARK", "DONALD",
           "STEVEN", "PAUL", "ANDREW", "JOSHUA", "KENNETH", "KEVIN", "BRIAN", "GEORGE", "EDWARD"]
PHYSICIANS = [f"{s}^{g}" for s, g in (("HOUSE", "GREGORY"), ("GREY", "MEREDITH"),
                                      ("KILDARE", "JAMES"), ("QUINN", "MICHAELA"),
                                      ("ROSS", "DOUG"), ("CARTER", "JOHN"), ("WELBY", "MARCUS"),
                                      ("SHEPHERD", "DEREK"), ("YANG", "CRISTINA"))]
INSTITUTIONS = ["GENERAL HOSPITAL", "ST MARY CLINIC", "NORTH IMAGING CENTER"]
CT_SOP, MR_SOP = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE, JPEG_LOSSLESS = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70"
UID_ROOT = "1.2.826.0.1.3680043.8.498"   # pydicom's UID root

# modality: (weight, sop class, rows, columns, bytes per image, transfer syntax, body parts,
#            study description)
KINDS: dict[str, tuple] = {
    "CR": (30, "1.2.840.10008.5.1.4.1.1.1", 2500, 2048, 6_500_000, JPEG_LOSSLESS,
           ["CHEST", "HAND", "KNEE", "SPINE", "PELVIS"], "XR"),
    "DX": (8, "1.2.840.10008.5.1.4.1.1.1.1", 3000, 2500, 9_000_000, JPEG_LOSSLESS,
           ["CHEST", "FOOT", "SHOULDER"], "DX"),
    "MG": (7, "1.2.840.10008.5.1.4.1.1.1.2", 3328, 2560, 12_000_000, JPEG_LOSSLESS,
           ["BREAST"], "MAMMO SCREENING"),
    "US": (15, "1.2.840.10008.5.1.4.1.1.6.1", 600, 800, 1_440_000, EXPLICIT_LE,
           ["ABDOMEN", "THYROID", "PELVIS"], "US"),
    "XA": (3, "1.2.840.10008.5.1.4.1.1.12.1", 512, 512, 524_600, EXPLICIT_LE,
           ["HEART"], "CORONARY ANGIO"),
    "NM": (2, "1.2.840.10008.5.1.4.1.1.20", 128, 128, 33_000, EXPLICIT_LE,
           ["WHOLEBODY"], "NM BONE SCAN"),
    "CT": (10, CT_SOP, 512, 512, 526_000, EXPLICIT_LE,
           ["HEAD", "CHEST", "ABDOMEN", "PELVIS"], "CT"),
    "MR": (7, MR_SOP, 256, 256, 132_000, EXPLICIT_LE,
           ["BRAIN", "KNEE", "SPINE", "PROSTATE"], "MR"),
    "PT": (1.5, "1.2.840.10008.5.1.4.1.1.128", 200, 200, 81_000, EXPLICIT_LE,
           ["WHOLEBODY"], "PET/CT"),
}
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.22"
FIRST_DAY = (2015, 1, 1)
YEARS = 10


def _days() -> list[str]:
    import datetime
    d0 = datetime.date(*FIRST_DAY)
    end = datetime.date(FIRST_DAY[0] + YEARS, 1, 1)
    return [(d0 + datetime.timedelta(n)).strftime("%Y%m%d") for n in range((end - d0).days)]


def _series_plan(rng: random.Random, modality: str) -> list[tuple[str, int, str]]:
    """(modality, images, description) of each series of one study."""
    r = rng.randint
    if modality in ("CR", "DX"):
        return [(modality, r(1, 2), f"VIEW {i + 1}") for i in range(r(1, 2 if modality == "CR"
                                                                        else 1))]
    if modality == "MG":
        return [("MG", 1, v) for v in ("L CC", "L MLO", "R CC", "R MLO")]
    if modality == "US":
        return [("US", r(5, 40), "US")]
    if modality == "XA":
        return [("XA", r(5, 30), f"RUN {i + 1}") for i in range(r(2, 5))]
    if modality == "NM":
        return [("NM", r(1, 2), "WHOLE BODY") for _ in range(r(1, 3))]
    if modality == "CT":
        plan = [("CT", r(1, 3), "SCOUT")]
        for i in range(r(1, 3)):
            n = r(100, 300) if rng.random() < 0.4 else r(20, 60)
            plan.append(("CT", n, f"AXIAL {i + 1}"))
        if rng.random() < 0.1:
            plan.append(("SR", 1, "DOSE REPORT"))
        return plan
    if modality == "MR":
        return [("MR", r(15, 40), s) for s in
                ("LOCALIZER", "T1 SAG", "T2 AX", "FLAIR", "DWI", "T1 POST", "T2 COR",
                 "SWI")[:r(4, 8)]]
    if modality == "PT":
        return [("CT", r(1, 2), "SCOUT"), ("CT", r(150, 300), "CT AC"),
                ("PT", r(150, 300), "PET AC")]
    raise ValueError(modality)


@dataclass
class Targets:
    """What the queries look for, and how many matches the generator made for each."""

    patient_id: str = ""
    patient_studies: int = 0
    name_prefix: str = "SMI"
    name_studies: int = 0
    month: str = ""              # YYYYMMDD-YYYYMMDD
    month_studies: int = 0
    month_ct_studies: int = 0    # of those, with a CT series (a worklist query)
    patient_ct_mr_studies: int = 0   # the patient's studies with a CT or MR series (priors)
    accession: str = ""
    study_uid: str = ""
    study_series: int = 0
    series_uid: str = ""
    series_images: int = 0


def generate(con: sqlite3.Connection, n_instances: int, seed: int) -> tuple[dict[str, int],
                                                                            Targets]:
    """Insert the rows (patients last: their counters grow as studies are made)."""
    rng = random.Random(seed)
    days = _days()
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    head_names = [s for s, _ in SURNAMES]
    head_weights = [w for _, w in SURNAMES]
    # Patients: [patient_id, name, key, birth, sex, studies, series, instances]
    patients: list[list[Any]] = []
    study_rows: list[tuple] = []
    series_rows: list[tuple] = []
    inst_rows: list[tuple] = []
    study_id = series_id = inst_id = 0
    t = Targets()
    study_patient: list[int] = []     # patient row index per study (for the name count)
    study_dates: list[str] = []
    study_mods: list[list[str]] = []

    def flush(force: bool = False) -> None:
        if study_rows and (force or len(inst_rows) >= 50_000):
            con.executemany(f"INSERT INTO study VALUES ({','.join('?' * 18)})", study_rows)
            study_rows.clear()
        if series_rows and (force or len(inst_rows) >= 50_000):
            con.executemany(f"INSERT INTO series VALUES ({','.join('?' * 12)})", series_rows)
            series_rows.clear()
        if inst_rows and (force or len(inst_rows) >= 50_000):
            con.executemany(f"INSERT INTO instance VALUES ({','.join('?' * 17)})", inst_rows)
            inst_rows.clear()

    def new_patient() -> int:
        n = len(patients) + 1
        sex = "F" if rng.random() < 0.52 else "M"
        if rng.random() < HEAD_SHARE:
            surname = rng.choices(head_names, head_weights)[0]
        else:
            surname = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        given = rng.choice(GIVEN_F if sex == "F" else GIVEN_M)
        name = f"{surname}^{given}"
        if rng.random() < 0.3:
            name += f"^{chr(65 + rng.randrange(26))}"
        key = name
        if rng.random() < 0.3:   # some senders use mixed case; the key is upper case
            name = "^".join(p.capitalize() for p in name.split("^"))
        # A unique 8-digit MRN (a permutation of n).
        pid = f"{(n * 7919 + 1_234_567) % 100_000_000:08d}"
        birth = f"{rng.randint(1925, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        patients.append([pid, name, key, birth, sex, 0, 0, 0])
        return n - 1

    made = 0
    while made < n_instances:
        # Studies come in date order (ids grow with time, as in a real archive), with a few
        # priors imported from other sites out of order.
        day = int(len(days) * made / n_instances)
        if rng.random() < 0.03:
            day = rng.randrange(len(days))
        date = days[min(len(days) - 1, max(0, day + rng.randint(-2, 2)))]
        if patients and rng.random() < 0.25:
            p = rng.randrange(len(patients))
        else:
            p = new_patient()
        modality = rng.choices(kinds, weights)[0]
        plan = _series_plan(rng, modality)
        room = n_instances - made
        trimmed = []
        for m, k, d in plan:   # the last study is cut to make the total exact
            if room <= 0:
                break
            trimmed.append((m, min(k, room), d))
            room -= min(k, room)
        plan = trimmed
        study_id += 1
        suid = f"{UID_ROOT}.{seed}.{study_id}"
        hh, mm = rng.randint(7, 19), rng.randrange(60)
        stime = f"{hh:02d}{mm:02d}{rng.randrange(60):02d}"
        acc = f"A{(study_id * 104_729 + 7) % 1_000_000_000:09d}"
        kind = KINDS[modality]
        body = rng.choice(kind[6])
        desc = f"{kind[7]} {body}"
        pat = patients[p]
        age = f"{max(0, int(date[:4]) - int(pat[3][:4])):03d}Y"
        mods = list(dict.fromkeys(m for m, _, _ in plan))
        n_study = sum(k for _, k, _ in plan)
        created = f"{date[:4]}-{date[4:6]}-{date[6:]} {hh:02d}:{mm:02d}:00"
        physician = rng.choice(PHYSICIANS)   # its key: the name (already upper case)
        study_rows.append((study_id, p + 1, suid, date, stime, acc, str(study_id % 100000),
                           desc, search_key(desc), physician, physician,
                           rng.choice(INSTITUTIONS), age, "ISO_IR 100", "\\".join(mods),
                           len(plan), n_study, created))
        study_patient.append(p)
        study_dates.append(date)
        study_mods.append(mods)
        pat[5] += 1
        pat[6] += len(plan)
        pat[7] += n_study
        station = f"{modality}{rng.randint(1, 3):02d}"
        for s_no, (m, k, d) in enumerate(plan, 1):
            series_id += 1
            seuid = f"{suid}.{s_no}"
            if m == "SR":   # a dose report beside the images
                sop_class, rows, cols, size, ts = SR_SOP, None, None, 4_000, EXPLICIT_LE
            else:
                sop_class, rows, cols, size, ts = KINDS[m][1:6]
            series_rows.append((series_id, study_id, seuid, m, s_no, d, date, stime, body,
                                d, station, k))
            ctime = stime
            for i in range(1, k + 1):
                inst_id += 1
                path = (f"{date[:4]}/{date[4:6]}/{date[6:]}/{inst_id * 2654435761 % 256:02x}/"
                        f"{inst_id:08x}{rng.getrandbits(96):024x}.dcm")
                inst_rows.append((inst_id, series_id, f"{seuid}.{i}", sop_class, i, date,
                                  ctime, 1, None, rows, cols, ts, path, size, station, created,
                                  None))   # content_hash: none, as for files of schema < 4
            if t.series_uid == "" and m == "CT" and k >= 150 and made > n_instances // 2:
                t.study_uid, t.series_uid, t.series_images = suid, seuid, k
        made += n_study
        if t.accession == "" and made > n_instances // 3:
            t.accession = acc
        flush()
    flush(force=True)
    if not t.series_uid:   # a small fill may have no CT series of 150: take the last series
        t.series_uid, t.series_images = seuid, k
        t.study_uid = suid
    t.study_series = con.execute(
        "SELECT number_of_series FROM study WHERE study_instance_uid = ?",
        (t.study_uid,)).fetchone()[0]
    con.executemany(f"INSERT INTO patient VALUES ({','.join('?' * 11)})",
                    [(i + 1, pid, "", name, key, search_key(name, name=True), birth, sex, a, b, c)
                     for i, (pid, name, key, birth, sex, a, b, c) in enumerate(patients)])
    # The index's totals row (what /status reads), as pacsd's writer would have kept it.
    con.execute("DELETE FROM pacsd_totals")
    con.execute("INSERT INTO pacsd_totals (id, patients, studies, series, instances, bytes) "
                + counters.COUNT.replace("SELECT ", "SELECT 1, ", 1))
    # Targets: a patient with several studies, a month in the middle of the ten years.
    multi = [i for i, pt in enumerate(patients) if pt[5] >= 3] or [0]
    tp = multi[len(multi) // 2]
    t.patient_id, t.patient_studies = patients[tp][0], patients[tp][5]
    prefix_patients = {i for i, pt in enumerate(patients) if pt[2].startswith(t.name_prefix)}
    t.name_studies = sum(1 for p in study_patient if p in prefix_patients)
    year = FIRST_DAY[0] + YEARS // 2
    month_lo, month_hi = f"{year}0301", f"{year}0331"
    t.month = f"{month_lo}-{month_hi}"
    t.month_studies = sum(1 for d in study_dates if month_lo <= d <= month_hi)
    t.month_ct_studies = sum(1 for d, m in zip(study_dates, study_mods, strict=True)
                             if month_lo <= d <= month_hi and "CT" in m)
    t.patient_ct_mr_studies = sum(1 for p, m in zip(study_patient, study_mods, strict=True)
                                  if p == tp and ("CT" in m or "MR" in m))
    counts = {"patients": len(patients), "studies": study_id, "series": series_id,
              "instances": inst_id,
              "name_prefix_patients": len(prefix_patients)}
    return counts, t


def _schema_sql(path: Path) -> list[tuple[str, str, str]]:
    """(type, name, sql) of everything in an index as pacsd creates it."""
    con = sqlite3.connect(path)
    try:
        return [tuple(r) for r in con.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")]
    finally:
        con.close()


def _pacsd_empty_index(where: Path | str) -> None:
    """An empty index made by pacsd itself (in a child process: one Index per process): an
    SQLite file, or the tables in the database of a URL."""
    url = where if isinstance(where, str) else f"sqlite:///{where}"
    code = ("import sys; from pacsd.index import Index; "
            "Index(sys.argv[1]).open(writer=False).close()")
    subprocess.run([sys.executable, "-c", code, url], cwd=REPO, check=True, timeout=120)


def disk_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
               if p.exists())


def ensure_index(workdir: Path, n: int, seed: int) -> tuple[Path, dict[str, Any]]:
    """The filled index for these parameters and pacsd's current schema, built if missing."""
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".fill-"))
    try:
        probe = scratch / "schema.sqlite3"
        _pacsd_empty_index(probe)
        schema = _schema_sql(probe)
        digest = hashlib.sha256(json.dumps(schema).encode()).hexdigest()[:12]
        key = {"version": GENERATOR_VERSION, "instances": n, "seed": seed, "schema": digest}
        folder = workdir / f"scale-{n}-s{seed}-{digest}"
        manifest = folder / "manifest.json"
        db = folder / "index.sqlite3"
        try:
            saved = json.loads(manifest.read_text())
            if saved["key"] == key and db.is_file():
                say(f"reusing the filled index {db} ({saved['counts']['instances']:,} instances,"
                    f" filled in {saved['fill_s']:.0f} s)")
                return db, saved
        except (OSError, ValueError, KeyError, TypeError):
            pass
        say(f"filling an index with {n:,} instances in {folder} ...")
        t0 = time.perf_counter()
        work = scratch / "index.sqlite3"
        os.replace(probe, work)
        con = sqlite3.connect(work, isolation_level=None)
        # A benchmark fixture: no durability needed while filling.
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("PRAGMA cache_size=-1000000")   # 1 GB: the index builds sort in memory
        con.execute("PRAGMA temp_store=MEMORY")
        indexes = [(name, sql) for kind, name, sql in schema
                   if kind == "index" and name.split("_")[0] in
                   ("patient", "study", "series", "instance")]
        for name, _ in indexes:   # built once at the end (a sort) instead of row by row
            con.execute(f'DROP INDEX "{name}"')
        con.execute("BEGIN")
        counts, targets = generate(con, n, seed)
        con.execute("COMMIT")
        t_rows = time.perf_counter() - t0
        say(f"rows inserted in {t_rows:.1f} s; building {len(indexes)} indexes ...")
        for name, sql in indexes:
            con.execute(sql)
        con.execute("PRAGMA journal_mode=WAL")   # what pacsd's own index is in
        con.close()
        if _schema_sql(work) != schema:
            raise BenchError("the filled index does not have pacsd's schema")
        fill_s = time.perf_counter() - t0
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        os.replace(work, db)
        info = {"key": key, "counts": counts, "targets": targets.__dict__,
                "fill_s": round(fill_s, 1), "rows_s": round(t_rows, 1),
                "index_bytes": disk_size(db)}
        manifest.write_text(json.dumps(info, indent=1) + "\n")
        say(f"filled in {fill_s:.1f} s ({n / fill_s:,.0f} instances/s): {counts}; "
            f"{disk_size(db) / MiB:,.0f} MiB on disk")
        return db, info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the same rows in PostgreSQL -----------------------------------------------------------------

DICOM_TABLES = ("patient", "study", "series", "instance")   # parents first (foreign keys)


def _pg_schema(conn: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(name, definition) of the secondary indexes of the DICOM tables (those not behind a
    primary key or a constraint), and (table, name, definition) of their foreign keys."""
    indexes = conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
        " WHERE t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)"
        " ORDER BY c.relname", (list(DICOM_TABLES),)).fetchall()
    fks = conn.execute(
        "SELECT t.relname, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint k"
        " JOIN pg_class t ON t.oid = k.conrelid WHERE k.contype = 'f'"
        " AND t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace"
        " ORDER BY t.relname, k.conname", (list(DICOM_TABLES),)).fetchall()
    return [tuple(r) for r in indexes], [tuple(r) for r in fks]


def copy_rows(db: Path, url: str) -> None:
    """The rows of the SQLite index `db` into the database `url`, which holds pacsd's empty
    schema: COPY with the secondary indexes and foreign keys dropped, then re-created from their
    own definitions, and the id sequences moved past the rows."""
    import psycopg
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SET synchronous_commit = off")   # one commit; durable at CHECKPOINT
            conn.execute("SET maintenance_work_mem = '1GB'")
            indexes, fks = _pg_schema(conn)
            for table, name, _ in fks:
                conn.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{name}"')
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            for table in DICOM_TABLES:
                cols = [r[0] for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                    " AND table_schema = 'public' ORDER BY ordinal_position", (table,))]
                have = [r[1] for r in src.execute(f'PRAGMA table_info("{table}")')]
                if sorted(cols) != sorted(have):
                    raise BenchError(f"table {table}: PostgreSQL has columns {cols}, the SQLite "
                                     f"index {have}")
                names = ", ".join(f'"{c}"' for c in cols)
                with conn.cursor().copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:
                    for row in src.execute(f'SELECT {names} FROM "{table}" ORDER BY id'):
                        copy.write_row(row)
            for _, sql in indexes:
                conn.execute(sql)
            for table, name, sql in fks:
                conn.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {sql}')
            for table in DICOM_TABLES:
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                             f' (SELECT max(id) FROM "{table}"))')
            if _pg_schema(conn) != (indexes, fks):
                raise BenchError("the loaded PostgreSQL index does not have pacsd's schema")
    finally:
        src.close()


def pacsd_index_copy(db: Path, url: str, scratch: Path) -> None:
    """`pacsd index copy --to URL` from a copy of the SQLite index `db` (the cache is never
    opened by pacsd: it would migrate it, or leave a WAL beside it)."""
    data = scratch / "index-copy"
    data.mkdir()
    shutil.copyfile(db, data / "index.sqlite3")
    q = json.dumps
    config = data / "pacsd.toml"
    config.write_text("\n".join([
        "[server]", f"data = {q(str(data))}",
        "[index]", f"url = {q('sqlite:///' + str(data / 'index.sqlite3'))}",
        "[log]", f"file = {q(str(scratch / 'index-copy.log'))}", ""]))
    log = scratch / "index-copy.out"
    try:
        run_client([sys.executable, "-m", "pacsd", "index", "copy", "--to", url, "--config",
                    str(config)], log, timeout=1800)
    except BenchError as e:
        raise BenchError(f"pacsd index copy: {e}\n{log.read_text(errors='replace')[-2000:]}"
                         ) from None
    finally:
        shutil.rmtree(data, ignore_errors=True)


def load_postgres(db: Path, url: str, how: str, scratch: Path) -> float:
    """The filled SQLite index `db` in the empty database `url`; seconds taken.

    how="pacsd": `pacsd index copy` (rows in batches, pacsd's indexes kept up to date row by
    row, as a clinic moving its index would do); how="copy": COPY into the schema that
    `Index(url).open()` makes, indexes built afterwards (faster at tens of millions).
    Then VACUUM ANALYZE and CHECKPOINT, which autovacuum and the checkpointer would soon do on
    a live server: the queries run on settled statistics, and no write-back of the load lands
    inside a measurement."""
    import psycopg
    t0 = time.perf_counter()
    if how == "pacsd":
        pacsd_index_copy(db, url, scratch)
    else:
        _pacsd_empty_index(url)
        copy_rows(db, url)
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - t0


class SqliteIndexes:
    """The big index (a copy of the cached fill for each pacsd) and empty ones, in SQLite."""

    name, title = "sqlite", "SQLite"

    def __init__(self, db: Path) -> None:
        self.db = db

    def big(self) -> dict[str, Any]:
        return {"index": self.db}

    def empty(self) -> dict[str, Any]:
        return {}

    def done(self, where: dict[str, Any]) -> None:
        pass   # the copy is in the pacsd's data folder

    def describe(self) -> dict[str, Any]:
        return {"index_bytes": disk_size(self.db), "version": sqlite3.sqlite_version}


class PostgresIndexes:
    """The big index loaded once into a database of a throw-away durable cluster, and for each
    pacsd a copy of it (CREATE DATABASE ... TEMPLATE, file by file) or a new empty database."""

    name, title = "postgresql", "PostgreSQL"

    def __init__(self, server: Any, db: Path, how: str, scratch: Path) -> None:
        self.pg = postgres_module()
        self.server = server
        with server.admin() as conn:
            self.version = conn.execute("SHOW server_version").fetchone()[0].split()[0]
        self.url = self.pg.create_database(server, "bench_big_")
        self.template = self.url.rsplit("/", 1)[1]
        say(f"loading the index into PostgreSQL {self.version} ({how}) ...")
        self.load_s = load_postgres(db, self.url, how, scratch)
        self.how = how
        say(f"loaded in {self.load_s:.1f} s; {pg_size(server, self.url) / MiB:,.0f} MiB")

    def big(self) -> dict[str, Any]:
        url = self.pg.create_database(self.server, "bench_run_", template=self.template,
                                      strategy="FILE_COPY")
        return {"index_url": url}

    def empty(self) -> dict[str, Any]:
        return {"index_url": self.pg.create_database(self.server, "bench_run_")}

    def done(self, where: dict[str, Any]) -> None:
        self.pg.drop_database(self.server, where["index_url"])

    def describe(self) -> dict[str, Any]:
        return {"index_bytes": pg_size(self.server, self.url), "version": self.version,
                "load": self.how, "load_s": round(self.load_s, 1),
                "settings": self.pg.DURABLE}


def pg_size(server: Any, url: str) -> int:
    name = url.rsplit("/", 1)[1]
    with server.admin() as conn:
        return int(conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0])


def timed_run(cmd: list[str], log: Path, timeout: float = 120.0) -> tuple[float, str]:
    """Wall seconds of one client process (start to exit) and its output (kept in `log`)."""
    seconds = run_client(cmd, log, timeout)
    return seconds, log.read_text(errors="replace")


WRONG: list[str] = []   # answers with a wrong number of matches: reported, not fatal


def wrong(message: str) -> None:
    say(f"WRONG COUNT: {message}")
    WRONG.append(message)


def stats(times: list[float]) -> dict[str, float]:
    """Median and p95 in ms (p95: nearest rank)."""
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, max(0, -(-95 * len(ms) // 100) - 1))]
    return {"median_ms": round(statistics.median(ms), 2), "p95_ms": round(p95, 2),
            "runs": len(ms)}


# --- the queries ------------------------------------------------------------------------------

STUDY_KEYS = ["StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
              "ModalitiesInStudy", "ReferringPhysicianName", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"]
IMAGE_KEYS = ["SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns"]


@dataclass
class Query:
    name: str
    label: str
    level: str
    match: dict[str, str]      # matching keys (Study Root)
    expected: int
    qido: str                  # path and query under the DICOMweb root


def queries(t: Targets) -> list[Query]:
    return [
        Query("patient_id", f"STUDY, PatientID={t.patient_id}", "STUDY",
              {"PatientID": t.patient_id}, t.patient_studies,
              f"/studies?PatientID={t.patient_id}"),
        Query("accession", f"STUDY, AccessionNumber={t.accession}", "STUDY",
              {"AccessionNumber": t.accession}, 1, f"/studies?AccessionNumber={t.accession}"),
        Query("name", f"STUDY, PatientName={t.name_prefix}*", "STUDY",
              {"PatientName": f"{t.name_prefix}*"}, t.name_studies,
              f"/studies?PatientName={t.name_prefix}*"),
        Query("month", f"STUDY, StudyDate={t.month}", "STUDY", {"StudyDate": t.month},
              t.month_studies, f"/studies?StudyDate={t.month}"),
        Query("month_ct", "STUDY, StudyDate=month, ModalitiesInStudy=CT", "STUDY",
              {"StudyDate": t.month, "ModalitiesInStudy": "CT"}, t.month_ct_studies,
              f"/studies?StudyDate={t.month}&ModalitiesInStudy=CT"),
        Query("patient_ct_mr", "STUDY, PatientID, ModalitiesInStudy=CT\\MR", "STUDY",
              {"PatientID": t.patient_id, "ModalitiesInStudy": "CT\\MR"},
              t.patient_ct_mr_studies,
              f"/studies?PatientID={t.patient_id}&ModalitiesInStudy=CT,MR"),
        Query("series", "SERIES of one study", "SERIES", {"StudyInstanceUID": t.study_uid},
              t.study_series, f"/studies/{t.study_uid}/series"),
        Query("images", "IMAGE of one series", "IMAGE",
              {"StudyInstanceUID": t.study_uid, "SeriesInstanceUID": t.series_uid},
              t.series_images, f"/studies/{t.study_uid}/series/{t.series_uid}/instances"),
    ]


def _identifier_keys(q: Query) -> dict[str, str]:
    keys = {k: "" for k in STUDY_KEYS} if q.level == "STUDY" else {}
    if q.level == "SERIES":
        keys = {"StudyInstanceUID": "", **{k: "" for k in SERIES_KEYS}}
    if q.level == "IMAGE":
        keys = {"StudyInstanceUID": "", "SeriesInstanceUID": "", **{k: "" for k in IMAGE_KEYS}}
    keys.update(q.match)
    return keys


def findscu(port: int, q: Query, runs: int, log: Path) -> dict[str, float]:
    cmd = [tool("findscu"), "-v", "-S", "-aet", "BENCH", "-aec", PACSD_AET,
           "-k", f"QueryRetrieveLevel={q.level}"]
    for k, v in _identifier_keys(q).items():
        cmd += ["-k", f"{k}={v}" if v else k]
    cmd += [LOCAL, str(port)]
    times = []
    for _ in range(runs):
        seconds, out = timed_run(cmd, log)
        got = out.count("(Pending)")
        if got != q.expected:
            wrong(f"findscu {q.label}: {got} match(es), expected {q.expected}")
        times.append(seconds)
    return stats(times)


def pynetdicom_find(port: int, qs: list[Query], runs: int) -> dict[str, dict[str, float]]:
    """Each query `runs` times on one open association (the client's own time included)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

    from pacsd.nodes.remote import nodelay  # else each small PDU waits for a delayed ACK

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(LOCAL, port, ae_title=PACSD_AET,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise BenchError("pynetdicom could not associate with pacsd")
    out = {}
    try:
        for q in qs:
            ds = Dataset()
            ds.QueryRetrieveLevel = q.level
            for k, v in _identifier_keys(q).items():
                setattr(ds, k, v or None)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                got = 0
                for status, ident in assoc.send_c_find(ds, FIND):
                    if status and status.Status in (0xFF00, 0xFF01):
                        got += 1
                    elif not status or status.Status != 0:
                        raise BenchError(f"pynetdicom C-FIND {q.label}: status {status}")
                times.append(time.perf_counter() - t0)
                if got != q.expected:
                    wrong(f"pynetdicom C-FIND {q.label}: {got} match(es), expected "
                          f"{q.expected}")
            out[q.name] = stats(times)
    finally:
        assoc.release()
        ae.shutdown()
    return out


def qido(session: Any, base: str, q: Query, runs: int) -> dict[str, float]:
    url = base + "/dicom-web" + q.qido
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = session.get(url, headers={"Accept": "application/dicom+json"}, timeout=60)
        body = r.content
        times.append(time.perf_counter() - t0)
        if r.status_code not in (200, 204):
            raise BenchError(f"QIDO-RS {q.qido}: HTTP {r.status_code} {body[:300]!r}")
        got = len(json.loads(body)) if r.status_code == 200 else 0
        if got != q.expected:
            wrong(f"QIDO-RS {q.qido}: {got} result(s), expected {q.expected}")
    return stats(times)


def http_get(session: Any, url: str, runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = session.get(url, timeout=120)
        _ = r.content
        times.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise BenchError(f"GET {url}: HTTP {r.status_code}")
    return stats(times)


# --- C-STORE ----------------------------------------------------------------------------------

def ensure_images(workdir: Path, n: int) -> Path:
    """`n` CT images of 512x512 (one study, two series) from tests/data.py, cached."""
    sys.path.insert(0, str(REPO / "tests"))
    from data import write_series  # tests/data.py

    per = -(-n // 2)
    folder = workdir / f"scale-ct-{2 * per}x512"
    if (folder / "done").is_file():
        return folder / "images"
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix=".gen-"))
    try:
        say(f"generating {2 * per} CT images of 512x512 in {folder} ...")
        # Seed 8: no UID in common with the generated index (whose UIDs use another root).
        write_series(scratch / "images", seed=8, patients=1, studies=1, series=2, images=per,
                     size=512)
        (scratch / "done").write_text("")
        if folder.exists():
            shutil.rmtree(folder)
        scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / "images"


def store_once(server: Pacsd, images: Path, n: int) -> float:
    os.sync()   # the previous run's (and the index copy's) write-back stays out of this one
    seconds, out = timed_run([tool("storescu"), "-aet", "BENCH", "-aec", PACSD_AET, "+sd", "+r",
                              "+sp", "*.dcm", LOCAL, str(server.port), str(images)],
                             server.log.with_name(f"{server.name}-storescu.log"), timeout=900)
    got = server.stored()
    if got != n:
        raise BenchError(f"pacsd {server.name} stored {got} of {n} images:\n{out[-1500:]}")
    return seconds


# --- the run ----------------------------------------------------------------------------------

def measure(args: argparse.Namespace, run_dir: Path, ix: Any, images: Path,
            t: Targets) -> dict[str, Any]:
    """Every figure on one backend: queries and /status on the big index (and /status on an
    empty one), start-up times, C-STORE into the big and the empty archive, interleaved."""
    import requests
    WRONG.clear()
    n_images = sum(1 for _ in images.glob("*.dcm"))
    startup: dict[str, list[float]] = {"big": [], "empty": []}
    qs = queries(t)
    res: dict[str, Any] = ix.describe()

    def start(name: str, kind: str) -> tuple[Pacsd, dict[str, Any]]:
        where = ix.big() if kind == "big" else ix.empty()
        server = Pacsd(run_dir, f"{ix.name}-{name}", **where)
        try:
            server.start()
        except BaseException:
            server.stop()
            ix.done(where)
            raise
        startup[kind].append(server.startup_s)
        return server, where

    def stop(server: Pacsd, where: dict[str, Any]) -> None:
        server.stop()
        ix.done(where)
        if not args.keep:
            shutil.rmtree(server.data, ignore_errors=True)

    # --- queries on the big index, and /status on both -------------------------------------
    big, big_at = start("query-big", "big")
    try:
        empty, empty_at = start("query-empty", "empty")
        try:
            say(f"{ix.title}: pacsd up on the {args.instances:,}-instance index in "
                f"{big.startup_s:.2f} s; C-FIND with findscu, {args.runs} run(s) per query")
            res["findscu"] = {}
            for q in qs:
                res["findscu"][q.name] = findscu(big.port, q, args.runs,
                                                  run_dir / f"{ix.name}-findscu-{q.name}.log")
            say("C-FIND with pynetdicom on one association")
            res["pynetdicom"] = pynetdicom_find(big.port, qs, args.runs)
            say("QIDO-RS on one keep-alive session")
            res["qido"] = {}
            with requests.Session() as s:
                for server in (big, empty):   # the session's connections are open (and
                    s.get(server.url + "/status", timeout=120)   # the servers' first reads done)
                for q in qs:
                    res["qido"][q.name] = qido(s, big.url, q, args.runs)
                res["status"] = {}
                for label, server in (("big", big), ("empty", empty)):
                    for path in ("/status", "/api/status"):
                        res["status"][f"{path} {label}"] = http_get(s, server.url + path,
                                                                   args.status_runs)
            say("pacsd status (the CLI: its own process, C-ECHO, Index.counts)")
            times = [timed_run([sys.executable, "-m", "pacsd", "status", "--config",
                                str(big.config)], run_dir / f"{ix.name}-pacsd-status.log")[0]
                     for _ in range(args.status_runs)]
            res["status"]["pacsd status big"] = stats(times)
        finally:
            stop(empty, empty_at)
    finally:
        res["log_problems"] = big.log_problems()
        stop(big, big_at)

    # --- C-STORE, interleaved -------------------------------------------------------------
    store: dict[str, list[float]] = {"big": [], "empty": []}
    for r in range(args.store_runs):
        for kind in (("big", "empty") if r % 2 == 0 else ("empty", "big")):
            server, at = start(f"store-{kind}-{r + 1}", kind)
            try:
                say(f"{ix.title}, run {r + 1}/{args.store_runs}: C-STORE {n_images} images "
                    f"into the {kind} archive (started in {server.startup_s:.2f} s)")
                store[kind].append(store_once(server, images, n_images))
            finally:
                for k, v in server.log_problems().items():
                    res["log_problems"][k] += v
                stop(server, at)
    res["store"] = {k: {"images": n_images, "runs_s": [round(x, 3) for x in v],
                        "median_s": round(statistics.median(v), 3),
                        "images_per_s": round(n_images / statistics.median(v), 1)}
                    for k, v in store.items()}
    res["store"]["ratio"] = round(res["store"]["big"]["images_per_s"] /
                                  res["store"]["empty"]["images_per_s"], 3)
    res["wrong_counts"] = list(WRONG)
    res["startup"] = {k: {"runs_s": [round(x, 3) for x in v],
                          "median_s": round(statistics.median(v), 3)} for k, v in startup.items()}
    return res


def bench(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    from pynetdicom import __version__ as pynetdicom_version

    db, info = ensure_index(args.workdir, args.instances, args.seed)
    res: dict[str, Any] = {
        "instances": args.instances, "counts": info["counts"], "targets": info["targets"],
        "fill_s": info["fill_s"], "index_bytes": disk_size(db), "index_path": str(db),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version, "pynetdicom": pynetdicom_version},
        "backends": {}}
    if args.fill_only:
        return res
    images = ensure_images(args.workdir, args.store_images)
    t = Targets(**info["targets"])
    for backend in BACKENDS[args.backend]:
        if backend == "sqlite":
            res["backends"][backend] = measure(args, run_dir, SqliteIndexes(db), images, t)
            continue
        # The cluster's folder sits beside the SQLite index (same disk), not in run_dir (0700:
        # closed to the postgres user); it is deleted when the block ends, Ctrl-C included.
        with postgres_cluster(args.workdir) as server:
            try:
                ix = PostgresIndexes(server, db, args.pg_load, run_dir)
                res["backends"][backend] = measure(args, run_dir, ix, images, t)
            finally:
                PROCS.stop_all()   # no pacsd left connected when the cluster stops
                server_log = keep_postgres_log(server, run_dir / "postgres.log")
            res["backends"][backend]["server_log"] = server_log
    return res


BACKENDS = {"sqlite": ("sqlite",), "postgresql": ("postgresql",),
            "both": ("sqlite", "postgresql")}


def table(res: dict[str, Any]) -> str:
    c, m = res["counts"], res["machine"]
    out = [(f"pacsd at scale: {c['instances']:,} instances, {c['series']:,} series, "
            f"{c['studies']:,} studies, {c['patients']:,} patients (generated in "
            f"{res['fill_s']:.0f} s); {m['cpus']} CPUs, pynetdicom {m['pynetdicom']}"), ""]
    b = res["backends"]
    if not b:
        return "\n".join(out + [f"SQLite index: {res['index_bytes'] / MiB:,.0f} MiB",
                                json.dumps(res["targets"], indent=1)])
    names = list(b)
    titles = tuple({"sqlite": "SQLite", "postgresql": "PostgreSQL"}[n] for n in names)
    t = Targets(**res["targets"])

    def ms(d: dict[str, float]) -> str:
        return f"{d['median_ms']:.1f} / {d['p95_ms']:.1f}"

    def each(f: Any) -> tuple[str, ...]:
        return tuple(f(b[n]) for n in names)

    rows: list[tuple[str, ...]] = []
    for q in queries(t):
        label = q.label if len(q.label) < 48 else q.label[:45] + "..."
        for i, (client, key) in enumerate((("findscu -S", "findscu"),
                                           ("pynetdicom, 1 assoc.", "pynetdicom"),
                                           ("QIDO-RS", "qido"))):
            rows.append((label if i == 0 else "", str(q.expected) if i == 0 else "", client,
                         *each(lambda r, k=key, n=q.name: ms(r[k][n]))))
    runs = b[names[0]]["findscu"]["patient_id"]["runs"]
    out += [(f"Query latency in ms, median / p95 of {runs} runs (findscu: its process and "
             "association included)"),
            *grid(("query (Study Root)", "matches", "client", *titles), rows, 3), ""]
    rows = [(k, *each(lambda r, k=k: ms(r["status"][k]))) for k in b[names[0]]["status"]]
    out += ["Status, ms (median / p95)", *grid(("", *titles), rows, 1), ""]

    def store(kind: str) -> Any:
        return lambda r: f"{r['store'][kind]['images_per_s']:.0f}"

    def startup(kind: str) -> Any:
        return lambda r: f"{r['startup'][kind]['median_s']:.2f}"

    st0 = b[names[0]]["store"]["big"]
    rows = [
        ("index size on disk, MiB", *each(lambda r: f"{r['index_bytes'] / MiB:,.0f}")),
        ("version", *each(lambda r: r["version"])),
        ("loaded in, s", *each(lambda r: f"{r['load_s']:.0f} ({r['load']})" if "load_s" in r
                               else "-")),
        ("start-up with the big index, s", *each(startup("big"))),
        ("start-up empty, s", *each(startup("empty"))),
        ("C-STORE into the big archive, img/s", *each(store("big"))),
        ("C-STORE into an empty archive, img/s", *each(store("empty"))),
        ("ratio big / empty", *each(lambda r: f"{r['store']['ratio']:.2f}")),
        ("pacsd log: warnings / errors / batches retried",
         *each(lambda r: "{warnings} / {errors} / {retried_batches}".format(**r["log_problems"]))),
        ("server log: ERROR / FATAL / deadlocks",
         *each(lambda r: "{errors} / {fatal} / {deadlocks}".format(**r["server_log"])
               if r.get("server_log") else "-")),
    ]
    out += [(f"Index, start-up (median) and C-STORE of {st0['images']} CT 512x512 over one "
             f"storescu association (median of {len(st0['runs_s'])} runs each)"),
            *grid(("", *titles), rows, 1)]
    if "settings" in b.get("postgresql", {}):
        out.append("PostgreSQL: a throw-away cluster on the same disk, " + ", ".join(
            f"{k}={v}" for k, v in b["postgresql"]["settings"].items()))
    for n in names:
        for message, k in collections.Counter(b[n].get("wrong_counts", [])).items():
            out.append(f"WRONG NUMBER OF MATCHES, {n} ({k} run(s)): {message}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1_000_000,
                    help="instances in the filled index (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    ap.add_argument("--runs", type=int, default=30, help="runs of each query (default 30)")
    ap.add_argument("--status-runs", type=int, default=5,
                    help="runs of /status, /api/status and `pacsd status` (default 5)")
    ap.add_argument("--store-runs", type=int, default=5,
                    help="C-STORE runs into each archive, interleaved (default 5)")
    ap.add_argument("--store-images", type=int, default=400,
                    help="CT images per C-STORE run (default 400)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data",
                    help="cache of filled indexes and images, and run folders")
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="both",
                    help="the index pacsd runs on: sqlite, postgresql (a throw-away durable "
                         "cluster) or both, side by side (default both)")
    ap.add_argument("--pg-load", choices=("pacsd", "copy"), default="pacsd",
                    help="how the rows get into PostgreSQL: `pacsd index copy` (default), or "
                         "COPY with the indexes built afterwards (faster)")
    ap.add_argument("--fill-only", action="store_true",
                    help="build (or find) the filled index, print its size, stop")
    ap.add_argument("--keep", action="store_true", help="keep this run's data folders and logs")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = ap.parse_args(argv)
    if not 1_000 <= args.instances <= 100_000_000:
        ap.error("--instances must be 1,000..100,000,000")
    for k in ("runs", "status_runs", "store_runs"):
        if not 1 <= getattr(args, k) <= 1000:
            ap.error(f"--{k.replace('_', '-')} must be 1..1000")
    if not 2 <= args.store_images <= 10_000:
        ap.error("--store-images must be 2..10,000")
    args.workdir = args.workdir.expanduser().absolute()
    if not args.fill_only:
        for name in ("findscu", "storescu"):
            tool(name)

    return run_bench(args.workdir, args.keep, "run-scale", lambda run_dir: bench(args, run_dir),
                     reporter(table, args.json), PROCS.stop_all)


if __name__ == "__main__":
    sys.exit(main())
