"""Upload from the browser and "open in another viewer" (issue 22, items 5 and 6), against a
real pacsd: a patient CD (a DICOMDIR tree written by pydicom's FileSet, plus the kind of file a
CD carries besides its images) and ZIP archives uploaded in a real headless Chromium through
the study list's folder and file pickers and real drops (a ZIP in Firefox too); what came in
seen by pynetdicom's C-FIND and fetched back byte for byte. Weasis's manifest parsed as XML and
its WADO URLs fetched with requests as Weasis builds them, the study token good for its study
only and for a while only; the OHIF link shown when `[http] ohif_url` is set and only then.
"""

from __future__ import annotations

import io
import struct
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
from conftest import LOCAL, browser_errors, c_find, serve, store_files, write_config
from data import dataset_bytes, write_series
from pagejs import js, wait
from pydicom import dcmread
from pydicom.fileset import FileSet

from pacsd.web.auth import Sessions, hash_password

pytestmark = pytest.mark.timeout(180)

OHIF = "https://ohif.example.org/pacs"
BOB = {"name": "bob", "password_hash": hash_password("bob-secret"), "admin": False}
NS = {"w": "http://www.weasis.org/xsd/2.5"}
README = b"This CD holds the images of your examination.\r\nOpen VIEWER.EXE to see them.\r\n"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A server with one user (no administrator rights: any user may upload) and an OHIF URL."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("upload")
    admin = {"name": "root", "password_hash": hash_password("root-secret"), "admin": True}
    cfg = config.load(write_config(tmp / "c.toml", tmp / "data", users=[admin, BOB],
                                   http={"ohif_url": OHIF + "/"}), env={})
    server = Server(cfg).start()
    server.tmp = tmp
    yield server
    server.stop()


def session(pacs) -> requests.Session:
    s = requests.Session()
    r = s.post(pacs.http_url + "/app/login", json={"name": "bob", "password": "bob-secret"},
               timeout=10)
    assert r.status_code == 200, r.text
    return s


def logged_in(browser, pacs, path: str = "") -> None:
    """The study list (or another page) in Chromium with bob's session cookie."""
    browser.get(pacs.http_url + "/app/login")
    browser.add_cookie({"name": Sessions.COOKIE, "value": session(pacs).cookies[Sessions.COOKIE],
                        "path": "/"})
    browser.get(pacs.http_url + "/app/" + path)
    wait(browser, "document.querySelector('#range') && "
                  "document.querySelector('#range').textContent !== ''")


def cd_tree(folder: Path, seed: int) -> tuple[Path, list[Path]]:
    """A patient CD: two studies of two images in a DICOMDIR tree (pydicom's FileSet), and a
    README beside them. The tree and the image files in it."""
    src = write_series(folder / "src", seed=seed, patients=1, studies=2, images=2, size=16)
    fs = FileSet()
    for p in src:
        fs.add(dcmread(p))
    root = folder / "CD"
    fs.write(root)
    (root / "README.TXT").write_bytes(README)
    images = [p for p in root.rglob("*") if p.is_file() and p.name not in ("DICOMDIR",
                                                                             "README.TXT")]
    assert len(images) == 4 and (root / "DICOMDIR").is_file()
    return root, images


def results(browser) -> dict[str, tuple[str, str]]:
    """The upload's per-file rows as shown: name -> (result, details)."""
    rows = js(browser, """[...document.querySelectorAll('#upload-results tbody tr')].map(tr =>
        [tr.querySelector('.name').textContent, tr.querySelector('.badge').textContent,
         tr.querySelector('.reason').textContent])""")
    return {name: (status, reason) for name, status, reason in rows}


def drop(browser, paths: list[Path]) -> None:
    """Drag files or folders from the desktop and drop them on the study list."""
    data = {"items": [], "files": [str(p) for p in paths], "dragOperationsMask": 1}
    x, y = js(browser, "(r => [r.x + r.width / 2, r.y + r.height / 2])("
                       "document.querySelector('#studies').getBoundingClientRect())")
    for kind in ("dragEnter", "dragOver", "drop"):
        browser.execute_cdp_cmd("Input.dispatchDragEvent",
                                {"type": kind, "x": x, "y": y, "data": data})


