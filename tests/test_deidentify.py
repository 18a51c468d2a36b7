"""De-identified export (issue 22, item 4), checked attribute by attribute against PS3.15
Table E.1-1: a study whose CT series carries every attribute of the table that pydicom knows
(each with a value of its VR, and again inside a sequence item), private attributes, curve and
overlay data, goes out through the real server's ZIP route (Basic Profile; then with the Retain
Longitudinal Full Dates and Clean Descriptors options), through `pacsd export`, and through a
send to a second pacsd; each table row's action is then asserted on what came out.
"""

from __future__ import annotations

import copy
import io
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from conftest import LOCAL, pacsd_cmd, serve, store_files, wait_for, write_config
from data import ct_slice
from pacsd.imaging.deid_table import ROWS, SUPPLEMENT

H = {"X-Requested-With": "pacsd"}
NAME = "Doe^John"
SECRET = "Doe"          # in every identifying value: must be gone wherever the table says so
DATE = "20240315"
NOT_IN_A_DATA_SET = (0x0000, 0x0002, 0x0004, 0xFFFC)   # command, File Meta, DICOMDIR, padding
CORE = {"SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
        "PatientName", "PatientID", "StudyDate", "AccessionNumber", "Modality"}
KEPT_SEQUENCE = 0x52009229   # Shared Functional Groups Sequence: not in the table
TABLE = {tag: (basic, longitudinal, clean) for tag, basic, longitudinal, clean in
         (*SUPPLEMENT, *ROWS)}


def known(tag: int) -> str | None:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return None


def rows() -> list[int]:
    """The table's attributes that pydicom knows and that a data set may hold."""
    return sorted(t for t in TABLE if (t >> 16) not in NOT_IN_A_DATA_SET and known(t))


def value_of(vr: str, tag: int, uid_of) -> object:
    text = {"AE": "ORIGAE", "AS": "045Y", "CS": "ORIGCS", "DA": DATE, "DS": "12.5",
            "DT": DATE + "101010", "IS": "42", "TM": "101010", "PN": NAME,
            "SH": "ORIG Doe", "LO": f"ORIG Doe {DATE} 1234567",
            "UR": "http://example.org/Doe"}
    if vr in text:
        return text[vr]
    if vr in ("LT", "ST", "UT", "UC"):
        return f"note on {NAME} born {DATE} id 1234567"
    if vr == "UI":
        return uid_of(tag)
    if vr in ("FL", "FD"):
        return 1.5
    if vr in ("SL", "SS", "UL", "US", "SV", "UV"):
        return 7
    if vr == "AT":
        return 0x00100010
    if vr == "SQ":
        item = Dataset()
        item.add_new(0x0040A123, "PN", NAME)                     # Person Name: D
        item.add_new(0x00081155, "UI", uid_of(0x00081155))      # Referenced SOP Instance UID: U
        item.add_new(0x00080100, "SH", "C1")                     # Code Value: not in the table
        return Sequence([item])
    return b"\x01\x02\x03\x04\x05\x06\x07\x08"   # OB, OW, OF, OD, OL, OV, UN


