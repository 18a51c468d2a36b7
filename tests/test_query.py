"""query.py on its own: every key that can be matched is matched through an index."""

from __future__ import annotations

import pytest

from pacsd import query
from pacsd.index import Index, database

SAMPLES = {query.UID: "1.2.3", query.DA: "20240101-20240131", query.TM: "080000-120000",
           query.PN: "DOE^J*", query.ST: "ABC*", query.IS: "3", query.MODALITIES: "CT"}
MATCHED = sorted(k for k, key in query.KEYS.items() if key.kind != query.RETURN)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    idx = Index(f"sqlite:///{tmp_path_factory.mktemp('q') / 'i.db'}").open(writer=False)
    yield idx
    idx.close()


@pytest.mark.parametrize("keyword", MATCHED)
def test_matching_key_uses_an_index(index, keyword):
    key = query.KEYS[keyword]
    req = query.Request(key.level, {keyword: SAMPLES[key.kind]})
    q, _ = query.select(req, [keyword])
    sql, params = q.sql()
    with database.connection_context():
        plan = " / ".join(row[-1] for row in database.execute_sql(
            "EXPLAIN QUERY PLAN " + sql, params).fetchall())
    # SEARCH (an index lookup), never SCAN (every row of a table or of an index).
    assert "SEARCH" in plan and "SCAN" not in plan, plan


@pytest.mark.parametrize("narrowing", [{"PatientID": "P1"}, {"AccessionNumber": "A1"}])
def test_modalities_in_study_does_not_drive_a_narrower_query(index, narrowing):
    # Without statistics SQLite would start from every series of the modality in the archive.
    req = query.Request("STUDY", {**narrowing, "ModalitiesInStudy": "CT\\MR"})
    q, _ = query.select(req, ["StudyInstanceUID"])
    sql, params = q.sql()
    with database.connection_context():
        rows = database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    plan = " / ".join(r[-1] for r in rows)
    # The study's own series are looked up by (study, modality), not all series by modality.
    assert "INDEX series_modality " not in plan and "SCAN" not in plan, plan
    assert "series_study_id_modality (study_id=? AND modality=?)" in plan, plan


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
