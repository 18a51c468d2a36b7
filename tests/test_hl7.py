"""HL7 v2 in over MLLP (pacsd.hl7), against a real server and a real MLLP client socket: orders
schedule, change and cancel worklist steps; ADT^A08 changes the name the worklist and C-FIND
return (the stored images corrected, with history and an audit record); ADT^A40 merges two
patients into one, as C-FIND at PATIENT level shows; the manual's examples are answered AA;
and the messages become the DICOM values they say. What a hostile peer sends is
tests/reliability/test_hostile_hl7.py's."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PatientRootFind

from conftest import LOCAL, c_find, dcmtk, free_port, run_peer, store_files, wait_for
from data import write_series
from pacsd.audit import Search, search
from pacsd.hl7 import header, messages
from pacsd.query import worklist

VT, END = b"\x0b", b"\x1c\r"
DOCS = Path(__file__).parent.parent / "docs" / "worklist.md"


# --- messages, built by field number -----------------------------------------------------------

def seg(name: str, fields: dict[int, str]) -> str:
    return "|".join([name] + [fields.get(i, "") for i in range(1, max(fields) + 1)])


def msh(kind: str, control: str, charset: str = "") -> str:
    f = {3: "RIS", 4: "RADIOLOGY", 5: "PACSD", 6: "HOSPITAL", 7: "20261208090000", 9: kind,
         10: control, 11: "P", 12: "2.5", 18: charset}
    return "MSH|^~\\&|" + "|".join(f.get(i, "") for i in range(3, 19)).rstrip("|")


def pid(patient: str, name: str = "", born: str = "", sex: str = "") -> str:
    return seg("PID", {1: "1", 3: patient, 5: name, 7: born, 8: sex})


def orm(control: str, order: str = "NW", placer: str = "PLC1", patient: str = "PAT1^^^HOSP",
        name: str = "Doe^John", when: str = "20261208140000", modality: str = "CT",
        accession: str = "ACC1", uid: str = "", station: str = "CT01") -> bytes:
    segments = [msh("ORM^O01^ORM_O01", control), pid(patient, name, "19700101", "M"),
                seg("PV1", {1: "1", 2: "O", 8: "DR1^Referrer^Rita"}),
                seg("ORC", {1: order, 2: placer, 3: "F" + placer, 5: "SC",
                            7: f"^^^{when}^^R"}),
                seg("OBR", {1: "1", 2: placer, 3: "F" + placer, 4: "CTC^CT chest^L",
                            16: "DR2^Orderer^Otto", 18: accession, 19: "RP" + placer,
                            20: "SPS" + placer, 21: station, 24: modality})]
    if uid:
        segments.append(seg("ZDS", {1: f"{uid}^PACSD^Application^DICOM"}))
    return ("\r".join(segments) + "\r").encode()


def adt(event: str, control: str, patient: str, name: str, born: str = "19700101",
        sex: str = "M", merged: str = "", charset: str = "", codec: str = "utf-8") -> bytes:
    structure = {"A08": "ADT_A01", "A31": "ADT_A05", "A40": "ADT_A39"}.get(event, "ADT_A01")
    segments = [msh(f"ADT^{event}^{structure}", control, charset),
                seg("EVN", {1: event, 2: "20261208100000"}), pid(patient, name, born, sex)]
    segments.append(seg("MRG", {1: merged}) if merged else seg("PV1", {1: "1", 2: "O"}))
    return ("\r".join(segments) + "\r").encode(codec)


# --- a real MLLP client -------------------------------------------------------------------------

class Mllp:
    def __init__(self, port: int, timeout: float = 20) -> None:
        self.sock = socket.create_connection((LOCAL, port), timeout=timeout)

    def send(self, message: bytes) -> str:
        self.sock.sendall(VT + message + END)
        return self.read()

    def read(self) -> str:
        data = b""
        while not data.endswith(END):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed without an ACK (got {data!r})")
            data += chunk
            assert len(data) < 1 << 20
        assert data.startswith(VT)
        return data[1:-2].decode("latin-1")

    def close(self) -> None:
        self.sock.close()


def send(port: int, message: bytes) -> str:
    client = Mllp(port)
    try:
        return client.send(message)
    finally:
        client.close()


def msa(ack: str) -> tuple[str, str, str]:
    """MSA-1, MSA-2, MSA-3 of an ACK."""
    line = next(s for s in ack.split("\r") if s.startswith("MSA|"))
    fields = line.split("|") + ["", "", ""]
    return fields[1], fields[2], fields[3]


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `within` seconds, whatever it sent
    before."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def hl7_server(make_server, **hl7):
    return make_server(hl7={"port": free_port(), "bind": LOCAL, **hl7})


def steps_of(server, **order) -> list[dict]:
    with server.index.reading():
        return worklist.order_steps(**order)


def doc_examples() -> list[str]:
    """The manual's example messages (the text blocks that begin with MSH), as HL7 wants them."""
    blocks = re.findall(r"```text\n(MSH\|.+?)\n```", DOCS.read_text(), re.S)
    return [b.strip().replace("\n", "\r") + "\r" for b in blocks]


