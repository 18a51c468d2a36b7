"""Who sees what (issue 22): labels on studies (by hand, by the API, by a [[labels]] rule on
ingest), [[groups]] that limit users and nodes to studies by label, referring physician or
source AE title, and share links. A restricted user or node sees and fetches only its studies
through every interface: the pages (Chromium), the JSON API, DICOMweb (dicomweb-client),
WADO-URI, XML-RPC (xmlrpc.client), the ZIPs, the sends, and C-FIND / C-GET / C-MOVE
(pynetdicom); what it may not see answers as if it did not exist."""

from __future__ import annotations

import io
import time
import xmlrpc.client
import zipfile
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as FIND,
                                  StudyRootQueryRetrieveInformationModelMove as MOVE)
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from conftest import LOCAL, associate, c_find, pacsd_cmd, store_files, wait_for, write_config
from data import ct_slice
from test_retrieve import Destination
from pacsd.web.auth import hash_password

H = {"X-Requested-With": "pacsd"}
PASSWORDS = {"boss": "boss-pw", "teacher": "teacher-pw", "drsmith": "drsmith-pw",
             "reader": "reader-pw"}
USERS = [{"name": n, "password_hash": hash_password(p), "admin": n == "boss"}
         for n, p in PASSWORDS.items()]


def auth(name: str) -> tuple[str, str]:
    return name, PASSWORDS[name]


def write(folder: Path, patient: int, referring: str, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, n + 1):
        ds = ct_slice(seed=22, patient=patient, study=1, series=1, number=i, size=16)
        ds.ReferringPhysicianName = referring
        path = folder / f"p{patient}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Three studies: TEACH (sent by TEACHSRC: labelled "teaching" on ingest), SMITH (referred
    by Dr Smith), OTHER (neither). Group "teach": user teacher and node WARD, label teaching;
    group "refs": user drsmith, referring SMITH^*, may share. reader is in no group."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("visibility")
    ward = Destination(aet="WARD")
    cfg = config.load(write_config(
        tmp / "c.toml", tmp / "data", users=USERS,
        nodes=[{"name": "ward", "aet": "WARD", "host": LOCAL, "port": ward.port},
               {"name": "teachsrc", "aet": "TEACHSRC", "host": LOCAL, "port": 104}],
        groups=[{"name": "teach", "users": ["teacher"], "nodes": ["ward"],
                 "labels": ["teaching"]},
                {"name": "refs", "users": ["drsmith"], "referring": ["SMITH^*"],
                 "share": True}],
        labels=[{"label": "teaching", "calling_aet": ["TEACHSRC"]}]), env={})
    server = Server(cfg).start()
    files = {"TEACH": write(tmp / "in", 1, "Jones^Ann"),
             "SMITH": write(tmp / "in", 2, "Smith^John"),
             "OTHER": write(tmp / "in", 3, "Referrer^Rita")}
    assert store_files(server.dicom_port, files["TEACH"], aet="TEACHSRC") == [0, 0]
    assert store_files(server.dicom_port, files["SMITH"] + files["OTHER"]) == [0] * 4
    server.files = files
    server.uid = {k: str(dcmread(v[0]).StudyInstanceUID) for k, v in files.items()}
    server.sop = {k: str(dcmread(v[0]).SOPInstanceUID) for k, v in files.items()}
    server.series = {k: str(dcmread(v[0]).SeriesInstanceUID) for k, v in files.items()}
    server.ward = ward
    server.cfg_file = tmp / "c.toml"
    yield server
    server.stop()
    ward.close()


def api(pacs, who: str, path: str, **kw) -> requests.Response:
    return requests.get(f"{pacs.http_url}/api/{path}", auth=auth(who), timeout=30, **kw)


def listed(pacs, who: str, **params) -> set[str]:
    rsp = api(pacs, who, "studies", params=params)
    assert rsp.status_code == 200, rsp.text
    return {s["study_uid"] for s in rsp.json()["studies"]}


# --- the JSON API, labels ----------------------------------------------------------------------