def full_instance(number: int, series: int, uid_of, *, description: str) -> Dataset:
    """A CT image carrying every table attribute pydicom knows, again (the non-sequences)
    inside an item of a kept sequence, plus private, curve and overlay attributes."""
    ds = ct_slice(seed=7, patient=1, study=1, series=series, number=number, size=16,
                  patient_name=NAME)
    nested = Dataset()
    for tag in rows():
        vr = known(tag)
        keyword = DataElement(tag, vr, None).keyword
        if keyword in CORE:
            continue
        value = value_of(vr, tag, uid_of)
        if keyword == "SeriesDescription":
            value = description
        ds.add_new(tag, vr, value)
        if vr != "SQ":
            nested.add_new(tag, vr, value)
    ds.FrameOfReferenceUID = uid_of(0x00200052)
    ds.SeriesDescription = description
    ds.add_new(KEPT_SEQUENCE, "SQ", Sequence([nested]))
    ds.add_new(0x00110010, "LO", "ACME")                 # a private creator and its element
    ds.add_new(0x00111001, "LO", "private " + NAME)
    ds.add_new(0x50000010, "US", 2)                     # curve (retired): all of it goes
    ds.add_new(0x50003000, "OB", b"\x01\x02")
    ds.add_new(0x60000010, "US", 16)                    # overlay rows: kept
    ds.add_new(0x60003000, "OW", b"\x00" * 32)          # overlay data: X
    ds.add_new(0x60004000, "LT", "overlay " + NAME)     # overlay comments: X
    return ds


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A server holding one study: CT series 1 (two full instances), CT series 2 (one full
    instance that references the first, BurnedInAnnotation YES), US series 3 (two images)."""
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("deid")
    data = tmp / "data"
    cfg_file = write_config(tmp / "c.toml", data, dicom={"workers": 1})
    server = Server(config.load(cfg_file, env={})).start()
    uids: dict[int, str] = {}

    def uid_of(tag: int) -> str:   # one UID per table attribute, the same in every instance
        return uids.setdefault(tag, f"1.2.826.0.1.3680043.8.498.{tag}.{len(uids) + 1}")
    sources = [full_instance(n, 1, uid_of, description=f"AXIAL {SECRET} {DATE} scan")
               for n in (1, 2)]
    b = full_instance(1, 2, uid_of, description="REFORMAT")
    ref = Dataset()
    ref.ReferencedSOPClassUID = sources[0].SOPClassUID
    ref.ReferencedSOPInstanceUID = sources[0].SOPInstanceUID
    b.ReferencedImageSequence = Sequence([ref])
    b.BurnedInAnnotation = "YES"
    sources.append(b)
    for n in (1, 2):
        us = ct_slice(seed=7, patient=1, study=1, series=3, number=n, size=16, modality="US",
                      patient_name=NAME)
        sources.append(us)
    folder = tmp / "in"
    folder.mkdir()
    paths = []
    for i, ds in enumerate(sources):
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert store_files(server.dicom_port, paths) == [0] * len(paths)
    server.sources = {(int(ds.SeriesNumber), int(ds.InstanceNumber)): ds for ds in sources}
    server.study = str(sources[0].StudyInstanceUID)
    server.cfg_file = cfg_file
    yield server
    server.stop()


def unzip(content: bytes) -> tuple[list[Dataset], dict[str, str]]:
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        names = zf.namelist()
        texts = {n: zf.read(n).decode() for n in names if n.endswith(".txt")}
        instances = [dcmread(io.BytesIO(zf.read(n))) for n in names
                     if n.startswith("DICOM/")]
        assert "DICOMDIR" in names
    return instances, texts


def empty(elem: DataElement) -> bool:
    return elem.value is None or elem.value == "" or elem.value == b"" or (
        elem.VR == "SQ" and len(elem.value) == 0) or (
        not isinstance(elem.value, (str, bytes)) and hasattr(elem.value, "__len__")
        and elem.VR != "SQ" and len(elem.value) == 0)


def changed(new: DataElement, old: DataElement) -> bool:
    """The value says nothing of the original: no identifying text left, or another value."""
    if new.VR == "SQ":
        return SECRET not in str(new.value)
    return new.value != old.value and SECRET not in str(new.value)


def check_row(tag: int, code: str, old: DataElement, out: Dataset, mapping: dict[str, str],
              where: str) -> None:
    """Assert the outcome of one table row's action (PS3.15 E.1.1) on `out`."""
    present = tag in out
    new = out[tag] if present else None
    say = f"{where} {Tag(tag)} {old.keyword} {code}: {new!r}"
    if code == "X":
        assert not present, say
    elif code == "K":
        assert present and new.value == old.value, say
    elif code == "Z":
        assert present and (empty(new) or changed(new, old)), say
    elif code == "D":
        assert present and not empty(new) and changed(new, old), say
    elif code == "Z/D":
        assert present and (empty(new) or changed(new, old)), say
    elif code in ("X/Z", "X/Z/D"):
        assert not present or empty(new) or changed(new, old), say
    elif code == "X/D":
        assert not present or (not empty(new) and changed(new, old)), say
    elif code == "X/Z/U*":   # a sequence whose instance UIDs are replaced
        assert not present or empty(new) or changed(new, old), say
        for item in (new.value if present else []):
            if "ReferencedSOPInstanceUID" in item:
                assert item.ReferencedSOPInstanceUID.startswith("2.25."), say
    elif code == "U":
        assert present and not empty(new), say
        if new.VR == "UI":
            olds = old.value if old.VM > 1 else [old.value]
            news = new.value if new.VM > 1 else [new.value]
            for o, n in zip(olds, news, strict=True):
                assert n.startswith("2.25.") and n != o, say
                assert mapping.setdefault(o, n) == n, f"{say}: {o} mapped twice"
        else:
            assert changed(new, old), say
    else:
        raise AssertionError(f"{say}: unknown action code")