# --- messages alone (unit) ----------------------------------------------------------------------

def test_messages_become_dicom_values_and_bad_ones_are_refused():
    msg = messages.parse(orm("C1", uid="1.2.3.4"))
    [order] = msg.operations
    assert isinstance(order, messages.Order) and order.action == "new"
    [step] = order.steps
    assert {k: step[k] for k in ("patient_id", "issuer_of_patient_id", "patient_name",
                                 "accession_number", "modality", "start_date", "start_time",
                                 "station_aet", "study_instance_uid", "referring_physician_name",
                                 "requesting_physician", "requested_procedure_code",
                                 "requested_procedure_priority")} == {
        "patient_id": "PAT1", "issuer_of_patient_id": "HOSP", "patient_name": "Doe^John",
        "accession_number": "ACC1", "modality": "CT", "start_date": "20261208",
        "start_time": "140000", "station_aet": "CT01", "study_instance_uid": "1.2.3.4",
        "referring_physician_name": "Referrer^Rita", "requesting_physician": "Orderer^Otto",
        "requested_procedure_code": "CTC^L^CT chest", "requested_procedure_priority": "ROUTINE"}
    # XPN family^given^middle^suffix^prefix -> PN family^given^middle^prefix^suffix; escapes
    # undone in the message's character set; MSH-18 read; "" deletes.
    [update] = messages.parse(adt("A08", "C2", "P9", "M\\XC3BC\\ller^Hans^Peter^Jr^Dr",
                                  sex='""')).operations
    assert update.patient.values == {"patient_name": "Müller^Hans^Peter^Dr^Jr",
                                     "patient_birth_date": "19700101", "patient_sex": ""}
    [latin] = messages.parse(adt("A08", "C3", "P9", "Müller^Hans", charset="8859/1",
                                 codec="latin-1")).operations
    assert latin.patient.values["patient_name"] == "Müller^Hans"
    [fallback] = messages.parse(adt("A08", "C4", "P9", "Müller^Hans", codec="latin-1")
                                ).operations   # no MSH-18, not UTF-8: Latin-1
    assert fallback.patient.values["patient_name"] == "Müller^Hans"
    [merge] = messages.parse(adt("A40", "C5", "P1^^^HOSP", "Doe^Jane",
                                 merged="P2^^^HOSP")).operations
    assert (merge.into.patient_id, merge.from_id, merge.from_issuer) == ("P1", "P2", "HOSP")

    refused = {
        b"GET / HTTP/1.1\r\n\r\n": ("AR", "not an HL7 message"),
        b"MSH|AB12|RIS|X\r": ("AR", "encoding characters"),
        b"MSH|^^^^|RIS|X\r": ("AR", "encoding characters"),
        adt("A01", "C6", "P1", "A^B"): ("AR", "is not supported"),
        adt("A08", "C7", "P1", "A^B", charset="KLINGON"): ("AR", "character set"),
        adt("A08", "C8", "P1", "A\\.sp99999999\\B"): ("AR", "escape sequence"),
        adt("A08", "C9", "P1", "A\\Zfoo\\B"): ("AR", "escape sequence"),
        adt("A08", "C10", "", "A^B"): ("AE", "no patient ID"),
        adt("A40", "C11", "P1", "A^B", merged="P1"): ("AE", "into itself"),
        orm("C12", when="2026"): ("AE", "needs"),
        orm("C13", order="HD"): ("AR", "order control"),
        orm("C14", uid="not-a-uid"): ("AE", "StudyInstanceUID"),
        orm("C15") + orm("C16"): ("AR", "more than one message"),
    }
    for raw, (code, why) in refused.items():
        with pytest.raises((header.MessageRefused, header.MessageFailed)) as e:
            messages.parse(raw)
        assert (e.value.ack, why in str(e.value)) == (code, True), (raw[:40], str(e.value))
        # Each answered: the standard separators when its own cannot be read.
        answer = header.ack(header.read_header(raw), e.value.ack, str(e.value),
                              e.value.error).decode("latin-1")
        assert answer.startswith("MSH|^~\\&|PACSD|") and f"MSA|{code}|" in answer
        assert f"ERR|||{e.value.error}^" in answer


