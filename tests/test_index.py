"""The index on its own: group commit, the statements one C-STORE costs, counters."""

from __future__ import annotations

import threading

from pacsd.header import check_and_extract
from pacsd.index import Index, database

from data import ct_slice


def record(n: int, series: int = 1, study: int = 1):
    return check_and_extract(ct_slice(seed=21, patient=1, study=study, series=series, number=n,
                                      size=2))


def test_concurrent_adds_share_commits(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'i.db'}").open()
    try:
        errors = []

        def worker(k: int) -> None:
            try:
                for n in range(25):
                    index.add(record(k * 100 + n, series=k), path=f"p/{k}/{n}", size=1,
                              transfer_syntax="1.2.840.10008.1.2.1")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        counts = index.counts()
        assert (counts["instances"], counts["series"], counts["studies"]) == (200, 8, 1)
        # One writer, group commit: fewer transactions than adds.
        assert index.commits < 200
        assert index.integrity_check() == "ok"
    finally:
        index.close()


def test_an_instance_of_a_known_series_costs_few_statements(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'i.db'}").open(writer=False)
    try:
        index.add(record(1), path="a", size=1, transfer_syntax="1.2.840.10008.1.2.1")
        statements: list[str] = []
        with database.connection_context():
            database.connection().set_trace_callback(statements.append)
            index.add(record(2), path="b", size=1, transfer_syntax="1.2.840.10008.1.2.1")
            database.connection().set_trace_callback(None)
        work = [s for s in statements if s.split()[0].upper() not in ("BEGIN", "SAVEPOINT", "RELEASE", "COMMIT")]
        # duplicate check, insert, three counter updates
        assert len(work) <= 5, work
        with database.connection_context():
            from pacsd.index import Patient, Series, Study
            assert Series.get().number_of_instances == 2
            assert (Study.get().number_of_instances, Study.get().number_of_series) == (2, 1)
            assert Patient.get().number_of_instances == 2
    finally:
        index.close()


def test_duplicate_is_reported_not_added(tmp_path):
    index = Index(f"sqlite:///{tmp_path / 'i.db'}").open()
    try:
        first = index.add(record(1), path="a", size=1, transfer_syntax="1.2.840.10008.1.2.1")
        again = index.add(record(1), path="b", size=1, transfer_syntax="1.2.840.10008.1.2.1")
        assert (first.duplicate, again.duplicate) == (False, True)
        assert index.counts()["instances"] == 1
    finally:
        index.close()
