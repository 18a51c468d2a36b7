"""The Worklist page (static/worklist.html, worklist.js) in a real headless Chromium against a real
pacsd: a day's items under a tab per modality, one added through the form (the API's 400 shown
in it), edited, its label printed (Code 128 of the accession, read back here), cancelled; the
MPPS state and the study of an item on the page, and the order of a study in the viewer."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from pydicom import dcmread
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import LOCAL, browser_errors, dcmtk, run_peer, store_files
from data import ct_slice

H = {"X-Requested-With": "pacsd"}
DAY = "20261208"
TIMEOUT = 20
# Code 128 (ISO/IEC 15417 Table 1): each symbol's bar and space widths, values 0 to 106.
CODE128 = (
    "212222 222122 222221 121223 121322 131222 122213 122312 132212 221213 221312 231212 112232 "
    "122132 122231 113222 123122 123221 223211 221132 221231 213212 223112 312131 311222 321122 "
    "321221 312212 322112 322211 212123 212321 232121 111323 131123 131321 112313 132113 132311 "
    "211313 231113 231311 112133 112331 132131 113123 113321 133121 313121 211331 231131 213113 "
    "213311 213131 311123 311321 331121 312113 312311 332111 314111 221411 431111 111224 111422 "
    "121124 121421 141122 141221 112214 112412 122114 122411 142112 142211 241211 221114 413111 "
    "241112 134111 111242 121142 121241 114212 124112 124211 411212 421112 421211 212141 214121 "
    "412121 111143 111341 131141 114113 114311 411113 411311 113141 114131 311141 411131 211412 "
    "211214 211232 2331112").split()


def wait(drv, cond, message: str = ""):
    return WebDriverWait(drv, TIMEOUT, poll_frequency=0.05).until(lambda d: cond(d), message)


def js(drv, expression: str, *args):
    return drv.execute_script(f"return ({expression});", *args)


def rows(drv) -> list[dict]:
    return js(drv, """[...document.querySelectorAll('#worklist tbody tr[data-id]')].map(tr => ({
        id: tr.dataset.id, time: tr.cells[0].textContent.trim(),
        patient: tr.cells[1].textContent.trim(), pid: tr.cells[2].textContent.trim(),
        procedure: tr.querySelector('.proc').textContent.trim(), status: tr.cells[8].textContent.trim(),
        study: (tr.querySelector('a.open-study') || {}).href || '',
        cancel: !!tr.querySelector('button[data-act=cancel]')}))""")


def loaded(drv, before: str) -> str:
    """Wait for a load of the list after `before` (body[data-loaded] counts them)."""
    return wait(drv, lambda d: (lambda n: n if n and n != before else None)(
        js(d, "document.body.dataset.loaded")), "the list never reloaded")


def click(drv, css: str) -> None:
    drv.find_element(By.CSS_SELECTOR, css).click()


def row_button(drv, item_id: str, act: str) -> None:
    click(drv, f'#worklist tr[data-id="{item_id}"] button[data-act="{act}"]')


def fill(drv, values: dict[str, str]) -> None:
    """The form's fields by column: typed, or set (date and time inputs, selects)."""
    for col, value in values.items():
        el = drv.find_element(By.ID, f"f-{col}")
        if el.tag_name == "select":
            Select(el).select_by_value(value)
        elif el.get_attribute("type") in ("date", "time"):
            js(drv, "arguments[0].value = arguments[1]", el, value)
        else:
            el.clear()
            el.send_keys(value)


def decode_code128(drv, css: str) -> str:
    """The text of the Code 128 barcode drawn at `css`, read from its bars' positions."""
    bars = js(drv, f"""[...document.querySelectorAll('{css} rect')].map(r =>
        [Number(r.getAttribute('x')), Number(r.getAttribute('width'))])""")
    modules = [0] * (bars[-1][0] + bars[-1][1])
    for x, w in bars:
        modules[x:x + w] = [1] * w
    modules = modules[bars[0][0]:]
    runs, n = [], 1
    for a, b in zip(modules, modules[1:]):
        if a == b:
            n += 1
        else:
            runs.append(n)
            n = 1
    runs.append(n)
    widths = "".join(map(str, runs))
    symbols = [widths[i:i + 6] for i in range(0, len(widths) - 7, 6)] + [widths[-7:]]
    values = [CODE128.index(s) for s in symbols]
    assert values[-1] == 106, "no Stop symbol"
    start, data, check = values[0], values[1:-2], values[-2]
    assert check == (start + sum(i * v for i, v in enumerate(data, 1))) % 103, "bad check"
    if start == 105:   # code set C: two digits a symbol
        return "".join(f"{v:02d}" for v in data)
    assert start == 104
    return "".join(chr(v + 32) for v in data)


