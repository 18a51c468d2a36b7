"""The study list, Query/Retrieve, admin and login pages, driven in a real headless Chromium
against a real pacsd (and, for Q/R, a second pacsd in a subprocess).

PACSD_SCREENSHOT=docs/studies.png pytest tests/test_ui_pages.py -k screenshot
rewrites the study-list screenshot of the documentation.
"""

from __future__ import annotations

import os
import re
import zipfile
from datetime import date, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from conftest import LOCAL, browser_errors, free_port, remote_pacsd, store_files
from data import ct_slice, write_series
from pydicom import dcmread
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from test_retrieve import Destination, move

from pacsd.web.auth import hash_password

TIMEOUT = 20
MODALITIES = ("CT", "MR", "US")
FIRST_DAY = date(2024, 1, 1)
SEED = 41


def make_studies(folder: Path, count: int, seed: int = SEED) -> list[Path]:
    """`count` one-image studies: 3 per patient, one day apart from 2024-01-01, modality cycling
    CT, MR, US; patient 1 is DOE^JANE, patient 2 SMITH^JOHN, the others Test^PatientNNN."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {1: "DOE^JANE", 2: "SMITH^JOHN"}
    paths = []
    for i in range(count):
        patient, study = i // 3 + 1, i % 3 + 1
        ds = ct_slice(seed=seed, patient=patient, study=study, series=1, number=1, size=16,
                      modality=MODALITIES[i % 3],
                      study_date=(FIRST_DAY + timedelta(days=i)).strftime("%Y%m%d"),
                      patient_name=names.get(patient))
        ds.StudyDescription = f"{MODALITIES[i % 3]} STUDY {i:02d}"
        path = folder / f"study{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sixty(tmp_path_factory) -> list[Path]:
    return make_studies(tmp_path_factory.mktemp("sixty"), 60)


@pytest.fixture
def populated(make_server, sixty):
    server = make_server()
    assert store_files(server.dicom_port, sixty) == [0] * 60
    return server


# --- helpers ----------------------------------------------------------------------------------

def wait(drv, cond, timeout: float = TIMEOUT, message: str = ""):
    return WebDriverWait(drv, timeout, poll_frequency=0.05).until(lambda d: cond(d), message)


def page(drv, server, path: str) -> None:
    drv.get(server.http_url + "/app/" + path)


def study_rows(drv) -> list[dict]:
    """The rows of the study list as dicts (read in one script: no stale elements)."""
    return drv.execute_script("""
        return [...document.querySelectorAll('#studies tbody tr[data-uid]')].map(tr => ({
          uid: tr.dataset.uid, patient: tr.querySelector('.patient').textContent.trim(),
          id: tr.querySelector('.patient-id').textContent.trim(),
          date: tr.querySelector('.study-date').textContent.trim(),
          modalities: tr.querySelector('.modalities').textContent.trim(),
          description: tr.querySelector('.description').textContent.trim()}));""")


def text(drv, css: str) -> str:
    """The visible text of the first match, or "" (read in one script: pages re-render)."""
    return drv.execute_script(
        "const el = document.querySelector(arguments[0]); return el ? el.innerText.trim() : ''",
        css)


def wait_range(drv, expected: str) -> None:
    wait(drv, lambda d: text(d, "#range") == expected and not
         d.execute_script("return document.body.classList.contains('busy')"),
         message=f"range never became {expected!r}")


def query_of(drv) -> dict[str, list[str]]:
    return parse_qs(urlsplit(drv.current_url).query)


def accept_confirm(drv) -> None:
    def alert(d):
        try:
            return d.switch_to.alert
        except NoAlertPresentException:
            return False
    wait(drv, alert).accept()


def type_into(drv, css: str, value: str, enter: bool = False) -> None:
    el = drv.find_element(By.CSS_SELECTOR, css)
    el.clear()
    el.send_keys(value + (Keys.ENTER if enter else ""))


def set_value(drv, css: str, value: str) -> None:
    """For <input type=date>: typing is locale-dependent, the value property is not."""
    drv.execute_script("document.querySelector(arguments[0]).value = arguments[1]", css, value)


def pid(patient: int, seed: int = SEED) -> str:
    return f"PID{seed}-{patient:03d}"


# --- study list -------------------------------------------------------------------------------

def test_search_by_name_id_date_and_modality(populated, browser):
    page(browser, populated, "")
    wait_range(browser, "1–50 of 60")
    rows = study_rows(browser)
    # Newest study first by default.
    assert rows[0]["date"].startswith((FIRST_DAY + timedelta(days=59)).isoformat())

    type_into(browser, "#f-patient", "doe", enter=True)
    wait_range(browser, "1–3 of 3")
    assert {r["id"] for r in study_rows(browser)} == {pid(1)}
    assert {r["patient"] for r in study_rows(browser)} == {"DOE, JANE"}
    assert query_of(browser)["patient"] == ["doe"]

    browser.find_element(By.ID, "clear-btn").click()
    wait_range(browser, "1–50 of 60")
    type_into(browser, "#f-patient_id", pid(7), enter=True)
    wait_range(browser, "1–3 of 3")
    assert {r["id"] for r in study_rows(browser)} == {pid(7)}

    browser.find_element(By.ID, "clear-btn").click()
    wait_range(browser, "1–50 of 60")
    set_value(browser, "#f-from", "2024-01-05")
    set_value(browser, "#f-to", "2024-01-07")
    browser.find_element(By.ID, "search-btn").click()
    wait_range(browser, "1–3 of 3")
    assert sorted(r["date"][:10] for r in study_rows(browser)) == [
        "2024-01-05", "2024-01-06", "2024-01-07"]
    assert query_of(browser)["from"] == ["20240105"] and query_of(browser)["to"] == ["20240107"]

    browser.find_element(By.ID, "clear-btn").click()
    wait_range(browser, "1–50 of 60")
    Select(browser.find_element(By.ID, "f-modality")).select_by_visible_text("MR")
    wait_range(browser, "1–20 of 20")
    assert {r["modalities"] for r in study_rows(browser)} == {"MR"}

    # The back button returns to the previous search, fields included.
    browser.back()
    wait_range(browser, "1–50 of 60")
    browser.back()
    wait_range(browser, "1–3 of 3")
    assert browser.find_element(By.ID, "f-from").get_attribute("value") == "2024-01-05"

    # A shared link runs its search; the quick "Any" button clears the dates.
    page(browser, populated, "?from=20240110&to=20240110&description=study")
    wait_range(browser, "1–1 of 1")
    assert study_rows(browser)[0]["date"].startswith("2024-01-10")
    assert browser.find_element(By.ID, "f-to").get_attribute("value") == "2024-01-10"
    browser.find_element(By.ID, "q-any").click()
    wait_range(browser, "1–50 of 60")
    browser.find_element(By.ID, "q-today").click()
    wait_range(browser, "0 studies")
    assert browser_errors(browser) == []


def test_sorting_and_paging(populated, browser):
    page(browser, populated, "")
    wait_range(browser, "1–50 of 60")
    Select(browser.find_element(By.ID, "page-size")).select_by_visible_text("25")
    wait_range(browser, "1–25 of 60")
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="patient_id"]').click()
    wait(browser, lambda d: query_of(d).get("sort") == ["patient_id"])
    wait_range(browser, "1–25 of 60")
    ids = [r["id"] for r in study_rows(browser)]
    assert ids == sorted(ids) and ids[0] == pid(1)
    assert "sorted-asc" in browser.find_element(
        By.CSS_SELECTOR, 'th[data-sort="patient_id"]').get_attribute("class")

    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="patient_id"]').click()
    wait(browser, lambda d: study_rows(d) and study_rows(d)[0]["id"] == pid(20))
    ids = [r["id"] for r in study_rows(browser)]
    assert ids == sorted(ids, reverse=True)
    assert query_of(browser)["order"] == ["desc"]

    seen = []
    for expected in ("1–25 of 60", "26–50 of 60", "51–60 of 60"):
        wait_range(browser, expected)
        seen += [r["uid"] for r in study_rows(browser)]
        if expected != "51–60 of 60":
            browser.find_element(By.ID, "next-btn").click()
    assert len(seen) == len(set(seen)) == 60
    assert browser.find_element(By.ID, "next-btn").get_attribute("disabled")
    browser.find_element(By.ID, "prev-btn").click()
    wait_range(browser, "26–50 of 60")
    assert query_of(browser)["offset"] == ["25"] and query_of(browser)["limit"] == ["25"]
    browser.refresh()                     # the whole state is in the URL
    wait_range(browser, "26–50 of 60")
    assert [r["uid"] for r in study_rows(browser)] == seen[25:50]
    assert browser_errors(browser) == []


def test_clicking_a_row_opens_the_viewer(populated, browser):
    page(browser, populated, f"?patient_id={pid(3)}&sort=date&order=asc")
    wait_range(browser, "1–3 of 3")
    first = study_rows(browser)[0]["uid"]
    browser.find_element(By.CSS_SELECTOR, "#studies tbody tr .description").click()
    wait(browser, lambda d: "/app/viewer?" in d.current_url)
    assert query_of(browser)["study"] == [first]


def test_download_selected_as_zip(make_server, sixty, browser):
    server = make_server()
    assert store_files(server.dicom_port, sixty[:2]) == [0] * 2
    page(browser, server, "")
    wait_range(browser, "1–2 of 2")
    browser.find_element(By.CSS_SELECTOR, "#studies tbody tr .row-check").click()
    wait(browser, lambda d: text(d, "#selected-count") == "1 selected")
    browser.find_element(By.ID, "zip-btn").click()
    zips = wait(browser, lambda d: [p for p in d.downloads.iterdir() if p.suffix == ".zip"],
                message="no ZIP downloaded")
    with zipfile.ZipFile(zips[0]) as zf:
        assert "DICOMDIR" in zf.namelist()


def test_send_and_delete_selected(make_server, sixty, browser):
    dest = Destination()
    try:
        server = make_server(nodes=[{"name": "workstation", "aet": "DEST", "host": LOCAL,
                                     "port": dest.port}])
        assert store_files(server.dicom_port, sixty[:4]) == [0] * 4
        page(browser, server, "?sort=date&order=asc")
        wait_range(browser, "1–4 of 4")
        uid = study_rows(browser)[0]["uid"]
        browser.find_element(By.CSS_SELECTOR, "#studies tbody tr .row-check").click()
        wait(browser, lambda d: text(d, "#selected-count") == "1 selected")

        Select(browser.find_element(By.ID, "send-node")).select_by_value("workstation")
        browser.find_element(By.ID, "send-btn").click()
        wait(browser, lambda d: "done" in text(d, "#jobs .badge"), message="send never finished")
        assert set(dest.received) == {str(dcmread(sixty[0]).SOPInstanceUID)}

        # With no [[users]] everything is open, deleting included.
        browser.find_element(By.ID, "delete-btn").click()
        accept_confirm(browser)
        wait_range(browser, "1–3 of 3")
        assert uid not in {r["uid"] for r in study_rows(browser)}

        # In the recycle bin, on the admin page: restored from there, the study is back.
        page(browser, server, "admin")
        row = '#trash tbody tr[data-id] td:nth-child(3)'
        wait(browser, lambda d: uid in text(d, row), message="the deletion not in the bin")
        assert "deleted" in text(browser, "#trash tbody tr[data-id]")
        browser.find_element(By.CSS_SELECTOR, "#trash button.t-restore").click()
        wait(browser, lambda d: "empty" in text(d, "#trash tbody"), message="never restored")
        page(browser, server, "?sort=date&order=asc")
        wait_range(browser, "1–4 of 4")
        assert uid in {r["uid"] for r in study_rows(browser)}
    finally:
        dest.close()


# --- Query/Retrieve ---------------------------------------------------------------------------

def test_query_and_retrieve_from_another_pacsd(make_server, tmp_path, browser):
    files = make_studies(tmp_path / "remote-in", 6, seed=43)
    with remote_pacsd(tmp_path, files) as (remote, local_port):
        server = make_server(dicom={"aet": "LOCALPACS", "port": local_port}, nodes=[
            {"name": "archive", "aet": "REMOTE", "host": LOCAL, "port": remote.port},
            {"name": "down", "aet": "DOWN", "host": LOCAL, "port": free_port()}])
        page(browser, server, "qr")
        wait(browser, lambda d: Select(d.find_element(By.ID, "node")).first_selected_option
             .get_attribute("value") == "archive")
        browser.find_element(By.ID, "echo-btn").click()
        wait(browser, lambda d: "ok" in text(d, "#echo-result"))

        type_into(browser, "#f-patient_id", "PID43-002", enter=True)
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr[data-uid]")) == 3)
        assert "PID43-002" in text(browser, "#results tbody")
        target = browser.find_element(By.CSS_SELECTOR, "#results tbody tr[data-uid]")
        study = target.get_attribute("data-uid")
        target.find_element(By.CSS_SELECTOR, ".row-check").click()
        browser.find_element(By.ID, "retrieve-btn").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs a.open-local"),
             message="retrieve never finished")
        rsp = requests.get(server.http_url + "/api/studies", params={"patient_id": "PID43-002"},
                           timeout=10).json()
        assert [s["study_uid"] for s in rsp["studies"]] == [study]
        browser.find_element(By.CSS_SELECTOR, "#jobs a.open-local").click()
        wait(browser, lambda d: "/app/viewer?" in d.current_url)
        assert query_of(browser)["study"] == [study]

        # A node that does not answer: the error is shown, not swallowed.
        browser.back()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#node option[value=down]"))
        Select(browser.find_element(By.ID, "node")).select_by_value("down")
        browser.find_element(By.ID, "search-btn").click()
        wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "down" in text(browser, "#error")


# --- administration and login -----------------------------------------------------------------

ROOT = {"name": "root", "password_hash": hash_password("root-secret"), "admin": True}
BOB = {"name": "bob", "password_hash": hash_password("bob-secret"), "admin": False}


def log_in(drv, name: str, password: str) -> None:
    wait(drv, lambda d: "/app/login" in d.current_url)
    type_into(drv, "#name", name)
    type_into(drv, "#password", password, enter=True)


def test_login_redirects_and_guards(make_server, sixty, browser):
    server = make_server(users=[ROOT, BOB])
    assert store_files(server.dicom_port, sixty[:2]) == [0] * 2
    page(browser, server, "?patient=doe")
    wait(browser, lambda d: "/app/login" in d.current_url)
    assert query_of(browser)["next"] == ["/app/?patient=doe"]

    log_in(browser, "root", "wrong password")
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert text(browser, "#error")
    assert "/app/login" in browser.current_url

    type_into(browser, "#password", "root-secret", enter=True)
    wait(browser, lambda d: urlsplit(d.current_url).path == "/app/")
    wait_range(browser, "1–2 of 2")
    assert query_of(browser)["patient"] == ["doe"]
    wait(browser, lambda d: "root" in text(d, "#nav-user"))

    # Log out; a non-admin sees no admin page; an absolute "next" is never followed.
    browser.find_element(By.ID, "logout").click()
    wait(browser, lambda d: "/app/login" in d.current_url)
    browser.get(server.http_url + "/app/login?next=" + requests.utils.quote("//evil.example/x"))
    log_in(browser, "bob", "bob-secret")
    wait(browser, lambda d: urlsplit(d.current_url).path == "/app/")
    assert urlsplit(browser.current_url).netloc == urlsplit(server.http_url).netloc
    wait(browser, lambda d: "hidden" in d.find_element(By.ID, "nav-admin").get_attribute("class"))
    page(browser, server, "admin")
    wait(browser, lambda d: d.find_element(By.ID, "denied").is_displayed())
    assert "administrators only" in text(browser, "#denied")
    assert not browser.find_element(By.ID, "admin").is_displayed()


def test_admin_merges_patients_and_undoes_it_from_the_admin_page(make_server, tmp_path,
                                                                   browser):
    files = write_series(tmp_path / "in", seed=47, patients=2, studies=1, images=2, size=16)
    a, b = dcmread(files[0]), dcmread(files[-1])
    server = make_server(users=[ROOT])
    assert store_files(server.dicom_port, files) == [0] * 4
    page(browser, server, "admin")
    log_in(browser, "root", "root-secret")
    wait(browser, lambda d: "/app/admin" in d.current_url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#fm-from"))
    type_into(browser, "#fm-from", str(a.PatientID))
    type_into(browser, "#fm-into", str(b.PatientID))
    browser.find_element(By.CSS_SELECTOR, "#fix-merge button").click()
    wait(browser, lambda d: "2 image(s) rewritten" in text(d, "#fix-result"),
         message="the merge never finished")
    assert server.index.counts()["patients"] == 1
    # The previous versions are listed in the bin; Undo takes the merge back.
    wait(browser, lambda d: "patient merge" in text(d, "#trash tbody"))
    type_into(browser, "#fu-uid", str(a.PatientID))
    browser.find_element(By.CSS_SELECTOR, "#fix-undo button").click()
    wait(browser, lambda d: "2 image(s) rewritten" in text(d, "#fix-result")
         and "#" in text(d, "#fix-result") and not d.find_element(By.ID, "fu-uid")
         .get_attribute("value"), message="the undo never finished")
    assert server.index.counts()["patients"] == 2
    # A mistake is said plainly, nothing changed.
    type_into(browser, "#fs-uid", str(a.StudyInstanceUID))
    type_into(browser, "#fs-to", "NO-SUCH-PATIENT")
    browser.find_element(By.CSS_SELECTOR, "#fix-study button").click()
    wait(browser, lambda d: "no patient NO-SUCH-PATIENT" in text(d, "#fix-result"))
    assert server.index.counts()["patients"] == 2


def test_admin_status_nodes_users_and_log(make_server, sixty, browser):
    port = free_port()
    server = make_server(dicom={"port": port}, users=[ROOT], nodes=[
        {"name": "configured", "aet": "CFGNODE", "host": LOCAL, "port": free_port()}])
    assert store_files(server.dicom_port, sixty[:3]) == [0] * 3
    page(browser, server, "admin")
    log_in(browser, "root", "root-secret")
    wait(browser, lambda d: "/app/admin" in d.current_url)

    # Status figures.
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#stat-studies .value"))
    assert text(browser, "#stat-studies .value") == "3"
    assert text(browser, "#stat-patients .value") == "1"
    assert text(browser, "#stat-instances .value") == "3"
    assert re.search(r"free of", text(browser, "#status-details"))

    # The configuration file's node is read-only.
    cfg_row = browser.find_element(By.CSS_SELECTOR, '#nodes tr[data-name="configured"]')
    assert "config file" in cfg_row.text
    assert not cfg_row.find_elements(By.CSS_SELECTOR, '[data-act="remove"]')

    # Add a node that is pacsd itself, echo it, edit it, remove it.
    type_into(browser, "#n-name", "myself")
    type_into(browser, "#n-aet", "PACSD")
    type_into(browser, "#n-host", LOCAL)
    type_into(browser, "#n-port", str(port))
    browser.find_element(By.ID, "node-add").click()
    row = '#nodes tr[data-name="myself"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row))
    browser.find_element(By.CSS_SELECTOR, row + ' [data-act="echo"]').click()
    wait(browser, lambda d: "ok" in text(d, row + " td.echo"), message="echo never answered")
    browser.find_element(By.CSS_SELECTOR, row + ' [data-act="edit"]').click()
    type_into(browser, row + " .e-host", "localhost")
    browser.find_element(By.CSS_SELECTOR, row + ' [data-act="save"]').click()
    wait(browser, lambda d: "localhost" in text(d, row))
    nodes = requests.get(server.http_url + "/api/nodes", auth=("root", "root-secret"),
                         timeout=10).json()
    assert {"name": "myself", "aet": "PACSD", "host": "localhost", "port": port,
            "source": "admin"} in nodes
    browser.find_element(By.CSS_SELECTOR, row + ' [data-act="remove"]').click()
    accept_confirm(browser)
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row))

    # Users: the configured one is read-only; add one.
    assert "config file" in text(browser, '#users tr[data-name="root"]')
    type_into(browser, "#u-name", "carol")
    type_into(browser, "#u-password", "carol-secret")
    browser.find_element(By.ID, "u-admin").click()
    browser.find_element(By.ID, "user-add").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#users tr[data-name="carol"]'))
    assert "administrator" in text(browser, '#users tr[data-name="carol"]')

    # A warning logged by the server shows up in "recent errors".
    statuses = move(server.dicom_port, "NOWHERE", "STUDY",
                    StudyInstanceUID=str(dcmread(sixty[0]).StudyInstanceUID))
    assert statuses[-1].Status == 0xA801
    browser.find_element(By.ID, "log-refresh").click()
    wait(browser, lambda d: "NOWHERE" in text(d, "#log tbody"))
    assert "WARNING" in text(browser, "#log tbody")
    assert browser_errors(browser) == []


# --- the documentation's screenshot -------------------------------------------------------------

def pretty_studies(folder: Path) -> list[Path]:
    """A handful of plausible studies for the screenshot."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [("DOE^JANE", "CT", "CT CHEST WITH CONTRAST", 2), ("SMITH^JOHN", "MR", "MR BRAIN", 3),
            ("GARCIA^MARIA", "US", "US ABDOMEN", 1), ("MÜLLER^HANS", "CR", "CR CHEST PA/LAT", 2),
            ("NGUYEN^LINH", "CT", "CT ABDOMEN PELVIS", 4), ("BROWN^ROBERT", "MG", "MAMMO SCREENING", 4),
            ("ROSSI^GIULIA", "MR", "MR KNEE RIGHT", 5), ("KOWALSKI^PIOTR", "PT", "PET-CT WHOLE BODY", 2),
            ("TANAKA^YUKI", "DX", "DX HAND LEFT", 1), ("OKAFOR^CHIDI", "CT", "CT HEAD", 1)]
    paths = []
    today = date.today()
    for i, (name, modality, description, series) in enumerate(rows):
        for se in range(1, series + 1):
            ds = ct_slice(seed=77, patient=i + 1, study=1, series=se, number=1, size=16,
                          modality=modality, patient_name=name,
                          study_date=(today - timedelta(days=i // 2)).strftime("%Y%m%d"))
            ds.StudyDescription = description
            ds.StudyTime = f"{8 + i:02d}{(i * 7) % 60:02d}00"
            path = folder / f"pretty{i}-{se}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def test_screenshot_of_the_study_list(make_server, tmp_path, browser):
    """The README's picture: a study list that is not blank (written to PACSD_SCREENSHOT when
    that is set)."""
    from io import BytesIO
    from PIL import Image, ImageStat
    server = make_server()
    files = pretty_studies(tmp_path / "pretty")
    assert set(store_files(server.dicom_port, files)) == {0}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    page(browser, server, "")
    wait_range(browser, "1–10 of 10")
    browser.find_element(By.CSS_SELECTOR, "#studies tbody tr:nth-child(2) .row-check").click()
    png = browser.get_screenshot_as_png()
    image = Image.open(BytesIO(png)).convert("L")
    assert image.size == (1400, 900) and ImageStat.Stat(image).stddev[0] > 10
    Path(os.environ.get("PACSD_SCREENSHOT") or tmp_path / "studies.png").write_bytes(png)


def test_a_logged_in_reader_views_with_the_session_cookie_alone(make_server, tmp_path, browser):
    """With users, the viewer's API calls, frames and thumbnails all go through on the session
    cookie (no Basic auth anywhere), and a reader who is not an administrator cannot delete."""
    from test_ui_viewer import CANVAS_STATS, all_loaded, js
    from test_ui_viewer import wait as wait_js
    server = make_server(users=[
        {"name": "reader", "password_hash": hash_password("reader-password")}])
    files = write_series(tmp_path / "in", seed=71, series=2, images=6, size=64)
    assert store_files(server.dicom_port, files) == [0] * len(files)
    study = str(dcmread(files[0]).StudyInstanceUID)
    browser.get(f"{server.http_url}/app/viewer?study={study}")
    WebDriverWait(browser, 20).until(lambda d: urlsplit(d.current_url).path == "/app/login")
    browser.find_element(By.ID, "name").send_keys("reader")
    browser.find_element(By.ID, "password").send_keys("reader-password", Keys.ENTER)
    wait_js(browser, "location.pathname === '/app/viewer' && window.pacsViewer && pacsViewer.ready")
    all_loaded(browser)
    assert browser.execute_script(CANVAS_STATS, 0)["std"] > 5
    # Every thumbnail arrived (an <img> sends the cookie too).
    wait_js(browser, "[...document.querySelectorAll('#series-list img')].length === 2 && "
                  "[...document.querySelectorAll('#series-list img')].every("
                  "i => i.complete && i.naturalWidth > 0)")
    assert js(browser, "document.getElementById('btn-delete-study').classList"
                       ".contains('hidden')")
    assert not [e for e in browser_errors(browser) if "favicon" not in e]