def finished(browser, timeout: float = 30) -> None:
    wait(browser, "window.pacsUpload && pacsUpload.state.finished", timeout)


def stored_bytes(pacs, sess: requests.Session, study: str, series: str, sop: str) -> bytes:
    r = sess.get(pacs.http_url + "/wado", timeout=10, params={
        "requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop,
        "contentType": "application/dicom"})
    assert r.status_code == 200, r.text[:200]
    return dataset_bytes_of(r.content)


def dataset_bytes_of(part10: bytes) -> bytes:
    """The bytes after the File Meta group of a Part 10 file in memory."""
    end = 132 + 12 + struct.unpack("<I", part10[140:144])[0]   # (0002,0000) group length
    return part10[end:]


# --- upload -----------------------------------------------------------------------------------

def test_a_cd_folder_uploaded_in_chromium_stores_its_images_as_they_are(pacs, browser):
    root, images = cd_tree(pacs.tmp / "cd", seed=71)
    logged_in(browser, pacs)
    # A real drop of the CD's folder on the list (Chromium's DevTools protocol drags it in as
    # the desktop would): the page walks the folder's entries.
    drop(browser, [root])
    finished(browser)
    shown = results(browser)
    assert len(shown) == 6, shown
    assert shown["CD/DICOMDIR"][0] == "skipped" and "DICOMDIR" in shown["CD/DICOMDIR"][1]
    assert shown["CD/README.TXT"] == ("skipped", "not a DICOM file (no DICM at offset 128)")
    assert {n: shown[n][0] for n in shown if "/PT" in n} == {
        str(p.relative_to(root.parent)): "stored" for p in images}
    assert js(browser, "pacsUpload.state.counts") == {"stored": 4, "duplicate": 0,
                                                      "skipped": 2, "failed": 0}
    bar = js(browser, "[document.querySelector('#upload-progress').value, "
                      "document.querySelector('#upload-progress').max]")
    assert bar[0] == bar[1] > 0
    assert "6 of 6 files" in browser.find_element("id", "upload-summary").text
    # The list shows them at once (refreshed at the end of the upload).
    wait(browser, "document.querySelector('#range').textContent === '1–2 of 2'")

    # Seen by a DICOM client; each stored exactly as the CD holds it.
    patient = str(dcmread(images[0], stop_before_pixels=True).PatientID)
    status, found = c_find(pacs.dicom_port, "STUDY", PatientID=patient, StudyInstanceUID="")
    assert status == 0 and len(found) == 2
    sess = session(pacs)
    for path in images:
        ds = dcmread(path, stop_before_pixels=True)
        assert stored_bytes(pacs, sess, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                            ds.SOPInstanceUID) == dataset_bytes(path)[1]

    # The same CD again, picked with "Upload folder…" (webkitdirectory): every image already
    # there, said so, nothing stored twice.
    browser.find_element("id", "upload-folder").send_keys(str(root))
    wait(browser, "pacsUpload.state.finished && pacsUpload.state.counts.duplicate === 4")
    assert js(browser, "pacsUpload.state.counts.stored") == 0
    assert not browser_errors(browser)


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def bomb(path: Path) -> Path:
    """A ZIP whose one entry declares 1000 bytes and inflates to 20 MB."""
    zip_of(path, {"IMG0001.dcm": b"\0" * (20 << 20)})
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 1000)           # central directory: uncompressed size
    struct.pack_into("<I", data, 22, 1000)                # local header: the same
    path.write_bytes(bytes(data))
    return path