def worklist_query(server, tmp_path: Path, keys: dict[str, str]) -> list:
    """DCMTK findscu -W (a modality's worklist query): the items, read from its files."""
    out = tmp_path / f"mwl{len(list(tmp_path.glob('mwl*')))}"
    out.mkdir()
    args = [dcmtk("findscu"), "-W", "-aet", "FINDSCU", "-aec", "PACSD", "-X", "-od", str(out),
            "-k", "PatientID", "-k", "PatientName", "-k", "AccessionNumber",
            "-k", "RequestedProcedureDescription",
            "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    run_peer([*args, LOCAL, str(server.dicom_port)], timeout=30)
    return [dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def test_add_edit_label_and_cancel_on_the_page(make_server, browser, tmp_path):
    server = make_server()   # no [[users]]: open, on loopback
    url = server.http_url
    r = requests.post(f"{url}/api/worklist", headers=H, timeout=10, json={
        "PatientID": "WL-CT", "PatientName": "Doe^Jane", "Modality": "CT",
        "ScheduledProcedureStepStartDate": DAY, "ScheduledProcedureStepStartTime": "0900",
        "RequestedProcedureDescription": "CT head"})
    assert r.status_code == 201, r.text

    # Today by default, linked from the study list's navigation.
    browser.get(f"{url}/app/")
    wait(browser, lambda d: d.find_element(By.ID, "nav-worklist").is_displayed())
    before = date.today().isoformat()
    click(browser, "#nav-worklist")
    wait(browser, lambda d: js(d, "document.body.dataset.loaded"), "never loaded")
    assert js(browser, "document.getElementById('day').value") in {before, date.today().isoformat()}

    browser.get(f"{url}/app/worklist?day={DAY}")
    wait(browser, lambda d: len(rows(d)) == 1, "the CT item not listed")
    tabs = js(browser, "[...document.querySelectorAll('#tabs .tab')].map(t => t.textContent.trim())")
    assert tabs == ["All 1", "CT 1"]

    # Add: the API's refusal is shown in the form, which stays open.
    click(browser, "#add-btn")
    wait(browser, lambda d: js(d, "document.getElementById('item').open"))
    assert js(browser, "document.getElementById('f-start_date').value") == "2026-12-08"
    fill(browser, {"patient_name": "Roe^Rick", "patient_id": "WL-MR", "patient_sex": "M",
                   "patient_birth_date": "1975-03-04", "accession_number": "ACC777",
                   "requested_procedure_description": "MR knee", "modality": "MR",
                   "start_time": "08:15", "station_aet": "MR_1", "patient_weight": "heavy"})
    click(browser, "#item-save")
    wait(browser, lambda d: js(d, "document.getElementById('item-error').textContent")
         == "PatientWeight: a decimal number, not 'heavy'", "the 400 not shown in the form")
    assert js(browser, "document.getElementById('item').open")
    # The refused request is the console's only complaint (reading the log empties it).
    assert [e.split(" - ", 1)[1] for e in browser_errors(browser)] == [
        "Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    seen = js(browser, "document.body.dataset.loaded")
    fill(browser, {"patient_weight": "82.5"})
    click(browser, "#item-save")
    loaded(browser, seen)
    assert not js(browser, "document.getElementById('item').open")
    listed = rows(browser)
    assert [(x["time"], x["patient"], x["pid"]) for x in listed] == [
        ("08:15", "Roe, Rick", "WL-MR"), ("09:00", "Doe, Jane", "WL-CT")]
    mr = listed[0]["id"]
    made = requests.get(f"{url}/api/worklist/{mr}", timeout=10).json()
    assert (made["source"], made["patient_birth_date"], made["start_time"], made["patient_weight"]) == (
        "web", "19750304", "0815", "82.5")

    # Its modality's tab shows it alone; the URL keeps the tab.
    seen = js(browser, "document.body.dataset.loaded")
    click(browser, "#tab-MR")
    loaded(browser, seen)
    assert [x["pid"] for x in rows(browser)] == ["WL-MR"]
    assert parse_qs(urlsplit(browser.current_url).query) == {"day": [DAY], "modality": ["MR"]}

    # Edit.
    row_button(browser, mr, "edit")
    wait(browser, lambda d: js(d, "document.getElementById('item').open"))
    assert js(browser, "document.getElementById('f-patient_id').value") == "WL-MR"
    assert js(browser, "document.getElementById('f-start_time').value") == "08:15"
    seen = js(browser, "document.body.dataset.loaded")
    fill(browser, {"requested_procedure_description": "MR knee left"})
    click(browser, "#item-save")
    loaded(browser, seen)
    assert rows(browser)[0]["procedure"] == "MR knee left"
    assert requests.get(f"{url}/api/worklist/{mr}", timeout=10).json()[
        "requested_procedure_description"] == "MR knee left"

    # What the page and the API scheduled is what a modality's worklist query finds (DCMTK).
    sps = "ScheduledProcedureStepSequence[0]"
    by_station = worklist_query(server, tmp_path, {
        f"{sps}.ScheduledStationAETitle": "MR_1", f"{sps}.Modality": "MR",
        f"{sps}.ScheduledProcedureStepStartDate": "20261201-20261231", "PatientName": "roe*"})
    assert [(str(d.PatientID), str(d.PatientName), str(d.AccessionNumber),
             str(d.RequestedProcedureDescription),
             str(d.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime))
            for d in by_station] == [("WL-MR", "Roe^Rick", "ACC777", "MR knee left", "0815")]
    by_modality = worklist_query(server, tmp_path, {f"{sps}.Modality": "CT",
                                                    f"{sps}.ScheduledProcedureStepStartDate": DAY})
    assert [str(d.PatientID) for d in by_modality] == ["WL-CT"]

    # The label: a print-only view, printed with window.print().
    js(browser, "(window.printed = 0, window.print = () => { window.printed += 1; }, 1)")
    row_button(browser, mr, "label")
    wait(browser, lambda d: js(d, "window.printed") == 1, "window.print() not called")
    label = js(browser, "document.getElementById('label').innerText || "
                        "document.getElementById('label').textContent")
    for part in ("Roe, Rick", "ID WL-MR", "1975-03-04 M", "MR · MR knee left",
                 "2026-12-08 08:15 · MR_1", "ACC777"):
        assert part in label, (part, label)
    assert js(browser, "getComputedStyle(document.getElementById('label')).display") == "none"
    assert js(browser, "document.body.classList.contains('printing-label')")
    assert decode_code128(browser, "#label-bars") == "ACC777"

    # Cancel, once confirmed.
    seen = js(browser, "document.body.dataset.loaded")
    row_button(browser, mr, "cancel")
    wait(browser, lambda d: js(d, "document.getElementById('confirm').open"))
    assert "MR knee left of Roe, Rick (WL-MR)" in js(
        browser, "document.getElementById('confirm-text').textContent")
    click(browser, "#confirm-yes")
    loaded(browser, seen)
    got = rows(browser)[0]
    assert got["status"].startswith("cancelled") and not got["cancel"]
    assert requests.get(f"{url}/api/worklist/{mr}", timeout=10).json()["status"] == "CANCELED"

    # Another day, and back.
    seen = js(browser, "document.body.dataset.loaded")
    click(browser, "#next-day")
    seen = loaded(browser, seen)
    assert rows(browser) == [] and "Nothing scheduled for MR on 2026-12-09" in js(
        browser, "document.querySelector('#worklist tbody').textContent")
    click(browser, "#prev-day")
    loaded(browser, seen)
    assert [x["pid"] for x in rows(browser)] == ["WL-MR"]
    assert browser_errors(browser) == []


def test_the_mpps_state_and_the_study_on_the_page_and_in_the_viewer(make_server, browser,
                                                                      tmp_path):
    server = make_server()
    url = server.http_url
    ds = ct_slice(seed=24, patient=1, study=1, series=1, number=1, size=16)
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert store_files(server.dicom_port, [path]) == [0]
    study = str(dcmread(path).StudyInstanceUID)
    r = requests.post(f"{url}/api/worklist", headers=H, timeout=10, json={
        "PatientID": str(ds.PatientID), "PatientName": str(ds.PatientName), "Modality": "CT",
        "ScheduledProcedureStepStartDate": DAY, "AccessionNumber": "ACC-V",
        "RequestedProcedureDescription": "CT chest", "StudyInstanceUID": study})
    item = r.json()
    server.index.put_performed(
        {"sop_instance_uid": "1.2.826.0.1.3680043.10.1.24", "status": "COMPLETED",
         "calling_aet": "CT_1", "step": item["id"], "study_instance_uid": study,
         "series": str(ds.SeriesInstanceUID), "images": 1},
        step_status=(item["id"], "COMPLETED"))

    browser.get(f"{url}/app/worklist?day={DAY}")
    wait(browser, lambda d: len(rows(d)) == 1, "the item not listed")
    got = rows(browser)[0]
    assert got["status"] == "completedMPPS: completed 1 series, 1 imagesOpen study"
    assert got["study"] == f"{url}/app/viewer?study={study}"

    click(browser, "a.open-study")
    wait(browser, lambda d: js(d, "(document.getElementById('study-order') || {}).textContent"),
         "no order in the viewer's study info")
    said = [" ".join(js(browser, f"document.querySelector('#study-order .{part}').textContent")
                     .split()) for part in ("order", "mpps")]
    assert said == ["Order ACC-V · CT chest · completed worklist",
                    "MPPS completed: 1 series, 1 images (CT_1)"]
    href = js(browser, "document.querySelector('#study-order a').getAttribute('href')")
    assert href == f"worklist?day={DAY}&modality=CT"
    assert browser_errors(browser) == []