def test_json_api_shows_each_user_their_studies(pacs):
    uid = pacs.uid
    assert listed(pacs, "boss") == set(uid.values())
    assert listed(pacs, "reader") == set(uid.values())   # in no group: everything
    assert listed(pacs, "teacher") == {uid["TEACH"]}       # labelled on ingest
    assert listed(pacs, "drsmith") == {uid["SMITH"]}       # referring physician
    assert listed(pacs, "boss", label="teaching") == {uid["TEACH"]}
    assert api(pacs, "teacher", f"studies/{uid['TEACH']}").json()["labels"] == ["teaching"]
    for hidden in ("SMITH", "OTHER"):
        assert api(pacs, "teacher", f"studies/{uid[hidden]}").status_code == 404
        assert api(pacs, "teacher", f"instances/{pacs.sop[hidden]}/tags").status_code == 404
    assert api(pacs, "teacher", f"instances/{pacs.sop['TEACH']}/tags").status_code == 200
    # Query/Retrieve from other nodes is not for restricted users.
    assert api(pacs, "teacher", "nodes/ward/studies").status_code == 403


def test_labels_by_hand_widen_and_narrow_a_group(pacs):
    uid = pacs.uid["OTHER"]
    url = f"{pacs.http_url}/api/studies/{uid}/labels"
    assert requests.post(url, json={"add": ["teaching"]}, headers=H, auth=auth("teacher"),
                         timeout=30).status_code == 403   # administrators only
    assert requests.post(url, json={"add": ["no<html>"]}, headers=H, auth=auth("boss"),
                         timeout=30).status_code == 400
    assert requests.post(url, json={"add": ["teaching"]}, auth=auth("boss"),
                         timeout=30).status_code == 403   # no CSRF proof
    rsp = requests.post(url, json={"add": ["teaching", "2024 cases"]}, headers=H,
                        auth=auth("boss"), timeout=30)
    assert rsp.status_code == 200 and rsp.json()["labels"] == ["2024 cases", "teaching"]
    assert uid in listed(pacs, "teacher")
    assert c_find_as(pacs, "WARD", StudyInstanceUID=uid) == [uid]
    rsp = requests.post(url, json={"remove": ["teaching", "2024 cases"]}, headers=H,
                        auth=auth("boss"), timeout=30)
    assert rsp.json()["labels"] == []
    assert uid not in listed(pacs, "teacher")
    assert c_find_as(pacs, "WARD", StudyInstanceUID=uid) == []