def test_zip_archives_are_unpacked_in_the_browser_and_a_zip_bomb_is_refused(pacs, browser):
    src = write_series(pacs.tmp / "zsrc", seed=72, patients=1, studies=1, images=3, size=16)
    cd, _ = cd_tree(pacs.tmp / "zcd", seed=73)
    members = {f"CD/IMAGES/IM{i}": p.read_bytes() for i, p in enumerate(src)}
    members["CD/DICOMDIR"] = (cd / "DICOMDIR").read_bytes()
    members["CD/AUTORUN.INF"] = b"[autorun]\r\nopen=viewer.exe\r\n"
    good = zip_of(pacs.tmp / "patient.zip", members)
    logged_in(browser, pacs)
    files = browser.find_element("id", "upload-files")
    files.send_keys(f"{good}\n{bomb(pacs.tmp / 'bomb.zip')}")
    finished(browser)
    shown = results(browser)
    assert shown["patient.zip/CD/DICOMDIR"][0] == "skipped"
    assert shown["patient.zip/CD/AUTORUN.INF"][0] == "skipped"
    assert [shown[f"patient.zip/CD/IMAGES/IM{i}"][0] for i in range(3)] == ["stored"] * 3
    status, reason = shown["bomb.zip/IMG0001.dcm"]
    assert status == "failed" and "inflates beyond the 1000 bytes" in reason, reason
    for p in src:
        ds = dcmread(p, stop_before_pixels=True)
        assert stored_bytes(pacs, session(pacs), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                            ds.SOPInstanceUID) == dataset_bytes(p)[1]

    # An archive of more entries than the page takes is refused whole, before anything is
    # sent (the page's bound lowered here so that the archive stays small).
    many = zip_of(pacs.tmp / "many.zip", {f"F{i:03d}": b"x" for i in range(12)})
    browser.execute_script("pacsUpload.limits.max_files = 10")
    files.send_keys(str(many))
    wait(browser, "pacsUpload.state.finished && pacsUpload.state.error")
    assert "many.zip: 12 entries, more than 10: refused" in js(browser, "pacsUpload.state.error")
    assert js(browser, "pacsUpload.state.results.length") == 0
    browser.execute_script("pacsUpload.limits.max_files = 10000")

    # Files and a ZIP dropped together go the same way.
    dropped = write_series(pacs.tmp / "drop", seed=74, patients=1, studies=1, images=2, size=16)
    small = zip_of(pacs.tmp / "one.zip", {"IM1": dropped[1].read_bytes()})
    drop(browser, [dropped[0], small])
    wait(browser, "pacsUpload.state.finished && pacsUpload.state.files === 2")
    assert js(browser, "pacsUpload.state.counts.stored") == 2
    assert set(results(browser)) == {dropped[0].name, "one.zip/IM1"}
    assert not browser_errors(browser)


def test_the_upload_route_is_bounded_and_guarded(pacs):
    """What a client other than the page may send: a non-DICOM part skipped, a broken one
    failed with its reason; no upload without a login or without X-Requested-With."""
    src = write_series(pacs.tmp / "api", seed=75, patients=1, studies=1, images=1, size=16)
    whole = src[0].read_bytes()
    meta_end = len(whole) - len(dataset_bytes(src[0])[1])
    # A data set cut short: an element whose length runs past the end.
    broken = whole[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\xff" * 64
    body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
                    for part in (whole, b"hello", broken))
    body += b"--b--\r\n"
    ctype = 'multipart/related; type="application/dicom"; boundary=b'
    url = pacs.http_url + "/api/upload"
    r = requests.post(url, data=body, headers={"Content-Type": ctype,
                                               "X-Requested-With": "x"}, timeout=10)
    assert r.status_code == 401                                         # not logged in
    sess = session(pacs)
    r = sess.post(url, data=body, headers={"Content-Type": ctype}, timeout=10)
    assert r.status_code == 403                                         # no X-Requested-With
    r = sess.post(url, data=body, headers={"Content-Type": ctype, "X-Requested-With": "x"},
                  timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["status"] for x in got["results"]] == ["stored", "skipped", "failed"]
    assert "missing" in got["results"][2]["reason"], got
    # More parts than one request takes: those within the bound answered, the rest refused.
    many = b"".join(b"--b\r\n\r\nhello\r\n" for _ in range(1001)) + b"--b--\r\n"
    r = sess.post(url, data=many, headers={"Content-Type": ctype, "X-Requested-With": "x"},
                  timeout=10)
    assert r.status_code == 200 and r.json()["truncated"] is True
    assert r.json()["skipped"] == len(r.json()["results"]) == 1000
    assert sess.get(url, timeout=10).json()["max_body_bytes"] == 1024 << 20


# --- other viewers ----------------------------------------------------------------------------