def check_instance(out: Dataset, src: Dataset, mapping: dict[str, str], *,
                   longitudinal: bool = False, clean: bool = False) -> int:
    """Every table row, at the top level and in the kept sequence's item; the additions.
    Returns how many rows were checked."""
    checked = 0
    nested_src = src[KEPT_SEQUENCE].value[0]
    assert KEPT_SEQUENCE in out, "a sequence not in the table is kept"
    nested_out = out[KEPT_SEQUENCE].value[0]
    for level, (o, s) in (("top", (out, src)), ("nested", (nested_out, nested_src))):
        for tag in rows():
            if tag not in s:
                continue
            basic, keep_dates, clean_desc = TABLE[tag]
            old = s[tag]
            if level == "top" and old.keyword in ("PatientName", "PatientID"):
                assert o[tag].value != old.value and SECRET not in str(o[tag].value)
                checked += 1
                continue
            if longitudinal and keep_dates == "K":
                assert tag in o and o[tag].value == old.value, f"{Tag(tag)} kept (dates)"
            elif clean and clean_desc == "C":
                if tag in o:
                    assert SECRET not in str(o[tag].value) and DATE not in str(o[tag].value)
                    assert "1234567" not in str(o[tag].value), f"{Tag(tag)} cleaned"
            else:
                check_row(tag, basic, old, o, mapping, level)
            checked += 1
    for elem in out.iterall():
        assert not elem.tag.is_private, f"private {elem.tag} left"
        assert elem.tag.group & 0xFF00 != 0x5000, "curve data left"
        assert not (elem.tag.group & 0xFF00 == 0x6000 and elem.tag.element in (0x3000, 0x4000))
    assert out[0x60000010].value == 16   # the overlay's other attributes are not in the table
    assert out.PixelData == src.PixelData
    assert out.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100"} | ({"113106"} if longitudinal else set()) | (
        {"113105"} if clean else set())
    assert all(item.CodingSchemeDesignator == "DCM"
               for item in out.DeidentificationMethodCodeSequence)
    assert out.LongitudinalTemporalInformationModified == (
        "UNMODIFIED" if longitudinal else "REMOVED")
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    return checked


def by_position(instances: list[Dataset]) -> dict[tuple[int, int], Dataset]:
    return {(int(ds.SeriesNumber), int(ds.InstanceNumber)): ds for ds in instances}


def check_export(instances: list[Dataset], sources: dict, **options) -> dict[str, str]:
    """The whole export: every row of every full instance, UIDs consistent within it."""
    out = by_position(instances)
    assert set(out) == set(sources)
    mapping: dict[str, str] = {}
    checked = [check_instance(out[k], sources[k], mapping, **options)
               for k in sources if KEPT_SEQUENCE in sources[k]]
    # Each full instance: the ~590 rows pydicom knows at the top, the non-sequences again nested.
    assert len(checked) == 3 and min(checked) >= 1100, checked
    a1, a2, b = out[(1, 1)], out[(1, 2)], out[(2, 1)]
    us = [out[(3, 1)], out[(3, 2)]]
    assert a1.SeriesInstanceUID == a2.SeriesInstanceUID != b.SeriesInstanceUID
    assert len({ds.StudyInstanceUID for ds in out.values()}) == 1
    assert a1.FrameOfReferenceUID == a2.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a1.SOPInstanceUID
    assert len({str(ds.PatientID) for ds in out.values()}) == 1   # one patient, one pseudonym
    assert us[0].SeriesInstanceUID == us[1].SeriesInstanceUID
    assert not ({ds.StudyInstanceUID for ds in out.values()}
                & {s.StudyInstanceUID for s in sources.values()})
    return mapping


