"""query.py on its own, on each backend: every key that can be matched is matched through an
index.

SQLite: its plan must SEARCH (an index lookup), never SCAN. PostgreSQL: with tables this small
its planner rightly prefers reading them whole, so the test asks whether an index CAN serve each
key: with sequential scans disabled for the session, the plan must reach the key's table
through an index whose condition names the key's column. That is what the columns' C collation
is for: a btree index serves `LIKE 'DOE^J%'` (pacsd.query.matching._glob) and the range bounds only in
byte order.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from conftest import postgres_database
from peewee import SqliteDatabase

from pacsd import query
from pacsd.index import Index
from pacsd.index.models import Patient, Series, Study, database

SAMPLES = {query.UID: "1.2.3", query.DA: "20240101-20240131", query.TM: "080000-120000",
           query.PN: "DOE^J*", query.ST: "ABC*", query.IS: "3", query.MODALITIES: "CT"}
MATCHED = sorted(k for k, key in query.KEYS.items() if key.kind != query.RETURN)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def index(request, tmp_path_factory):
    """An empty index of each backend, for the whole module."""
    if request.param == "sqlite":
        idx = Index(f"sqlite:///{tmp_path_factory.mktemp('q') / 'i.db'}").open(writer=False)
        yield idx
        idx.close()
        return
    with postgres_database(request.getfixturevalue("postgres_server")) as url:
        idx = Index(url).open(writer=False)
        try:
            yield idx
        finally:
            idx.close()


def is_sqlite() -> bool:
    return isinstance(database.obj, SqliteDatabase)


def sqlite_plan(sql: str, params: Any) -> str:
    with database.connection_context():
        return " / ".join(row[-1] for row in database.execute_sql(
            "EXPLAIN QUERY PLAN " + sql, params).fetchall())


def postgres_plan(sql: str, params: Any, seqscan: bool = True) -> list[dict]:
    """Every node of PostgreSQL's plan (EXPLAIN's JSON), flattened."""
    with database.connection_context(), database.atomic():
        if not seqscan:
            database.execute_sql("SET LOCAL enable_seqscan = off")
        (doc,), = database.execute_sql("EXPLAIN (FORMAT JSON) " + sql, params).fetchall()
    doc = json.loads(doc) if isinstance(doc, str) else doc
    nodes, todo = [], [doc[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo += node.get("Plans", [])
    return nodes


INDEX_NODES = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")


def indexes_of(table: str) -> set[str]:
    with database.connection_context():
        return {r[0] for r in database.execute_sql(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,)).fetchall()}


def index_lookups(nodes: list[dict], table: str, column: str) -> list[dict]:
    """The plan's index scans of `table` whose index condition names `column`."""
    names = indexes_of(table)
    return [n for n in nodes if n["Node Type"] in INDEX_NODES and n["Index Name"] in names
            and re.search(rf"\b{column}\b", n.get("Index Cond", ""))]