def weasis_urls(manifest: ET.Element) -> list[tuple[str, str]]:
    """(SOP Instance UID, URL) as Weasis builds them from a manifest 2.5 (LoadSeries:
    baseUrl?requestType=WADO&studyUID&seriesUID&objectUID&contentType + additionnalParameters)."""
    arc = manifest.find("w:arcQuery", NS)
    assert arc is not None and arc.get("requireOnlySOPInstanceUID") == "false"
    out = []
    for study in arc.iterfind("w:Patient/w:Study", NS):
        for series in study.iterfind("w:Series", NS):
            for inst in series.iterfind("w:Instance", NS):
                out.append((inst.get("SOPInstanceUID"),
                            f"{arc.get('baseUrl')}?requestType=WADO&studyUID="
                            f"{study.get('StudyInstanceUID')}&seriesUID="
                            f"{series.get('SeriesInstanceUID')}&objectUID="
                            f"{inst.get('SOPInstanceUID')}&contentType=application%2Fdicom"
                            f"{arc.get('additionnalParameters')}"))
    return out


def test_weasis_gets_a_manifest_and_wado_urls_good_for_that_study_only(pacs):
    files = write_series(pacs.tmp / "weasis", seed=76, patients=1, studies=2, images=3, size=16)
    assert store_files(pacs.dicom_port, files) == [0] * 6
    study_a, study_b = sorted({str(dcmread(p).StudyInstanceUID) for p in files})
    sess = session(pacs)
    r = sess.get(f"{pacs.http_url}/api/studies/{study_a}/weasis", allow_redirects=False,
                 timeout=10)
    assert r.status_code == 302
    launch = r.headers["Location"]
    assert launch.startswith("weasis://?")
    command = unquote(launch[len("weasis://?"):])
    assert command.startswith('$dicom:get -w "') and command.endswith('"')
    manifest_url = command[len('$dicom:get -w "'):-1]
    assert manifest_url == r.json()["manifest"]

    # Weasis has no cookie: the manifest and every WADO URL in it work with the token alone.
    r = requests.get(manifest_url, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/xml")
    manifest = ET.fromstring(r.content)
    assert manifest.tag == "{http://www.weasis.org/xsd/2.5}manifest"
    patient = manifest.find("w:arcQuery/w:Patient", NS)
    first = dcmread(files[0], stop_before_pixels=True)
    assert patient.get("PatientID") == first.PatientID
    assert manifest.find("w:arcQuery", NS).get("baseUrl") == pacs.http_url + "/wado"
    urls = weasis_urls(manifest)
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    in_a = {s for s, p in sources.items() if str(dcmread(p).StudyInstanceUID) == study_a}
    assert {sop for sop, _ in urls} == in_a
    for sop, url in urls:
        r = requests.get(url, timeout=10)
        assert r.status_code == 200, (url, r.status_code)
        assert dataset_bytes_of(r.content) == dataset_bytes(sources[sop])[1]

    # The token proves nothing for another study, another route, once expired, or altered.
    token = manifest_url.split("study_token=", 1)[1]
    b_file = next(p for p in files if str(dcmread(p).StudyInstanceUID) == study_b)
    b = dcmread(b_file, stop_before_pixels=True)
    wado_b = (f"{pacs.http_url}/wado?requestType=WADO&studyUID={study_b}&seriesUID="
              f"{b.SeriesInstanceUID}&objectUID={b.SOPInstanceUID}")
    key = bytes.fromhex(pacs.index.shared_value(Sessions.KEY, ""))
    bob = pacs.runtime.accounts.user("bob")
    expired = Sessions(key).study_token(bob, study_a, now=time.time() - 2 * 3600)
    sop_a, url_a = urls[0]
    for url in (wado_b + "&study_token=" + token,                       # another study
                f"{pacs.http_url}/api/studies/{study_b}/weasis.xml?study_token={token}",
                f"{pacs.http_url}/dicom-web/studies/{study_a}/metadata?study_token={token}",
                f"{pacs.http_url}/api/studies/{study_a}?study_token={token}",
                url_a.replace(token, expired),                          # expired
                url_a.replace(token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")),
                url_a.split("&study_token=")[0]):                       # none
        r = requests.get(url, timeout=10, allow_redirects=False)
        assert r.status_code == 401, (url, r.status_code)
    # A token for study A naming an object of study B under study A's UID finds nothing.
    r = requests.get(f"{pacs.http_url}/wado?requestType=WADO&studyUID={study_a}&seriesUID="
                     f"{b.SeriesInstanceUID}&objectUID={b.SOPInstanceUID}&study_token={token}",
                     timeout=10)
    assert r.status_code == 404


def test_the_ohif_and_weasis_links_in_the_list_and_the_viewer(pacs, browser):
    files = write_series(pacs.tmp / "links", seed=77, patients=1, studies=1, images=1, size=16)
    assert store_files(pacs.dicom_port, files) == [0]
    study = str(dcmread(files[0]).StudyInstanceUID)
    logged_in(browser, pacs, f"?patient_id={dcmread(files[0]).PatientID}")
    wait(browser, "document.querySelector('#range').textContent === '1–1 of 1' && "
                  "document.querySelector('td.open-in a.open-ohif')")
    links = js(browser, "[...document.querySelectorAll('td.open-in a')].map(a => a.href)")
    assert links == [f"{pacs.http_url}/api/studies/{study}/weasis",
                     f"{OHIF}/viewer?StudyInstanceUIDs={study}"]
    browser.get(f"{pacs.http_url}/app/viewer?study={study}")
    wait(browser, "!document.getElementById('open-ohif').classList.contains('hidden')")
    assert js(browser, "document.getElementById('open-weasis').href") == links[0]
    assert js(browser, "document.getElementById('open-ohif').href") == links[1]
    assert not browser_errors(browser)


def test_without_ohif_url_no_ohif_link_and_in_open_mode_no_token(tmp_path, browser):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "pacsd.toml", data)
    files = write_series(tmp_path / "in", seed=78, patients=1, studies=1, images=1, size=16)
    study = str(dcmread(files[0]).StudyInstanceUID)
    with serve(cfg, data) as p:
        assert store_files(p.port, files) == [0]
        browser.get(p.http_url + "/app/")
        wait(browser, "document.querySelector('td.open-in a.open-weasis')")
        assert js(browser, "document.querySelectorAll('a.open-ohif').length") == 0
        assert requests.get(p.http_url + "/api/viewers", timeout=10).json()["ohif_url"] is None
        r = requests.get(f"{p.http_url}/api/studies/{study}/weasis", allow_redirects=False,
                         timeout=10)
        assert r.status_code == 302 and "study_token" not in r.headers["Location"]
        manifest = ET.fromstring(requests.get(r.json()["manifest"], timeout=10).content)
        assert manifest.find("w:arcQuery", NS).get("additionnalParameters") == ""
        (sop, url), = weasis_urls(manifest)
        assert requests.get(url, timeout=10).status_code == 200
        assert requests.get(f"{p.http_url}/api/studies/1.2.3/weasis", allow_redirects=False,
                            timeout=10).status_code == 404
    assert LOCAL in p.http_url


def test_a_zip_and_a_file_uploaded_in_firefox(pacs, firefox):
    """Gecko: the file picker, DecompressionStream's deflate-raw, the same results."""
    src = write_series(pacs.tmp / "ff", seed=79, patients=1, studies=1, images=3, size=16)
    archive = zip_of(pacs.tmp / "ff.zip", {"A/IM1": src[0].read_bytes(),
                                           "A/IM2": src[1].read_bytes(), "A/NOTES.TXT": README})
    firefox.get(pacs.http_url + "/app/login")
    firefox.type("#name", "bob")
    firefox.type("#password", "bob-secret")
    firefox.js("document.getElementById('login-form').requestSubmit()")
    firefox.wait("return location.pathname.endsWith('/app/') && "
                 "document.querySelector('#range').textContent !== ''", message="logged in")
    # (Gecko's driver types only into a visible input: the picker's input shown for it)
    firefox.js("document.getElementById('upload-files').classList.remove('hidden')")
    firefox.type("#upload-files", f"{archive}\n{src[2]}")
    firefox.wait("return window.pacsUpload && window.pacsUpload.state.finished",
                 message="the upload ends")
    assert firefox.js("return window.pacsUpload.state.counts") == {"stored": 3, "duplicate": 0,
                                                            "skipped": 1, "failed": 0}
    for p in src:
        ds = dcmread(p, stop_before_pixels=True)
        assert stored_bytes(pacs, session(pacs), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                            ds.SOPInstanceUID) == dataset_bytes(p)[1]
