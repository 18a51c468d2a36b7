"""The study list's search finds what it shows (issue 19, item 7): names and descriptions with
case, accents and PN separators ignored, CJK as written, the accession by a lower-case part,
the Patient ID by a lower-case prefix, and the patient sort with Ö beside O, on SQLite and
PostgreSQL, over HTTP and typed into the page in Chromium. The studies come in through DCMTK's
storescu, in UTF-8 (ISO_IR 192) and, for MÜLLER, in Latin-1 (ISO_IR 100). Also: the migration
to schema 7 fills the keys of an older index in batches and resumes a stopped fill.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import requests
from conftest import LOCAL, browser_errors, dcmtk, run_peer
from data import ct_slice
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_migrations import run_sql

from pacsd.index import Index, migrations
from pacsd.index.models import database, search_key

AET = "PACSD"
TIMEOUT = 20

# (PatientName, Specific Character Set, StudyDescription, AccessionNumber), one study each.
PEOPLE = [
    ("MÜLLER^HANS", "ISO_IR 100", "CT HJÄRNA", "RAD2024X0017"),
    ("Ångström^Anders", "ISO_IR 192", "HJÄRNA UTAN KONTRAST", "RAD2024X0018"),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192", "頭部 CT", "RAD2024X0019"),
    ("Zander^Zoe", "ISO_IR 100", "CT THORAX/ABDOMEN", "RAD2024X0020"),
    ("Öhman^Örjan", "ISO_IR 100", "MR KNÄ", "RAD2024X0021"),
    ("Oberg^Olof", "ISO_IR 100", "CT HEAD", "RAD2024X0022"),
]
# By the search key, as a Swedish or German reader expects: Ö beside O, not after Z.
BY_NAME = ["Ångström^Anders", "MÜLLER^HANS", "Oberg^Olof", "Öhman^Örjan",
           "Yamada^Tarou=山田^太郎=やまだ^たろう", "Zander^Zoe"]


def write_people(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (name, charset, description, accession) in enumerate(PEOPLE, start=1):
        ds = ct_slice(seed=19, patient=n, study=1, series=1, number=1, size=16,
                      patient_name=name, accession=accession)
        ds.SpecificCharacterSet = charset
        ds.StudyDescription = description
        path = folder / f"p{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    # Latin-1 on the wire for MÜLLER (0xDC), UTF-8 for Ångström.
    assert b"M\xdcLLER^HANS" in paths[0].read_bytes()
    assert "Ångström".encode() in paths[1].read_bytes()
    return paths


def storescu(port: int, files: list[Path]) -> None:
    proc = run_peer([dcmtk("storescu"), "-v", "-nh", "-aet", "STORESCU", "-aec", AET, LOCAL,
                     str(port), *map(str, files)])
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == len(files), out[-3000:]


def names(server, **params) -> list[str]:
    r = requests.get(f"{server.http_url}/api/studies", params={"limit": 100, **params},
                     timeout=10)
    assert r.status_code == 200, r.text
    return [s["patient_name"] for s in r.json()["studies"]]


def test_the_list_finds_names_descriptions_and_ids_as_typed(index_url, make_server, tmp_path):
    server = make_server(index={"url": index_url})
    storescu(server.dicom_port, write_people(tmp_path / "in"))
    muller, angstrom, yamada = (p[0] for p in PEOPLE[:3])

    # Names: each word typed begins a word of the name, in any order; case and accents alike.
    for typed in ("muller", "MÜLLER", "Müller", "hans mül", "HANS^MULLER"):
        assert names(server, patient=typed) == [muller], typed
    for typed in ("angstrom", "ÅNGSTRÖM", "anders ang"):
        assert names(server, patient=typed) == [angstrom], typed
    for typed in ("山田", "太郎", "やまだ", "tarou yamada", "山田 tarou"):
        assert names(server, patient=typed) == [yamada], typed
    assert names(server, patient="ohman") == ["Öhman^Örjan"]
    assert names(server, patient="ller") == []        # inside a word: not a name search
    assert names(server, patient="muller zoe") == []  # every word must match
    assert names(server, patient="mul*") == [muller]  # a DICOM wildcard carried over

    # Descriptions: each word typed anywhere in it.
    assert set(names(server, description="hjarna")) == {muller, angstrom}
    assert names(server, description="HJÄRNA kontrast") == [angstrom]
    assert names(server, description="abdomen") == ["Zander^Zoe"]
    assert names(server, description="頭部") == [yamada]
    assert names(server, description="kna") == ["Öhman^Örjan"]

    # IDs: the accession by any part, the Patient ID by its beginning, case ignored.
    assert names(server, accession="x0017") == [muller]
    assert len(names(server, accession="rad2024x")) == len(PEOPLE)
    assert len(names(server, patient_id="pid19-")) == len(PEOPLE)
    assert names(server, patient_id="pid19-003") == [yamada]
    assert names(server, patient_id="19-003") == []

    # Sorted by the search key: Ö beside O, not after Z; the other way round for desc.
    assert names(server, sort="patient", order="asc") == BY_NAME
    assert names(server, sort="patient", order="desc") == BY_NAME[::-1]
    descriptions = sorted((p[2] for p in PEOPLE), key=search_key)
    assert descriptions[:2] == ["CT HEAD", "CT HJÄRNA"]
    r = requests.get(f"{server.http_url}/api/studies",
                     params={"sort": "description", "order": "asc"}, timeout=10)
    assert [s["description"] for s in r.json()["studies"]] == descriptions

    # C-FIND-style matching is not what the list does, and the list's LIKE wildcards are text.
    assert names(server, patient="%") == [] and names(server, accession="_") == []


def test_hostile_search_fields_are_bounded_and_refused_plainly(make_server, tmp_path, caplog):
    """The attack side: bytes that are not UTF-8 get a 400 and one log line; a long name is
    read only so far (a longer URL is refused before), too many words get a 400 (they made
    SQLite's parser overflow: a 500); LIKE's own wildcards are taken as text."""
    server = make_server()
    storescu(server.dicom_port, write_people(tmp_path / "in")[:1])
    url = f"{server.http_url}/api/studies"
    with caplog.at_level(logging.WARNING, logger="pacsd.web.app"):
        r = requests.get(url + "?patient=M%FCller", timeout=10)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]
    assert len([m for m in caplog.messages if "not UTF-8" in m]) == 1
    r = requests.get(url, params={"patient": "muller " + "x" * 4000}, timeout=10)
    assert r.status_code == 200 and r.json()["total"] == 0
    r = requests.get(url, params={"patient": "muller" + " a" * 1000}, timeout=10)
    assert r.status_code == 200 and r.json()["total"] == 0   # one word "a", said 1000 times
    r = requests.get(url, params={"description": " ".join(f"w{i}" for i in range(300))},
                     timeout=10)
    assert r.status_code == 400 and "at most 8 words" in r.json()["error"]
    for typed in ("%", "_", "\\", "%muller", "' OR 1=1 --"):
        assert requests.get(url, params={"patient": typed, "description": typed},
                            timeout=10).json()["total"] == 0, typed


def test_the_qr_pages_remote_search_reads_utf8_too(make_server):
    """The Q/R page's search on a node reads its fields as the study list does: bytes that are
    not UTF-8 get a 400 before any C-FIND leaves (bottle alone handed them out as Latin-1)."""
    server = make_server(nodes=[{"name": "far", "aet": "FAR", "host": LOCAL, "port": 9}])
    r = requests.get(f"{server.http_url}/api/nodes/far/studies?patient=M%FCller", timeout=10)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]


def test_schema_6_index_gains_search_keys_in_batches_and_resumes(index_url, tmp_path,
                                                                 make_server, monkeypatch,
                                                                 caplog):
    """The migration to schema 7 adds the keys and fills them for the rows already there, a
    batch per transaction, saying so in the log; a fill stopped half-way is finished at the
    next start."""
    server = make_server(index={"url": index_url})
    storescu(server.dicom_port, write_people(tmp_path / "in"))
    server.stop()
    drop = ["DROP INDEX patient_patient_name_search", "DROP INDEX study_study_description_search",
            "DROP INDEX patient_patient_id_lower",
            "ALTER TABLE patient DROP COLUMN patient_name_search",
            "ALTER TABLE study DROP COLUMN study_description_search",
            "UPDATE pacsd_meta SET value = '6' WHERE key = 'schema_version'"]
    run_sql(index_url, *drop)
    monkeypatch.setattr(migrations, "FILL_BATCH", 2)
    with caplog.at_level(logging.INFO, logger="pacsd.index.migrations"):
        index = Index(index_url).open(writer=False)
        try:
            assert migrations.version(database.obj) == migrations.LATEST >= 7
            assert _keys(index) == _expected()
        finally:
            index.close()
    assert "filling the search key of 6 patient row(s)" in caplog.text
    assert "the search key of 6 study row(s) filled" in caplog.text
    # A fill stopped half-way (the process killed between two batches): the rows left NULL
    # are filled at the next start, without `pacsd migrate`.
    run_sql(index_url, "UPDATE patient SET patient_name_search = NULL WHERE id > 3",
         "UPDATE study SET study_description_search = NULL")
    index = Index(index_url, auto_migrate=False).open(writer=False)
    try:
        assert _keys(index) == _expected()
    finally:
        index.close()
    # And the list searches on them.
    server = make_server(index={"url": index_url})
    assert names(server, patient="ångström") == [PEOPLE[1][0]]
    assert names(server, sort="patient", order="asc") == BY_NAME


def _expected() -> tuple[dict[str, str], dict[str, str]]:
    return ({p[0]: search_key(p[0], name=True) for p in PEOPLE},
            {p[2]: search_key(p[2]) for p in PEOPLE})


def _keys(index) -> tuple[dict[str, str], dict[str, str]]:
    with index.reading():
        db = database.obj
        return (dict(db.execute_sql("SELECT patient_name, patient_name_search FROM patient")
                     .fetchall()),
                dict(db.execute_sql("SELECT study_description, study_description_search "
                                    "FROM study").fetchall()))


# --- in the page ------------------------------------------------------------------------------

def _rows(drv) -> list[str]:
    return drv.execute_script("""return [...document.querySelectorAll(
        '#studies tbody tr[data-uid] .patient')].map(td => td.textContent.trim());""")


def _search(drv, field: str, typed: str, expected: list[str]) -> None:
    drv.find_element(By.ID, "clear-btn").click()
    el = drv.find_element(By.ID, "f-" + field)
    el.clear()
    el.send_keys(typed)
    drv.find_element(By.ID, "search-btn").click()
    WebDriverWait(drv, TIMEOUT, poll_frequency=0.05).until(
        lambda d: sorted(_rows(d)) == sorted(expected) and not d.execute_script(
            "return document.body.classList.contains('busy')"),
        f"{typed!r} in {field}: rows {_rows(drv)}, expected {expected}")


def test_typed_into_the_study_list_in_chromium(make_server, browser, tmp_path):
    server = make_server()
    storescu(server.dicom_port, write_people(tmp_path / "in"))
    browser.get(server.http_url + "/app/")
    WebDriverWait(browser, TIMEOUT, poll_frequency=0.05).until(
        lambda d: len(_rows(d)) == len(PEOPLE))
    for typed in ("muller", "MÜLLER"):
        _search(browser, "patient", typed, ["MÜLLER, HANS"])
    _search(browser, "patient", "angstrom", ["Ångström, Anders"])
    _search(browser, "patient", "山田", ["Yamada, Tarou"])
    _search(browser, "description", "hjarna", ["MÜLLER, HANS", "Ångström, Anders"])
    _search(browser, "accession", "x0018", ["Ångström, Anders"])
    # Sorted by patient name from the column header: Ö beside O.
    browser.find_element(By.ID, "clear-btn").click()
    WebDriverWait(browser, TIMEOUT).until(lambda d: len(_rows(d)) == len(PEOPLE))
    browser.find_element(By.CSS_SELECTOR, '#studies th[data-sort="patient"]').click()
    expected = ["Ångström, Anders", "MÜLLER, HANS", "Oberg, Olof", "Öhman, Örjan",
                "Yamada, Tarou", "Zander, Zoe"]
    WebDriverWait(browser, TIMEOUT, poll_frequency=0.05).until(   # the first click: A to Z
        lambda d: _rows(d) == expected, f"rows {_rows(browser)}")
    assert browser_errors(browser) == []