def test_the_vendored_table_is_the_standards(pacs):
    """Spot rows of PS3.15 2024e Table E.1-1 as the standard prints them, and its size."""
    assert len(ROWS) == 617   # 621 rows, less the 4 pattern rows (curves, overlays, private)
    for tag, expected in [(0x00100010, ("Z", "", "")), (0x00100020, ("Z/D", "", "")),
                          (0x00080050, ("Z", "", "")), (0x00080020, ("Z", "K", "")),
                          (0x00080030, ("Z", "K", "")), (0x0008103E, ("X", "", "C")),
                          (0x00081030, ("X", "", "C")), (0x0020000D, ("U", "", "")),
                          (0x00080080, ("X/Z/D", "", "")), (0x00081140, ("X/Z/U*", "", "")),
                          (0x00081155, ("U", "", "")), (0x00200052, ("U", "", "")),
                          (0x0040A730, ("D", "", "")), (0x00101000, ("X", "", "")),
                          (0x00204000, ("X", "", "C")), (0x00100030, ("Z", "", ""))]:
        assert TABLE[tag] == expected, hex(tag)


def test_zip_of_the_basic_profile_attribute_by_attribute(pacs):
    url = f"{pacs.http_url}/api/studies/{pacs.study}"
    preview = requests.get(f"{url}/deidentify", timeout=10).json()
    assert {s["modality"] for s in preview["burned_in"]} == {"US", "CT"}   # US, and B's YES
    assert "US series 3" in preview["warning"]
    r = requests.get(f"{url}/zip?deidentify=1", timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert "US series 3 (2 instance(s))" in r.headers["X-Pacsd-Burned-In"]
    assert NAME not in r.headers["Content-Disposition"] and "PID" not in \
        r.headers["Content-Disposition"]
    instances, texts = unzip(r.content)
    mapping = check_export(instances, pacs.sources)
    readme = texts["README.txt"]
    assert "Basic Application Level Confidentiality Profile" in readme
    assert "WARNING" in readme and "(US, 2 instance(s)" in readme
    assert "Burned In Annotation is YES" in readme
    # A second export maps every UID anew.
    again, _ = unzip(requests.get(f"{url}/zip?deidentify=1", timeout=60).content)
    assert not set(mapping.values()) & {str(ds.SOPInstanceUID) for ds in again}
    assert by_position(again)[(1, 1)].PatientID != by_position(instances)[(1, 1)].PatientID
    # The plain ZIP is what was stored.
    plain, _ = unzip(requests.get(f"{url}/zip", timeout=60).content)
    assert {str(ds.PatientName) for ds in plain} == {NAME}


def test_zip_with_full_dates_and_clean_descriptors(pacs):
    url = f"{pacs.http_url}/api/studies/{pacs.study}"
    r = requests.get(f"{url}/zip?deidentify=1&longitudinal=1&clean=1&patient_name=Study^Case7"
                     "&patient_id=CASE-7", timeout=60)
    assert r.status_code == 200
    instances, texts = unzip(r.content)
    check_export(instances, pacs.sources, longitudinal=True, clean=True)
    out = by_position(instances)
    assert out[(1, 1)].StudyDate == "20240102"          # Z, but K with the option
    assert out[(1, 1)].AcquisitionDate == DATE
    assert not out[(1, 1)].PatientBirthDate             # Z, and no K in its column
    assert out[(1, 1)].SeriesDescription == "AXIAL scan"                  # cleaned, kept
    assert {str(ds.PatientName) for ds in instances} == {"Study^Case7"}
    assert {str(ds.PatientID) for ds in instances} == {"CASE-7"}
    assert "Clean Descriptors Option" in texts["README.txt"]
    bad = requests.get(f"{url}/zip?deidentify=1&patient_id=" + "x" * 65, timeout=10)
    assert bad.status_code == 400 and "patient_id" in bad.json()["error"]


def test_cli_export_to_a_folder_and_a_zip(pacs, tmp_path: Path):
    """`pacsd export` reads the archive directly while the server runs."""
    folder = tmp_path / "out"
    done = subprocess.run(pacsd_cmd("export", pacs.study, "--to", str(folder), "--deidentify",
                                    "--config", str(pacs.cfg_file)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported 5 instance(s) of 1 study(ies)" in done.stdout
    assert "US" in done.stdout and "WARNING" in done.stdout
    files = [p for p in (folder / "DICOM").rglob("*") if p.is_file()]
    assert (folder / "DICOMDIR").is_file() and (folder / "README.txt").is_file()
    check_export([dcmread(p) for p in files], pacs.sources)
    target = tmp_path / "plain.zip"
    done = subprocess.run(pacsd_cmd("export", pacs.study, "--to", str(target),
                                    "--config", str(pacs.cfg_file)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plain, _ = unzip(target.read_bytes())
    assert len(plain) == 5 and {str(ds.PatientName) for ds in plain} == {NAME}
    refused = subprocess.run(pacsd_cmd("export", pacs.study, "--to", str(target),
                                       "--longitudinal", "--config", str(pacs.cfg_file)),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--deidentify" in refused.stderr


def test_deidentified_send_to_a_second_pacsd(pacs, tmp_path: Path):
    data = tmp_path / "remote"
    cfg = write_config(tmp_path / "remote.toml", data, dicom={"aet": "REMOTE"})
    with serve(cfg, data, log_name="remote.log") as remote:
        node = {"name": "remote", "aet": "REMOTE", "host": LOCAL, "port": remote.port}
        r = requests.post(f"{pacs.http_url}/api/nodes", json=node, headers=H, timeout=10)
        assert r.status_code in (201, 409), r.text
        r = requests.post(f"{pacs.http_url}/api/studies/{pacs.study}/send", headers=H,
                          json={"node": "remote", "deidentify": True}, timeout=10)
        assert r.status_code == 202, r.text
        job_url = f"{pacs.http_url}/api/jobs/{r.json()['job']}"
        job = wait_for(lambda: (j := requests.get(job_url, timeout=10).json())["state"]
                       not in ("queued", "running") and j, 60, "the send job")
        assert (job["state"], job["done"]) == ("done", 5), job
        assert "de-identified" in job["message"] and "(US, 2 instance(s)" in job["message"]
        listed = requests.get(f"{remote.http_url}/api/studies", timeout=10).json()["studies"]
        assert len(listed) == 1 and listed[0]["study_uid"] != pacs.study
        assert SECRET not in str(listed[0])
        got = requests.get(f"{remote.http_url}/api/studies/{listed[0]['study_uid']}/zip",
                           timeout=60)
        check_export(unzip(got.content)[0], pacs.sources)


def test_deidentify_is_pure_and_maps_per_export():
    """In process: one Deidentifier maps a UID the same way every time, another anew."""
    from pacsd.imaging.deidentify import Deidentifier
    uids: dict[int, str] = {}
    src = full_instance(1, 1, lambda t: uids.setdefault(t, f"1.2.3.{t}"), description="x")
    one, two = Deidentifier(), Deidentifier()
    a = one.apply(copy.deepcopy(src))
    b = one.apply(copy.deepcopy(src))
    c = two.apply(copy.deepcopy(src))
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.PatientID == b.PatientID != c.PatientID
    assert one.count == 2 and not one.burned_in   # a CT without BurnedInAnnotation
    t0 = time.perf_counter()
    for _ in range(20):
        Deidentifier().apply(copy.deepcopy(src))
    assert time.perf_counter() - t0 < 5   # ~1300 attributes each, well under a second


def test_the_study_list_exports_de_identified_with_the_warning(pacs, browser):
    """Pages: "Export de-identified…" shows the burned-in warning, then downloads the ZIP."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import browser_errors

    def until(cond, message: str):
        return WebDriverWait(browser, 30, poll_frequency=0.05).until(cond, message)
    browser.get(pacs.http_url + "/app/")
    until(lambda d: d.find_elements(By.CSS_SELECTOR, "#studies tbody tr .row-check"),
          "the study list")
    browser.find_element(By.CSS_SELECTOR, "#studies tbody tr .row-check").click()
    browser.find_element(By.ID, "deid-btn").click()
    warning = until(lambda d: d.find_element(By.ID, "deid-warning").text, "the warning")
    assert "US series 3" in warning and "not de-identified" in warning
    browser.find_element(By.ID, "deid-longitudinal").click()
    browser.find_element(By.ID, "deid-ok").click()
    zips = until(lambda d: [p for p in d.downloads.iterdir() if p.suffix == ".zip"],
                 "no ZIP downloaded")
    assert zips[0].name == "deidentified.zip"
    instances, texts = unzip(zips[0].read_bytes())
    assert "Retain Longitudinal" in texts["README.txt"]
    assert {str(ds.PatientIdentityRemoved) for ds in instances} == {"YES"}
    assert {str(ds.StudyDate) for ds in instances} == {"20240102"}   # dates kept, as ticked
    assert browser_errors(browser) == []


def test_clean_descriptors_take_out_whole_words_dates_and_numbers():
    from pacsd.imaging.deidentify import clean_text
    assert clean_text("Clinical note for Li Wu, 12.03.2024, MRN 12345678 T2",
                      ["Wu", "Li"]) == "Clinical note for , , MRN T2"