def test_the_manuals_examples_parse():
    examples = doc_examples()
    kinds = [messages.parse(e.encode()).kind for e in examples]
    assert kinds == ["ORM^O01", "ORM^O01", "ORM^O01", "OMI^O23", "ADT^A08", "ADT^A31",
                     "ADT^A40"]


# --- against a real server ----------------------------------------------------------------------

def test_orders_schedule_change_and_cancel_worklist_steps(make_server):
    server = hl7_server(make_server)
    port = server.hl7.port
    client = Mllp(port)   # several messages on one connection, one ACK each
    assert msa(client.send(orm("M1", uid="1.2.826.0.1.3680043.10.99.1"))) == \
        ("AA", "M1", "order PLC1: 1 step(s) scheduled")
    [step] = steps_of(server, placer="PLC1")
    assert (step["patient_name"], step["accession_number"], step["modality"],
            step["start_date"], step["start_time"], step["station_aet"], step["status"],
            step["source"], step["study_instance_uid"]) == (
        "Doe^John", "ACC1", "CT", "20261208", "140000", "CT01", "SCHEDULED", "hl7",
        "1.2.826.0.1.3680043.10.99.1")
    # Sent again (its ACK lost): the same step, not a second one.
    code, _, text = msa(client.send(orm("M1")))
    assert code == "AA" and "1 already known updated" in text
    assert len(steps_of(server, placer="PLC1")) == 1
    # XO: a new time and modality; the step keeps its Study Instance UID.
    assert msa(client.send(orm("M2", order="XO", when="20261208163000", modality="MR")))[0] \
        == "AA"
    [step] = steps_of(server, placer="PLC1")
    assert (step["start_time"], step["modality"], step["study_instance_uid"]) == \
        ("163000", "MR", "1.2.826.0.1.3680043.10.99.1")
    # An order with another's Study Instance UID: AE, nothing scheduled.
    code, _, text = msa(client.send(orm("M3", placer="PLC2", uid="1.2.826.0.1.3680043.10.99.1")))
    assert code == "AE" and "already scheduled" in text and not steps_of(server, placer="PLC2")
    # CA: canceled (modalities no longer see it); an unknown order: AE.
    assert msa(client.send(orm("M4", order="CA")))[0] == "AA"
    assert steps_of(server, placer="PLC1")[0]["status"] == "CANCELED"
    code, control, text = msa(client.send(orm("M5", order="CA", placer="NOPE")))
    assert (code, control) == ("AE", "M5") and "nothing to cancel" in text
    # ADT^A08: the new name is what the worklist gives.
    assert msa(client.send(orm("M6", placer="PLC3", accession="ACC3")))[0] == "AA"
    assert msa(client.send(adt("A08", "M7", "PAT1^^^HOSP", "Doe-Smith^John")))[0] == "AA"
    assert steps_of(server, placer="PLC3")[0]["patient_name"] == "Doe-Smith^John"
    client.close()
    assert server.hl7.served == 8
    # Each order is an Order Record in the audit trail, the refused ones too.
    def hl7_orders() -> list[tuple[str, str]] | None:
        found = sorted((r["action"], r["outcome"]) for r in
                       search(server.cfg.data / "audit", Search(limit=1000))
                       if r["via"] == "hl7" and r["action"].startswith("schedule"))
        return found if len(found) >= 7 else None
    orders = wait_for(hl7_orders, 10, "the orders' audit records")
    assert orders == [("schedule", "ok"), ("schedule", "ok"), ("schedule", "ok"),
                      ("schedule", "refused"), ("schedule-change", "ok"),
                      ("schedule-change", "ok"), ("schedule-change", "refused")], orders


