"""The study list API on a large index: how long a page takes with N studies.

Fills a fresh index with N synthetic studies (rows only, written straight through peewee:
the list never opens a file), starts `pacsd serve` on it and times `/api/studies` requests
the page makes: the first page by date, by patient, a name search, a date range, a modality,
an ID, an accession part, a description, and a deep page. Prints the median of 10 per request.

    .venv/bin/python benchmarks/study_list.py [--studies 300000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import requests

from common import pacsd

MODALITIES = ("CT", "MR", "US", "CR", "DX", "MG", "PT")


def fill(data: Path, n: int) -> None:
    from pacsd.index import Index, counters
    from pacsd.index.models import Patient, Series, Study, database, name_key, search_key
    index = Index(f"sqlite:///{data / 'index.sqlite3'}").open(writer=False)
    rnd = random.Random(7)
    patients = max(1, n // 3)
    with database.connection_context():
        with database.atomic():
            for start in range(0, patients, 5000):
                rows = []
                for p in range(start, min(patients, start + 5000)):
                    name = f"PATIENT{p:07d}^GIVEN{p % 97}"
                    rows.append({"patient_id": f"ID{p:08d}", "patient_name": name,
                                 "patient_name_key": name_key(name),
                                 "patient_name_search": search_key(name, name=True),
                                 "patient_birth_date": f"19{40 + p % 60}0101",
                                 "patient_sex": "MF"[p % 2], "number_of_studies": 3})
                Patient.insert_many(rows).execute()
            for start in range(0, n, 5000):
                rows = []
                for s in range(start, min(n, start + 5000)):
                    day = rnd.randrange(0, 3650)
                    date = time.strftime("%Y%m%d", time.gmtime(1420070400 + day * 86400))
                    rows.append({"patient": 1 + s % patients,
                                 "study_instance_uid": f"2.25.{10**20 + s}",
                                 "study_date": date, "study_time": f"{s % 24:02d}0000",
                                 "accession_number": f"A{s:09d}",
                                 "study_description": f"STUDY {s % 50}",
                                 "study_description_search": f"study {s % 50}",
                                 "modalities_in_study": MODALITIES[s % len(MODALITIES)],
                                 "number_of_series": 1, "number_of_instances": 100})
                Study.insert_many(rows).execute()
            first = Study.select(Study.id).order_by(Study.id).scalar()
            for start in range(0, n, 5000):
                Series.insert_many([
                    {"study": first + s, "series_instance_uid": f"2.25.{2 * 10**20 + s}",
                     "modality": MODALITIES[s % len(MODALITIES)], "series_number": 1,
                     "number_of_instances": 100}
                    for s in range(start, min(n, start + 5000))]).execute()
            counters.recount(database.obj)   # the totals row, as pacsd keeps it
        database.execute_sql("ANALYZE")
    index.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=300_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsd-list-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        (work / "data").mkdir()
        fill(work / "data", args.studies)
        print(f"index with {args.studies:,} studies written in {time.monotonic() - t0:.1f} s")
        with pacsd(work) as server:
            session = requests.Session()
            cases = {
                "first page, newest first": {},
                "first page by patient name": {"sort": "patient"},
                "patient name search 'patient00012'": {"patient": "patient00012"},
                "date range (one month)": {"from": "20200101", "to": "20200131"},
                "modality MR": {"modality": "MR"},
                "patient ID prefix": {"patient_id": "ID0000123"},
                "name, two words in any order": {"patient": "given5 patient00012"},
                "accession part, lower case": {"accession": "a0001234"},
                "description 'study 4'": {"description": "study 4"},
                "page 1000 (offset 49,950)": {"offset": 49_950},
            }
            print(f"{'request':<40} {'median':>9} {'total':>9}")
            for label, params in cases.items():
                times, total = [], 0
                for _ in range(10):
                    t = time.perf_counter()
                    r = session.get(f"{server.http_url}/api/studies",
                                    params={"limit": 50, **params}, timeout=60)
                    times.append(time.perf_counter() - t)
                    r.raise_for_status()
                    total = r.json()["total"]
                print(f"{label:<40} {statistics.median(times) * 1000:>7.1f} ms {total:>9,}")


if __name__ == "__main__":
    main()