def test_labels_from_the_command_line(pacs):
    import subprocess
    uid = pacs.uid["SMITH"]
    out = subprocess.run(pacsd_cmd("study", "label", uid, "--add", "teaching", "--config",
                                   str(pacs.cfg_file)), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "teaching" in out.stdout
    try:
        assert uid in listed(pacs, "teacher")
    finally:
        subprocess.run(pacsd_cmd("study", "label", uid, "--remove", "teaching", "--config",
                                 str(pacs.cfg_file)), check=True, capture_output=True,
                       timeout=60)
    assert uid not in listed(pacs, "teacher")
    bad = subprocess.run(pacsd_cmd("study", "label", uid, "--add", "x" * 80, "--config",
                                   str(pacs.cfg_file)), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "not a label" in bad.stderr


# --- ZIP and send -----------------------------------------------------------------------------

def test_zip_and_send_only_what_the_user_sees(pacs):
    uid = pacs.uid
    rsp = api(pacs, "teacher", f"studies/{uid['TEACH']}/zip")
    assert rsp.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(rsp.content)).namelist()
    assert sum(not n.endswith("DICOMDIR") for n in names if not n.endswith("/")) == 2
    assert api(pacs, "teacher", f"studies/{uid['OTHER']}/zip").status_code == 404
    assert api(pacs, "teacher", f"series/{pacs.series['OTHER']}/zip").status_code == 404
    send = f"{pacs.http_url}/api/studies/{uid['OTHER']}/send"
    assert requests.post(send, json={"node": "ward"}, headers=H, auth=auth("teacher"),
                         timeout=30).status_code == 404
    assert pacs.ward.received == {}


# --- DICOMweb and WADO-URI -------------------------------------------------------------------

def test_dicomweb_searches_and_retrieves_only_the_users_studies(pacs):
    s = requests.Session()
    s.auth = auth("teacher")
    client = DICOMwebClient(url=pacs.http_url + "/dicom-web", session=s)
    found = {r["0020000D"]["Value"][0] for r in client.search_for_studies()}
    assert found == {pacs.uid["TEACH"]}
    assert client.search_for_instances(study_instance_uid=pacs.uid["OTHER"]) == []
    assert len(client.retrieve_study(pacs.uid["TEACH"])) == 2
    for path in (f"studies/{pacs.uid['OTHER']}",
                 f"studies/{pacs.uid['OTHER']}/metadata",
                 f"studies/{pacs.uid['OTHER']}/series/{pacs.series['OTHER']}/instances/"
                 f"{pacs.sop['OTHER']}/rendered"):
        rsp = s.get(f"{pacs.http_url}/dicom-web/{path}", timeout=30)
        assert rsp.status_code == 404, path
    # The viewer's batched pixels too.
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    for key, expected in (("TEACH", 200), ("OTHER", 404)):
        rsp = s.get(f"{pacs.http_url}/dicom-web/studies/{pacs.uid[key]}/series/"
                    f"{pacs.series[key]}/pixels", params={"instances": pacs.sop[key]},
                    headers=accept, timeout=30)
        assert rsp.status_code == expected, key


def test_wado_uri_serves_only_the_users_objects(pacs):
    def wado(who: str, key: str) -> int:
        return requests.get(f"{pacs.http_url}/wado", auth=auth(who), timeout=30, params={
            "requestType": "WADO", "studyUID": pacs.uid[key], "seriesUID": pacs.series[key],
            "objectUID": pacs.sop[key], "contentType": "application/dicom"}).status_code
    assert wado("teacher", "TEACH") == 200
    assert wado("teacher", "OTHER") == 404
    assert wado("drsmith", "SMITH") == 200
    assert wado("drsmith", "TEACH") == 404
    assert wado("reader", "OTHER") == 200


# --- XML-RPC ----------------------------------------------------------------------------------

def test_xmlrpc_finds_only_the_users_studies(pacs):
    def find(who: str) -> set[str]:
        host = pacs.http_url.split("://", 1)[1]
        proxy = xmlrpc.client.ServerProxy(f"http://{who}:{PASSWORDS[who]}@{host}/RPC2")
        answer = proxy.DBWindowFind({"request": "studyInstanceUID != ''", "table": "Study",
                                     "execute": "Nothing"})
        return {e["studyInstanceUID"] for e in answer.get("elements", [])}
    assert find("teacher") == {pacs.uid["TEACH"]}
    assert find("drsmith") == {pacs.uid["SMITH"]}
    assert find("reader") == set(pacs.uid.values())


# --- the pages --------------------------------------------------------------------------------

def test_study_list_page_shows_only_the_users_studies(pacs, browser):
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(pacs.http_url + "/app/login")
    browser.find_element("id", "name").send_keys("teacher")
    browser.find_element("id", "password").send_keys(PASSWORDS["teacher"] + "\n")

    def rows(d):
        return d.execute_script(
            "return [...document.querySelectorAll('#studies tbody tr[data-uid]')]"
            ".map(tr => tr.dataset.uid)")
    WebDriverWait(browser, 20).until(lambda d: rows(d))
    assert rows(browser) == [pacs.uid["TEACH"]]
    # The viewer of a study beyond the scope gets nothing of it.
    browser.get(f"{pacs.http_url}/app/viewer?study={pacs.uid['OTHER']}")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "return document.readyState") == "complete")
    names = browser.execute_script("return document.body.innerText")
    assert "Patient003" not in names


# --- DICOM nodes ------------------------------------------------------------------------------

def c_find_as(pacs, aet: str, level: str = "STUDY", **keys) -> list[str]:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.StudyInstanceUID = keys.pop("StudyInstanceUID", "")
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(pacs.dicom_port, [build_context(FIND)], aet=aet) as assoc:
        out = list(assoc.send_c_find(q, FIND))
    assert out[-1][0].Status == 0x0000
    return sorted(str(ds.StudyInstanceUID) for st, ds in out if ds is not None
                  and st.Status in (0xFF00, 0xFF01))