def seq_scans(nodes: list[dict]) -> list[str]:
    return [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"]


def describe(nodes: list[dict]) -> str:
    return " / ".join(f"{n['Node Type']} {n.get('Relation Name') or n.get('Index Name', '')} "
                      f"{n.get('Index Cond', '')}".strip() for n in nodes)


@pytest.mark.parametrize("keyword", MATCHED)
def test_matching_key_uses_an_index(index, keyword):
    key = query.KEYS[keyword]
    req = query.Request(key.level, {keyword: SAMPLES[key.kind]})
    q, _ = query.select(req, [keyword])
    sql, params = q.sql()
    if is_sqlite():
        plan = sqlite_plan(sql, params)
        # SEARCH (an index lookup), never SCAN (every row of a table or of an index).
        assert "SEARCH" in plan and "SCAN" not in plan, plan
        return
    if key.kind == query.MODALITIES:   # matched on the studies' series
        table, column = Series._meta.table_name, Series.modality.column_name
    else:
        table = query.MODELS[key.level]._meta.table_name
        column = (key.match_field or key.field).column_name
    nodes = postgres_plan(sql, params, seqscan=False)
    assert index_lookups(nodes, table, column), describe(nodes)
    assert table not in seq_scans(nodes), describe(nodes)


def test_a_wildcard_is_a_range_on_the_index(index):
    # The LIKE / GLOB prefix becomes the index's bounds, not a filter over the whole index.
    q, _ = query.select(query.Request("PATIENT", {"PatientName": "DOE^J*"}), ["PatientID"])
    sql, params = q.sql()
    if is_sqlite():
        plan = sqlite_plan(sql, params)
        assert "patient_name_key>? AND patient_name_key<?" in plan, plan
        return
    nodes = postgres_plan(sql, params, seqscan=False)
    conds = {n["Index Cond"] for n in index_lookups(nodes, "patient", "patient_name_key")}
    assert conds == {("((patient_name_key >= 'DOE^J'::text) AND "
                      "(patient_name_key < 'DOE^K'::text))")}, describe(nodes)


@pytest.fixture(scope="module")
def statistics(index):
    """PostgreSQL: a realistic spread (every study has CT and MR series; patient IDs and
    accession numbers are unique) and the planner's statistics of it. The SQLite test is about
    having no statistics at all."""
    if is_sqlite():
        return
    n = 2000
    with database.connection_context(), database.atomic():
        Patient.insert_many([{"patient_id": f"STAT{i}"} for i in range(n)]).execute()
        patients = [p.id for p in Patient.select(Patient.id).where(
            Patient.patient_id.startswith("STAT")).order_by(Patient.id)]
        Study.insert_many([{"patient": p, "study_instance_uid": f"9.{i}",
                            "accession_number": f"STAT{i}", "modalities_in_study": "CT\\MR"}
                           for i, p in enumerate(patients)]).execute()
        studies = [s.id for s in Study.select(Study.id).where(
            Study.study_instance_uid.startswith("9.")).order_by(Study.id)]
        Series.insert_many([{"study": s, "series_instance_uid": f"9.{i}.{m}", "modality": m}
                            for i, s in enumerate(studies) for m in ("CT", "MR")]).execute()
    with database.connection_context():
        database.execute_sql("ANALYZE patient, study, series")


@pytest.mark.parametrize("narrowing", [{"PatientID": "P1"}, {"AccessionNumber": "A1"}])
def test_modalities_in_study_does_not_drive_a_narrower_query(index, statistics, narrowing):
    req = query.Request("STUDY", {**narrowing, "ModalitiesInStudy": "CT\\MR"})
    q, _ = query.select(req, ["StudyInstanceUID"])
    sql, params = q.sql()
    if is_sqlite():
        # Without statistics SQLite would start from every series of the modality in the
        # archive.
        plan = sqlite_plan(sql, params)
        # The study's own series are looked up by (study, modality), not all series by
        # modality.
        assert "INDEX series_modality " not in plan and "SCAN" not in plan, plan
        assert "series_study_id_modality (study_id=? AND modality=?)" in plan, plan
        return
    # PostgreSQL, with its statistics: the studies come from the narrowing key, and each
    # one's series from an index on the series' study, never every CT and MR series.
    nodes = postgres_plan(sql, params)
    assert seq_scans(nodes) == [], describe(nodes)
    assert index_lookups(nodes, "series", "study_id"), describe(nodes)
    assert "series_modality" not in {n.get("Index Name") for n in nodes}, describe(nodes)


@pytest.mark.parametrize("value", ["2024-", "-", "abc", "2024x0101"])
def test_malformed_dates_are_refused(value):
    if value == "2024-":
        assert query.condition("StudyDate", value) is not None
    else:
        with pytest.raises(query.QueryError):
            query.condition("StudyDate", value)


def test_universal_matching_adds_no_condition():
    assert query.condition("PatientName", "") is None
    assert query.condition("PatientName", "*") is None
    assert query.condition("NumberOfStudyRelatedInstances", "5") is None
