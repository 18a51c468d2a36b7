"""XML-RPC (OsiriX / Horos methods) with Python's xmlrpc.client, against real servers."""

from __future__ import annotations

import time
import xmlrpc.client
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from conftest import LOCAL, associate, free_port, remote_pacsd, store_files
from data import dataset_bytes, write_series
from pacsd import query
from pacsd.web.auth import hash_password
from test_retrieve import Destination


def proxy(server, path: str = "/RPC2", user: str = "") -> xmlrpc.client.ServerProxy:
    url = server.http_url + path
    if user:
        url = url.replace("://", f"://{user}@")
    return xmlrpc.client.ServerProxy(url)


def c_find(port: int, level: str, **keys: str) -> list[Dataset]:
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(port, [build_context(FIND)]) as assoc:
        return [ds for status, ds in assoc.send_c_find(q, FIND) if status.Status == 0xFF00]


def uids(answer: dict, key: str) -> set[str]:
    assert answer["error"] == "0", answer
    return {e[key] for e in answer["elements"]}


def bad_request(call) -> None:
    """OsiriX answers bad parameters with HTTP 400 (Horos: ReturnWithCode(400))."""
    with pytest.raises(xmlrpc.client.ProtocolError) as e:
        call()
    assert e.value.errcode == 400


def wait_until(check, timeout: float = 60.0):
    """Poll `check()` until it answers something true (background retrieves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s")


def stored_paths(server) -> list[Path]:
    """The stored files, not those in the recycle bin (STORAGE/.trash)."""
    return sorted(p for p in server.cfg.storage_path.rglob("*.dcm") if ".trash" not in p.parts)


@pytest.fixture
def populated(make_server, tmp_path):
    """Two patients x two studies x two series x two images, plus one patient in 2023."""
    server = make_server()
    files = write_series(tmp_path / "a", seed=5, patients=2, studies=2, series=2, images=2,
                         size=16)
    files += write_series(tmp_path / "b", seed=6, images=3, size=16, study_date="20230615",
                          patient_name="Doe^Jane", modality="MR")
    assert store_files(server.dicom_port, files) == [0] * len(files)
    return server, files


def test_ping_at_rpc2_and_at_the_root(server):
    assert proxy(server).Ping({}) == {"error": "0"}
    assert proxy(server, "/").Ping({}) == {"error": "0"}
    assert proxy(server, "/").ping({}) == {"error": "0"}   # OsiriX ignores the case of names
    assert requests.get(server.http_url + "/testdbalive", timeout=5).status_code == 200


def test_dbwindowfind_studies_match_c_find(populated):
    server, _ = populated
    rpc = proxy(server)

    def studies(request: str, **kw) -> set[str]:
        return uids(rpc.DBWindowFind({"request": request, "table": "Study",
                                      "execute": "Select", **kw}), "studyInstanceUID")

    def cfind(**keys: str) -> set[str]:
        return {str(ds.StudyInstanceUID)
                for ds in c_find(server.dicom_port, "STUDY", StudyInstanceUID="", **keys)}

    assert studies("patientID == 'PID5-001'") == cfind(PatientID="PID5-001")
    assert len(cfind(PatientID="PID5-001")) == 2
    assert studies("name LIKE '*PATIENT001*'") == cfind(PatientName="*Patient001*")
    assert studies("name == 'Doe Jane'") == studies('name == "DOE^JANE"') == \
        cfind(PatientName="Doe^Jane")
    assert studies("patientID == 'PID5-001' AND accessionNumber == 'ACC500102'") == \
        cfind(PatientID="PID5-001", AccessionNumber="ACC500102")
    either = studies("accessionNumber == 'ACC500101' OR accessionNumber == 'ACC500202'")
    assert either == cfind(AccessionNumber="ACC500101") | cfind(AccessionNumber="ACC500202")
    assert len(either) == 2
    assert studies("(patientID == 'PID5-001' OR patientID == 'PID5-002') AND "
                   "NOT studyName == 'CT CHEST 1'") == \
        cfind(PatientID="PID5-00?", StudyDescription="CT CHEST 2")
    assert studies("studyName LIKE[c] 'ct chest*'") == cfind(StudyDescription="CT CHEST*")
    assert studies("date == '20230101-20231231'") == cfind(StudyDate="20230101-20231231")
    assert studies("date >= '2024-01-01'") == cfind(StudyDate="20240101-")
    assert studies("modality == 'MR'") == cfind(ModalitiesInStudy="MR")
    assert studies("studyInstanceUID IN {'%s', '2.25.1'}" % next(iter(either))) == \
        {next(iter(either))}
    everything = cfind()
    assert studies("TRUEPREDICATE") == everything and len(everything) == 5

    answer = rpc.DBWindowFind({"request": "patientID == 'PID6-001'", "table": "Study",
                               "execute": "Select"})
    [element] = answer["elements"]
    assert element["name"] == "Doe Jane" and element["patientID"] == "PID6-001"
    assert element["numberOfImages"] == "3" and element["modality"] == "MR"
    assert element["date"].startswith("2023-06-15 ")
    # FindObject is the same method; Nothing answers the count (and, as OsiriX does, elements).
    answer = rpc.FindObject({"request": "patientID BEGINSWITH 'PID5'", "table": "Study",
                             "execute": "Nothing"})
    assert (answer["error"], answer["count"]) == ("0", 4)


def test_dbwindowfind_series_and_images_match_the_index(populated):
    server, files = populated
    rpc = proxy(server)

    def index(level: str, key: str, **keys: str) -> set[str]:
        with server.index.reading():
            return {m[key] for m in query.find(query.Request(level, keys), [key])}

    series = uids(rpc.DBWindowFind({"request": "study.patientID == 'PID5-001' AND "
                                               "modality == 'CT'", "table": "Series"}),
                  "seriesDICOMUID")
    assert series == index("SERIES", "SeriesInstanceUID", PatientID="PID5-001", Modality="CT")
    assert len(series) == 4
    assert uids(rpc.DBWindowFind({"request": "name == 'AXIAL 2' OR modality == 'MR'",
                                  "table": "Series"}), "seriesDICOMUID") == \
        index("SERIES", "SeriesInstanceUID", SeriesDescription="AXIAL 2") | \
        index("SERIES", "SeriesInstanceUID", Modality="MR")

    one_series = str(dcmread(files[0]).SeriesInstanceUID)
    images = uids(rpc.DBWindowFind({"request": f"seriesInstanceUID == '{one_series}'",
                                    "table": "Image"}), "sopInstanceUID")
    assert images == index("IMAGE", "SOPInstanceUID", SeriesInstanceUID=one_series)
    assert len(images) == 2
    later = uids(rpc.DBWindowFind({"request": "instanceNumber > 1 AND series.study.name "
                                              "LIKE[c] '*jane*'", "table": "Image"}),
                 "sopInstanceUID")
    assert later == index("IMAGE", "SOPInstanceUID", PatientName="Doe^Jane",
                          InstanceNumber="2") | \
        index("IMAGE", "SOPInstanceUID", PatientName="Doe^Jane", InstanceNumber="3")


def test_dbwindowfind_errors(populated):
    server, _ = populated
    rpc = proxy(server)
    for request in ("bogus == 'x'", "patientID == ", "(patientID == 'x'", "patientID ~ 'x'",
                    "patientID == 'x' AND", "name == 'a' OR ; DROP TABLE study"):
        # Issue 18: HTTP 400 as OsiriX, where pacsd answered {error: "400"} with HTTP 200.
        rsp = post(server, xmlrpc.client.dumps(
            ({"request": request, "table": "Study", "execute": "Select"},),
            "DBWindowFind").encode())
        assert rsp.status_code == 400, request
        answer = xmlrpc.client.loads(rsp.content)[0][0]
        assert answer["error"] == "400", (request, answer)
        assert answer["message"]
    bad_request(lambda: rpc.DBWindowFind({"request": "patientID == 'x'", "table": "Patient"}))
    bad_request(lambda: rpc.DBWindowFind({"table": "Study"}))
    assert rpc.DBWindowFind({"request": "patientID == 'nobody'", "table": "Study"}
                            )["error"] == "-1"
    bad_request(lambda: rpc.DisplayStudy({}))
    assert rpc.DisplayStudy({"PatientID": "nobody"})["error"] == "-1"
    answer = rpc.DisplayStudy({"PatientID": "PID5-002", "AccessionNumber": "ACC500201"})
    assert answer["error"] == "0" and [e["accessionNumber"] for e in answer["elements"]] == \
        ["ACC500201"]
    answer = rpc.DisplaySeries({"PatientID": "PID6-001"})
    assert answer["error"] == "0" and [e["modality"] for e in answer["elements"]] == ["MR"]
    with pytest.raises(xmlrpc.client.Fault) as fault:
        rpc.NoSuchMethod({})
    assert fault.value.faultCode == -32601
    bad_request(lambda: rpc.DBWindowFind("not a struct"))


def test_delete_removes_rows_files_and_fixes_counters(make_server, tmp_path):
    server = make_server()
    files = write_series(tmp_path / "in", seed=7, studies=2, series=2, images=3, size=16)
    assert store_files(server.dicom_port, files) == [0] * 12
    rpc = proxy(server)
    first = dcmread(files[0])
    assert len(stored_paths(server)) == 12

    # One series: its 3 images go, the study keeps the other series.
    answer = rpc.DBWindowFind({"request": f"seriesDICOMUID == '{first.SeriesInstanceUID}'",
                               "table": "Series", "execute": "Delete"})
    assert (answer["error"], answer["count"], answer["deleted"]) == ("0", 1, 3)
    assert len(stored_paths(server)) == 9
    assert server.index.bin_totals()[0] == 3   # into the recycle bin, restorable
    [deletion] = server.index.history(str(first.SeriesInstanceUID))
    assert (deletion.action, deletion.instances) == ("delete", 3)
    assert deletion.who.startswith("XML-RPC from 127.0.0.1")
    counts = server.index.counts()
    assert (counts["studies"], counts["series"], counts["instances"]) == (2, 3, 9)
    [study] = c_find(server.dicom_port, "STUDY", StudyInstanceUID=first.StudyInstanceUID,
                     NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (1, 3)

    # One image of the other series of that study.
    answer = rpc.DBWindowFind({"request": f"studyInstanceUID == '{first.StudyInstanceUID}' "
                                          "AND instanceNumber == 2", "table": "Image",
                               "execute": "Delete"})
    assert (answer["error"], answer["deleted"]) == ("0", 1)
    [study] = c_find(server.dicom_port, "STUDY", StudyInstanceUID=first.StudyInstanceUID,
                     NumberOfStudyRelatedInstances="")
    assert study.NumberOfStudyRelatedInstances == 2
    [patient] = c_find(server.dicom_port, "STUDY", PatientID=first.PatientID,
                       StudyInstanceUID=first.StudyInstanceUID,
                       NumberOfPatientRelatedInstances="")
    with server.index.reading():
        from pacsd.index.models import Patient
        p = Patient.get(Patient.patient_id == first.PatientID)
        assert (p.number_of_studies, p.number_of_series, p.number_of_instances) == (2, 3, 8)

    # Everything: no row, no file, and a fresh store of the same images works again.
    answer = rpc.DBWindowFind({"request": "TRUEPREDICATE", "table": "Study",
                               "execute": "Delete"})
    assert (answer["error"], answer["deleted"]) == ("0", 8)
    assert server.index.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0,
                                     "bytes": 0}
    assert stored_paths(server) == []
    assert store_files(server.dicom_port, files) == [0] * 12
    assert server.index.counts()["instances"] == 12


def test_only_administrators_change_things(make_server, tmp_path):
    users = [{"name": "admin", "password_hash": hash_password("pw", iterations=1000),
              "admin": True},
             {"name": "user", "password_hash": hash_password("pw", iterations=1000),
              "admin": False}]
    dest = Destination()
    try:
        server = make_server(users=users, nodes=[{"name": "viewer", "aet": "DEST",
                                                  "host": LOCAL, "port": dest.port}])
        files = write_series(tmp_path / "in", seed=8, images=2, size=16)
        assert store_files(server.dicom_port, files) == [0, 0]
        user, admin = proxy(server, user="user:pw"), proxy(server, user="admin:pw")
        delete = {"request": "TRUEPREDICATE", "table": "Study", "execute": "Delete"}
        assert user.Ping({}) == {"error": "0"}
        assert user.DBWindowFind({**delete, "execute": "Select"})["count"] == 1
        assert user.DBWindowFind(delete)["error"] == "403"
        assert user.CMove({"accessionNumber": "ACC800101", "server": "viewer"})["error"] == "403"
        assert user.Retrieve({"serverName": "viewer", "filterKey": "PatientID",
                              "filterValue": "x"})["error"] == "403"
        assert server.index.counts()["instances"] == 2 and dest.received == {}
        with pytest.raises(xmlrpc.client.ProtocolError) as e:
            proxy(server).Ping({})
        assert e.value.errcode == 401
        assert admin.DBWindowFind(delete)["deleted"] == 2
        assert server.index.counts()["instances"] == 0
    finally:
        dest.close()


def test_sendstudy_sends_a_study_unchanged_to_a_configured_node(make_server, tmp_path):
    # pacsd's push, CMove's behaviour before issue 18 (OsiriX's CMove pulls: test_xmlrpc_osirix).
    dest = Destination()
    try:
        server = make_server(nodes=[{"name": "viewer", "aet": "DEST", "host": LOCAL,
                                     "port": dest.port}])
        files = write_series(tmp_path / "in", seed=9, studies=2, series=2, images=3, size=32)
        assert store_files(server.dicom_port, files) == [0] * 12
        rpc = proxy(server)
        study1 = [f for f in files if dcmread(f).AccessionNumber == "ACC900101"]
        answer = rpc.SendStudy({"accessionNumber": "ACC900101", "server": "viewer"})
        assert answer == {"error": "0", "completed": 6, "failed": 0}
        assert dest.received == {str(dcmread(f).SOPInstanceUID): dataset_bytes(f)
                                 for f in study1}
        # By Study Instance UID and by AE title.
        uid = str(dcmread(files[-1]).StudyInstanceUID)
        assert rpc.SendStudy({"studyInstanceUID": uid, "server": "DEST"})["completed"] == 6
        assert len(dest.received) == 12
        assert rpc.SendStudy({"accessionNumber": "ACC900101", "server": "nowhere"})["error"] == "-1"
        assert rpc.SendStudy({"accessionNumber": "NONE", "server": "viewer"})["error"] == "-3"
        bad_request(lambda: rpc.SendStudy({"server": "viewer"}))
    finally:
        dest.close()


def test_sendstudy_to_a_node_that_is_down(make_server, tmp_path):
    server = make_server(nodes=[{"name": "down", "aet": "DOWN", "host": LOCAL,
                                 "port": free_port()}])
    files = write_series(tmp_path / "in", seed=10, images=1, size=16)
    assert store_files(server.dicom_port, files) == [0]
    started = time.monotonic()
    answer = proxy(server).SendStudy({"accessionNumber": "ACC1000101", "server": "down"})
    assert answer["error"] == "-2" and "DOWN" in answer["message"]
    assert time.monotonic() - started < 10


def test_retrieve_from_another_pacsd(make_server, tmp_path):
    files = write_series(tmp_path / "in", seed=12, studies=2, series=1, images=3, size=32)
    with remote_pacsd(tmp_path, files) as (remote, local_port):
        server = make_server(dicom={"aet": "LOCALPACS", "port": local_port},
                             nodes=[{"name": "the other", "aet": "REMOTE", "host": LOCAL,
                                     "port": remote.port}])
        rpc = proxy(server, "/")
        answer = rpc.Retrieve({"serverName": "the other", "filterKey": "PatientID",
                               "filterValue": "PID12-001"})
        # Issue 18: answered once started, as OsiriX; the retrieve runs in the background.
        assert answer["error"] == "0" and set(answer) == {"error", "job"}

        def arrived(n: int):
            with server.index.reading():
                got = query.instances(query.Request("PATIENT", {"PatientID": "PID12-001"}))
            return got if len(got) >= n else None
        got = wait_until(lambda: arrived(6))
        assert {i.sop_instance_uid: dataset_bytes(server.cfg.storage_path / i.path)
                for i in got} == {str(dcmread(f).SOPInstanceUID): dataset_bytes(f)
                                  for f in files}
        # Two filters (AND), by AE title; then nothing to find; then an unknown node.
        answer = rpc.Retrieve({"serverName": "REMOTE", "filterKey": "PatientID",
                               "filterValue": "PID12-001", "filterKey2": "AccessionNumber",
                               "filterValue2": "ACC1200102"})
        assert answer["error"] == "0"
        job = wait_until(lambda: server.runtime.jobs.get(answer["job"]).ended and
                         server.runtime.jobs.get(answer["job"]))
        assert (job.state, job.done, job.failed) == ("done", 3, 0)
        assert rpc.Retrieve({"serverName": "the other", "filterKey": "PatientID",
                             "filterValue": "nobody"})["error"] == "-3"
        assert rpc.Retrieve({"serverName": "nowhere", "filterKey": "PatientID",
                             "filterValue": "x"})["error"] == "-2"
        bad_request(lambda: rpc.Retrieve({"serverName": "the other", "filterKey": "Bogus",
                                          "filterValue": "x"}))


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lollollollollollollollollollol">
""" + b"".join(b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%s;" % (str(i - 1).encode() if i > 1
                                                                else b"")) * 10)
               for i in range(1, 10)) + b"""]>
<methodCall><methodName>Ping</methodName><params><param><value><string>&lol9;</string>
</value></param></params></methodCall>"""

EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<methodCall><methodName>DBWindowFind</methodName><params><param><value><struct>
<member><name>request</name><value>&secret;</value></member></struct></value></param>
</params></methodCall>"""


def post(server, body: bytes, path: str = "/RPC2", **headers: str) -> requests.Response:
    return requests.post(server.http_url + path, data=body, timeout=10,
                         headers={"Content-Type": "text/xml", **headers})


def test_xml_bombs_and_external_entities_are_refused_quickly(server):
    for body in (BOMB, EXTERNAL):
        started = time.monotonic()
        rsp = post(server, body)
        assert time.monotonic() - started < 1.0
        assert rsp.status_code == 200
        with pytest.raises(xmlrpc.client.Fault) as fault:
            xmlrpc.client.loads(rsp.content)
        assert fault.value.faultCode == -32700
        assert "root:" not in rsp.text
        assert requests.get(server.http_url + "/testdbalive", timeout=5).status_code == 200
    assert proxy(server).Ping({}) == {"error": "0"}


def test_oversized_and_malformed_bodies(server):
    big = xmlrpc.client.dumps(({"request": "x" * (2 << 20)},), "Ping").encode()
    rsp = post(server, big)
    assert rsp.status_code == 413
    for body in (b"<methodCall><methodName>Ping</methodName><params>", b"not xml at all",
                 b"<methodCall><methodName>Ping</methodName><params><param><value><int>x"
                 b"</int></value></param></params></methodCall>", b""):
        rsp = post(server, body, path="/")
        assert rsp.status_code == 200
        with pytest.raises(xmlrpc.client.Fault) as fault:
            xmlrpc.client.loads(rsp.content)
        assert fault.value.faultCode == -32700
    assert requests.get(server.http_url + "/RPC2", timeout=5).status_code == 405
    assert requests.get(server.http_url + "/testdbalive", timeout=5).status_code == 200
    assert proxy(server).Ping({}) == {"error": "0"}


def test_elements_cost_one_query_whatever_the_table(populated):
    import logging
    from pacsd.query import predicate
    from pacsd.web import osirix
    server, _ = populated
    statements: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: statements.append(record.getMessage())  # type: ignore
    logger = logging.getLogger("peewee")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with server.index.reading():
            for table in predicate.TABLES:
                statements.clear()
                rows = predicate.select(table, predicate.parse(table, "patientID LIKE 'PID?-00*'"))
                elements = [osirix.ELEMENT[table](row) for row in rows]
                assert len(elements) == {"Study": 5, "Series": 9, "Image": 19}[table]
                assert len(statements) == 1, statements
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