def test_findscu_sees_what_hl7_scheduled(make_server):
    server = hl7_server(make_server)
    port = server.hl7.port
    assert msa(send(port, orm("W1", placer="PLCW", accession="ACCW", modality="CT")))[0] == "AA"

    def names() -> list[str]:
        proc = run_peer([dcmtk("findscu"), "-v", "-W", "-aec", "PACSD",
                         "-k", "AccessionNumber=ACCW", "-k", "PatientName",
                         "-k", "ScheduledProcedureStepSequence[0].Modality=CT",
                         LOCAL, str(server.dicom_port)])
        out = proc.stdout + proc.stderr
        return re.findall(r"\(0010,0010\) PN \[([^\]]*)\]", out)
    assert names() == ["Doe^John"]
    assert msa(send(port, adt("A08", "W2", "PAT1^^^HOSP", "Doe-Smith^John")))[0] == "AA"
    assert names() == ["Doe-Smith^John"]


def test_adt_corrects_the_archive_and_a40_merges_patients(make_server, tmp_path):
    server = hl7_server(make_server)
    port, dicom = server.hl7.port, server.dicom_port
    files = write_series(tmp_path / "in", seed=81, patients=2, studies=1, series=1, images=2,
                         size=16)
    assert store_files(dicom, files) == [0] * 4
    first, second = dcmread(files[0]), dcmread(files[2])
    a, b = str(first.PatientID), str(second.PatientID)   # PID81-001, PID81-002
    assert msa(send(port, orm("A1", placer="PLCA", patient=f"{a}^^^HOSP",
                              name=str(first.PatientName))))[0] == "AA"
    assert msa(send(port, orm("A2", placer="PLCB", patient=f"{b}^^^HOSP",
                              name=str(second.PatientName))))[0] == "AA"

    # A08: the worklist and the stored study both get the new name (the stored patient has no
    # issuer: the one the message gives, or none, is the same patient).
    code, _, text = msa(send(port, adt("A08", "A3", f"{a}^^^HOSP", "Newname^Anna", "19500101",
                                       "F")))
    assert code == "AA" and "2 stored instance(s) rewritten" in text
    assert steps_of(server, placer="PLCA")[0]["patient_name"] == "Newname^Anna"
    _, [match] = c_find(dicom, "STUDY", StudyInstanceUID=str(first.StudyInstanceUID),
                        PatientName="", PatientSex="")
    assert (str(match.PatientName), match.PatientSex) == ("Newname^Anna", "F")
    [change] = server.index.history(a)
    assert (change.action, change.who) == ("patient update", f"hl7 from {LOCAL}")
    # The same again changes nothing stored.
    code, _, text = msa(send(port, adt("A08", "A4", f"{a}^^^HOSP", "Newname^Anna",
                                       "19500101", "F")))
    assert code == "AA" and "0 stored instance(s)" in text and len(server.index.history(a)) == 1

    # A namesake of b from another issuer (another hospital's PID81-002): never merged.
    namesake = write_series(tmp_path / "namesake", seed=82, patients=1, studies=1, series=1,
                            images=1, size=16)[0]
    other = dcmread(namesake)
    other.PatientID, other.IssuerOfPatientID, other.PatientName = b, "OTHER", "Other^Otto"
    other.save_as(namesake)
    assert store_files(dicom, [namesake]) == [0]

    # A40: b merged into a; C-FIND at PATIENT level shows one patient with both studies.
    code, _, text = msa(send(port, adt("A40", "A5", f"{a}^^^HOSP", "Newname^Anna",
                                       "19500101", "F", merged=f"{b}^^^HOSP")))
    assert code == "AA" and "1 step(s) moved" in text
    _, left = c_find(dicom, "PATIENT", model=PatientRootFind, PatientID=b, PatientName="",
                     IssuerOfPatientID="")
    assert [(str(x.PatientName), str(x.IssuerOfPatientID)) for x in left] == [
        ("Other^Otto", "OTHER")]
    gone = [x for x in left if str(x.IssuerOfPatientID) != "OTHER"]
    _, [one] = c_find(dicom, "PATIENT", model=PatientRootFind, PatientID=a, PatientName="",
                      NumberOfPatientRelatedStudies="")
    assert gone == [] and (str(one.PatientName), int(one.NumberOfPatientRelatedStudies)) == \
        ("Newname^Anna", 2)
    assert steps_of(server, placer="PLCB")[0]["patient_id"] == a
    assert server.index.history(b)[0].action == "patient merge"
    # Merged into a patient that has no studies: the studies take its ID and demographics.
    code, _, _ = msa(send(port, adt("A40", "A6", "NEW81^^^HOSP", "Final^Anna", "19500101",
                                    "F", merged=f"{a}^^^HOSP")))
    assert code == "AA"
    _, [moved] = c_find(dicom, "PATIENT", model=PatientRootFind, PatientID="NEW81",
                        PatientName="", NumberOfPatientRelatedStudies="")
    assert (str(moved.PatientName), int(moved.NumberOfPatientRelatedStudies)) == \
        ("Final^Anna", 2)
    # Each correction is an audit record of the sender and its address.
    server.audit.flush()
    records = [json.loads(line) for line in
               (server.cfg.data / "audit" / "server.jsonl").read_text().splitlines()]
    corrections = [r for r in records if r["action"] == "correction" and r["via"] == "hl7"]
    assert [(r["user"], r["address"], r["outcome"]) for r in corrections] == \
        [("RIS", LOCAL, "ok")] * 3


def test_the_manuals_examples_are_answered_aa_by_mllp_send(make_server, tmp_path):
    server = hl7_server(make_server)
    sender = Path(sys.executable).parent / "mllp_send"
    for n, example in enumerate(doc_examples()):
        path = tmp_path / f"example{n}.hl7"
        path.write_text(example.replace("\r", "\n"))   # as the manual shows it
        out = subprocess.run([str(sender), "--loose", "--file", str(path), "--port",
                              str(server.hl7.port), LOCAL], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "MSA|AA|" in out.stdout, (n, out.stdout, out.stderr)
    with server.index.reading():
        jane = worklist.order_steps(placer="ORD1001")
        richard = worklist.order_steps(placer="ORD1002")
    assert [(s["status"], s["start_time"]) for s in jane] == [("CANCELED", "160000")]
    assert [(s["patient_birth_date"], s["station_aet"], s["location"]) for s in richard] == \
        [("19650303", "MR_SCANNER", "ROOM 2")]