def test_a_node_finds_and_retrieves_only_its_groups_studies(pacs):
    assert c_find_as(pacs, "WARD") == [pacs.uid["TEACH"]]
    status, matches = c_find(pacs.dicom_port, "STUDY", StudyInstanceUID="")
    assert status == 0 and len(matches) == 3   # PYNETDICOM is in no group

    def move_as(aet: str, key: str) -> tuple[int, int]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = pacs.uid[key]
        with associate(pacs.dicom_port, [build_context(MOVE)], aet=aet) as assoc:
            final = list(assoc.send_c_move(q, "WARD", MOVE))[-1][0]
        return int(final.Status), int(final.get("NumberOfCompletedSuboperations", 0))
    pacs.ward.received.clear()
    assert move_as("WARD", "OTHER") == (0, 0)
    assert pacs.ward.received == {}
    assert move_as("WARD", "TEACH") == (0, 2)
    assert set(pacs.ward.received) == {str(dcmread(f).SOPInstanceUID)
                                       for f in pacs.files["TEACH"]}


def test_c_get_of_a_node_gets_only_its_groups_studies(pacs):
    from pydicom.dataset import Dataset as DS
    from pynetdicom import evt
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    got: dict[str, bytes] = {}

    def on_store(event):
        got[str(event.request.AffectedSOPInstanceUID)] = b""
        return 0x0000
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    for key, expected in (("OTHER", 0), ("TEACH", 2)):
        q = DS()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = pacs.uid[key]
        got.clear()
        with associate(pacs.dicom_port,
                       [build_context(GET), build_context(CTImageStorage,
                                                          [ExplicitVRLittleEndian])],
                       aet="WARD", ext_neg=[role],
                       evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            final = list(assoc.send_c_get(q, GET))[-1][0]
        assert int(final.Status) == 0
        assert len(got) == expected, key


# --- share links ------------------------------------------------------------------------------

def make_link(pacs, who: str, key: str, **body) -> requests.Response:
    return requests.post(f"{pacs.http_url}/api/studies/{pacs.uid[key]}/share", json=body,
                         headers=H, auth=auth(who), timeout=30)


def test_a_share_link_shows_one_study_read_only_until_revoked(pacs):
    assert make_link(pacs, "teacher", "TEACH").status_code == 403   # not a sharing group
    assert make_link(pacs, "drsmith", "OTHER").status_code == 404   # beyond drsmith's scope
    rsp = make_link(pacs, "drsmith", "SMITH", hours=2, note="for Dr Who")
    assert rsp.status_code == 201, rsp.text
    link = rsp.json()
    assert link["url"].endswith("/share/" + link["token"]) and not link["pin"]

    holder = requests.Session()
    opened = holder.get(link["url"], timeout=30, allow_redirects=False)
    assert opened.status_code == 303
    assert opened.headers["Location"].endswith(f"/app/viewer?study={pacs.uid['SMITH']}")
    assert "pacsd_share" in holder.cookies
    base = pacs.http_url
    assert holder.get(f"{base}/api/studies/{pacs.uid['SMITH']}", timeout=30).status_code == 200
    assert holder.get(f"{base}/api/studies/{pacs.uid['OTHER']}", timeout=30).status_code == 404
    assert holder.get(f"{base}/api/studies/{pacs.uid['SMITH']}/zip",
                      timeout=30).status_code == 200
    dw = holder.get(f"{base}/dicom-web/studies/{pacs.uid['SMITH']}/metadata", timeout=30)
    assert dw.status_code == 200 and len(dw.json()) == 2
    assert holder.get(f"{base}/dicom-web/studies/{pacs.uid['TEACH']}/metadata",
                      timeout=30).status_code == 404
    assert holder.get(f"{base}/api/studies", timeout=30).status_code == 401   # no list
    assert holder.get(f"{base}/api/nodes", timeout=30).status_code == 401
    assert holder.post(f"{base}/api/studies/{pacs.uid['SMITH']}/send", json={"node": "ward"},
                       headers=H, timeout=30).status_code == 403
    assert holder.delete(f"{base}/api/studies/{pacs.uid['SMITH']}", headers=H,
                         timeout=30).status_code == 403
    # The maker lists it (with its use) and revokes it; the holder is out at once.
    mine = requests.get(f"{base}/api/shares", params={"study": pacs.uid["SMITH"]},
                        auth=auth("drsmith"), timeout=30).json()
    entry = next(s for s in mine if s["id"] == link["id"])
    assert entry["uses"] == 1 and entry["note"] == "for Dr Who" and "token_hash" in entry
    assert requests.get(f"{base}/api/shares", auth=auth("reader"),
                        timeout=30).status_code == 403
    rsp = requests.post(f"{base}/api/shares/{link['id']}/revoke", headers=H,
                        auth=auth("drsmith"), timeout=30)
    assert rsp.status_code == 200 and rsp.json()["revoked"] is True
    assert holder.get(f"{base}/api/studies/{pacs.uid['SMITH']}", timeout=30).status_code == 401
    assert requests.get(link["url"], timeout=30, allow_redirects=False).status_code == 404
    # Housekeeping forgets ended links after a while (a month); here: ended before tomorrow.
    from pacsd.storage.housekeeping import ENDED_SHARES_KEPT_S
    assert pacs.index.forget_shares(time.time() + 86400) >= 1
    assert ENDED_SHARES_KEPT_S >= 86400
    assert link["id"] not in {s["id"] for s in requests.get(
        f"{base}/api/shares", auth=auth("boss"), timeout=30).json()}


def test_a_share_link_expires_and_asks_its_pin(pacs):
    rsp = make_link(pacs, "boss", "OTHER", hours=1.5 / 3600, pin="4321")
    assert rsp.status_code == 201
    link = rsp.json()
    holder = requests.Session()
    landing = holder.get(link["url"], timeout=30, allow_redirects=False)
    assert landing.status_code == 200 and 'id="pin-form"' in landing.text
    assert "pacsd_share" not in holder.cookies
    wrong = holder.post(link["url"], json={"pin": "0000"}, headers=H, timeout=30)
    assert wrong.status_code == 401
    assert holder.post(link["url"], json={"pin": "4321"}, timeout=30).status_code == 403
    right = holder.post(link["url"], json={"pin": "4321"}, headers=H, timeout=30)
    assert right.status_code == 200, right.text
    assert right.json()["next"].endswith(f"study={pacs.uid['OTHER']}")
    study = f"{pacs.http_url}/api/studies/{pacs.uid['OTHER']}"
    assert holder.get(study, timeout=30).status_code == 200
    cookie = holder.cookies["pacsd_share"]
    wait_for(lambda: requests.get(link["url"], timeout=30,
                                  allow_redirects=False).status_code == 404, 10,
             "the link to expire")
    # The server refuses the link's cookie itself, whatever the browser still keeps.
    late = requests.get(study, cookies={"pacsd_share": cookie}, timeout=30)
    assert late.status_code == 401


def test_a_share_link_opens_the_viewer_in_the_browser(pacs, browser):
    from pagejs import js, wait
    link = make_link(pacs, "drsmith", "SMITH", hours=1, pin="2468").json()
    browser.get(link["url"])
    wait(browser, "document.getElementById('pin-form') !== null")
    browser.find_element("id", "pin").send_keys("2468\n")
    wait(browser, "window.pacsViewer && window.pacsViewer.ready")
    assert js(browser, "location.pathname + location.search").endswith(
        f"/app/viewer?study={pacs.uid['SMITH']}")
    wait(browser, "window.pacsViewer.loaded === window.pacsViewer.total "
                  "&& window.pacsViewer.total === 2")
    # Read only: no sending, no sharing, no corrections for the holder.
    hidden = js(browser, "['send-group', 'btn-share', 'btn-edit-study', 'btn-delete-study']"
                         ".map(id => document.getElementById(id).offsetParent === null)")
    assert hidden == [True, True, True, True]
    assert js(browser, "document.title").startswith("Test")   # the shared patient's name


def test_share_pin_guessing_is_throttled(pacs):
    link = make_link(pacs, "boss", "TEACH", hours=1, pin="98765").json()
    s = requests.Session()
    codes = [s.post(link["url"], json={"pin": f"{i:04d}"}, headers=H, timeout=30).status_code
             for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[-1] == 429
    # Even the right PIN, while throttled.
    assert s.post(link["url"], json={"pin": "98765"}, headers=H,
                  timeout=30).status_code == 429
