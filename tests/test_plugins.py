"""The plugins that come with pacsd (pacsd.plugins.hl7, pacsd.plugins.webhook), end to end: a
real pacsd, real C-STOREs, a real MLLP listener and a real HTTP server on 127.0.0.1.

Semantics checked: a study is announced once each time it becomes stable ([hooks]
study_stable_after seconds without a new instance); storing more into it later announces it
again, with the new totals. Deliveries are retried within their time budget, then given up."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import socket
import socketserver
import threading
import time
from pathlib import Path

import pytest
from conftest import LOCAL, store_files, wait_for
from data import ct_slice, write_series

from pacsd.plugins import hl7, webhook

HL7 = "pacsd.plugins.hl7"
WEBHOOK = "pacsd.plugins.webhook"
STABLE = 0.5


# --- a real MLLP listener ---------------------------------------------------------------------

class Mllp:
    """Receives framed HL7 messages (0x0B ... 0x1C 0x0D), records them, and answers each with
    the next scripted action: an MSA code (AA, AE, AR, CA), "close" (hang up without answering)
    or "silent" (keep the connection, never answer); AA once the script is used up."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.messages: list[str] = []
        self.errors: list[str] = []
        self.script = list(script or [])
        self.lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(10)
                buf = b""
                while True:
                    try:
                        chunk = self.request.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while b"\x1c\x0d" in buf:
                        frame, buf = buf.split(b"\x1c\x0d", 1)
                        if not frame.startswith(b"\x0b"):
                            outer.errors.append(f"frame without 0x0B: {frame[:20]!r}")
                            return
                        text = frame[1:].decode("utf-8")
                        with outer.lock:
                            outer.messages.append(text)
                            action = outer.script.pop(0) if outer.script else "AA"
                        if action == "close":
                            return
                        if action != "silent":
                            self.request.sendall(b"\x0b" + ack(text, action) + b"\x1c\x0d")

        self.server = socketserver.ThreadingTCPServer((LOCAL, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def for_study(self, study_uid: str) -> list[str]:
        with self.lock:
            return [m for m in self.messages if f"|{study_uid}|" in m]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ack(message: str, code: str) -> bytes:
    msh = fields(message)["MSH"][0]
    return (f"MSH|^~\\&|RIS|HOSP|{msh[3]}|{msh[4]}|20240101120000||ACK^R01^ACK|A{msh[10]}|P|2.5"
            f"\rMSA|{code}|{msh[10]}|scripted {code}\r").encode()


def fields(message: str) -> dict[str, list[list[str]]]:
    """Segments by name, each as its fields numbered as in the standard (MSH-1 is `|`)."""
    out: dict[str, list[list[str]]] = {}
    for seg in message.split("\r"):
        if not seg:
            continue
        parts = seg.split("|")
        if parts[0] == "MSH":
            parts.insert(1, "|")
        out.setdefault(parts[0], []).append(parts + [""] * 30)
    return out


@pytest.fixture
def mllp():
    listeners: list[Mllp] = []

    def start(script: list[str] | None = None) -> Mllp:
        listeners.append(Mllp(script))
        return listeners[-1]
    yield start
    for m in listeners:
        m.close()


# --- a real HTTP receiver ---------------------------------------------------------------------

class Receiver:
    """Records every POST (path, headers, body) and answers the next scripted status (200 once
    the script is used up)."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.script = list(script or [])
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.posts.append((self.path, dict(self.headers.items()), body))
                    status = outer.script.pop(0) if outer.script else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((LOCAL, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOCAL}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def events(self, name: str, study_uid: str) -> list[dict]:
        with self.lock:
            bodies = [json.loads(b) for _, _, b in self.posts]
        return [b for b in bodies if b["event"] == name and b["data"]["study_uid"] == study_uid]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(monkeypatch):
    monkeypatch.setenv("no_proxy", f"{LOCAL},localhost")   # whatever proxy the machine has
    made: list[Receiver] = []

    def start(script: list[int] | None = None) -> Receiver:
        made.append(Receiver(script))
        return made[-1]
    yield start
    for r in made:
        r.close()


def study_of(path: Path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def more_images(folder: Path, numbers: range, **kw) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in numbers:
        path = folder / f"i{n:04d}.dcm"
        ct_slice(number=n, **kw).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- end to end -------------------------------------------------------------------------------

def test_stable_study_announced_once_over_hl7_and_webhook(make_server, mllp, receiver,
                                                          tmp_path: Path) -> None:
    listener, web = mllp(), receiver()
    server = make_server(
        hooks={"plugins": [HL7, WEBHOOK], "study_stable_after": STABLE},
        **{"plugin.hl7": {"host": LOCAL, "port": listener.port, "receiving_application": "RIS",
                          "receiving_facility": "HOSP",
                          "viewer_url": "https://viewer.example/?study={study_uid}"},
           "plugin.webhook": {"url": web.url + "/pacs", "secret": "s3cret",
                              "events": ["study_stable", "instance_stored"]},
           "plugin.webhook.headers": {"X-Tenant": "radiology"}})
    assert [p.name for p in server.hooks.plugins] == ["hl7", "webhook"]
    # Values full of HL7 delimiters (all legal in DICOM PN / SH), so escaping shows.
    kw = {"seed": 41, "patient": 1, "study": 1, "series": 1, "size": 32,
          "patient_name": "Mc|Kay&Sons^Ann~Marie^^Dr^Jr", "accession": "A&B^7"}
    first = more_images(tmp_path / "a", range(1, 4), **kw)
    study = study_of(first[0])
    began = time.monotonic()
    assert store_files(server.dicom_port, first) == [0, 0, 0]

    msgs = wait_for(lambda: listener.for_study(study), 10, "the ORU of the stable study")
    took = time.monotonic() - began
    assert took >= STABLE   # not before it was quiet for study_stable_after
    assert len(msgs) == 1 and not listener.errors
    seg = fields(msgs[0])
    msh, pid, obr = seg["MSH"][0], seg["PID"][0], seg["OBR"][0]
    assert msh[1:4] == ["|", "^~\\&", "PACSD"] and msh[4] == server.cfg.dicom_aet
    assert (msh[5], msh[6], msh[9], msh[11], msh[12], msh[18]) == (
        "RIS", "HOSP", "ORU^R01^ORU_R01", "P", "2.5", "UNICODE UTF-8")
    assert len(msh[7]) >= 14 and msh[10]
    assert pid[3] == "PID41-001"
    assert pid[5] == "Mc\\F\\Kay\\T\\Sons^Ann\\R\\Marie^^Jr^Dr"   # suffix, prefix swapped
    assert (pid[7], pid[8]) == ("19510101", "F")
    assert seg["ORC"][0][1] == "RE" and seg["ORC"][0][3] == "A\\T\\B\\S\\7"
    assert obr[3] == "A\\T\\B\\S\\7" and obr[4] == "^CT CHEST 1"
    assert obr[7] == "20240102090100" and obr[20] == study and obr[24] == "CT"
    assert obr[16] == "^Referrer^Rita" and obr[25] == "R"
    obx = {o[3]: o[5] for o in seg["OBX"]}
    assert obx == {"110180^Study Instance UID^DCM": study,
                   "MODALITIES^Modalities in study^L": "CT",
                   "SERIES^Number of series^L": "1", "INSTANCES^Number of instances^L": "3",
                   "VIEWER^Viewer URL^L": f"https://viewer.example/?study={study}"}

    stable = wait_for(lambda: web.events("study_stable", study), 10, "the study_stable POST")
    assert len(stable) == 1
    data = stable[0]["data"]
    assert (data["patient_id"], data["accession_number"], data["instances"], data["series"],
            data["modalities"], data["calling_aets"]) == (
        "PID41-001", "A&B^7", 3, 1, ["CT"], ["PYNETDICOM"])
    assert stable[0]["aet"] == server.cfg.dicom_aet
    with web.lock:
        posts = list(web.posts)
    assert {p for p, _, _ in posts} == {"/pacs"}
    for _, headers, body in posts:   # every body signed, custom header sent
        assert headers["X-Pacsd-Signature"] == "sha256=" + hmac.new(
            b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["X-Tenant"] == "radiology"
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Pacsd-Event"] == json.loads(body)["event"]
    stored = wait_for(lambda: len(web.events("instance_stored", study)) == 3 and
                      web.events("instance_stored", study), 10, "3 instance_stored POSTs")
    assert sorted(e["data"]["sop_instance_uid"] for e in stored) == sorted(
        str(ct_slice(number=n, **kw).SOPInstanceUID) for n in range(1, 4))

    # More images to the same study: announced again once quiet again, with the new totals.
    assert store_files(server.dicom_port, more_images(tmp_path / "b", range(4, 6), **kw)) \
        == [0, 0]
    msgs = wait_for(lambda: len(listener.for_study(study)) >= 2 and listener.for_study(study),
                    10, "a second ORU")
    second = fields(msgs[1])
    assert {o[3]: o[5] for o in second["OBX"]}["INSTANCES^Number of instances^L"] == "5"
    assert second["MSH"][0][10] != msh[10]   # a new control id
    # A barrier instead of a sleep: another study's announcement comes after several rounds
    # of the stable watcher; by then a duplicate of the first study would have shown.
    other = write_series(tmp_path / "c", seed=42, images=1, size=32)
    assert store_files(server.dicom_port, other) == [0]
    wait_for(lambda: listener.for_study(study_of(other[0])), 10, "the other study's ORU")
    wait_for(lambda: web.events("study_stable", study_of(other[0])), 10, "its POST")
    assert len(listener.for_study(study)) == 2
    assert len(web.events("study_stable", study)) == 2
    assert len(web.events("instance_stored", study)) == 5
    assert [e["data"]["instances"] for e in web.events("study_stable", study)] == [3, 5]


def test_deliveries_are_retried_then_accepted(make_server, mllp, receiver, tmp_path: Path,
                                              caplog) -> None:
    caplog.set_level(logging.INFO, logger="pacsd.plugins")
    listener = mllp(["AE", "close", "AA"])   # an application error, a hang-up, then accepted
    web = receiver([503, 200])
    server = make_server(
        hooks={"plugins": [HL7, WEBHOOK], "study_stable_after": STABLE},
        **{"plugin.hl7": {"host": LOCAL, "port": listener.port, "message": "ORM^O01"},
           "plugin.webhook": {"url": web.url + "/x"}})
    paths = write_series(tmp_path / "in", seed=43, images=1, size=32)
    study = study_of(paths[0])
    assert store_files(server.dicom_port, paths) == [0]
    wait_for(lambda: len(listener.for_study(study)) == 3, 10, "three tries of the ORM")
    msgs = listener.for_study(study)
    assert len({fields(m)["MSH"][0][10] for m in msgs}) == 1   # the same control id each time
    seg = fields(msgs[0])
    assert seg["MSH"][0][9] == "ORM^O01^ORM_O01"
    assert (seg["ORC"][0][1], seg["ORC"][0][5]) == ("SC", "CM")
    wait_for(lambda: "accepted by" in caplog.text, 10, "the ORM accepted")
    assert "try 1 of 3" in caplog.text and "try 2 of 3" in caplog.text
    wait_for(lambda: len(web.posts) == 2, 10, "the webhook's second try")
    assert len({h["X-Pacsd-Delivery"] for _, h, _ in web.posts}) == 1
    assert "HTTP 503" in caplog.text and "not delivered" not in caplog.text


def test_deliveries_given_up_with_a_warning(make_server, mllp, receiver, tmp_path: Path,
                                            caplog) -> None:
    listener = mllp(["AE", "AE", "AE"])
    web = receiver([400])   # a client error is final: not retried
    server = make_server(
        hooks={"plugins": [HL7, WEBHOOK], "study_stable_after": STABLE},
        **{"plugin.hl7": {"host": LOCAL, "port": listener.port, "attempts": 2},
           "plugin.webhook": {"url": web.url + "/x"}})
    paths = write_series(tmp_path / "in", seed=44, images=1, size=32)
    study = study_of(paths[0])
    assert store_files(server.dicom_port, paths) == [0]
    wait_for(lambda: "hl7: ORU^R01 for study" in caplog.text and "webhook: study_stable"
             in caplog.text, 10, "both warnings")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name.startswith("pacsd.plugins")]
    assert any(f"study {study} not delivered" in w and "after 2 tries" in w and "AE" in w
               for w in warnings), warnings
    assert any("HTTP 400" in w and "after 1 try" in w for w in warnings), warnings
    assert len(listener.for_study(study)) == 2 and len(web.posts) == 1
    # pacsd itself is unaffected: the study is stored and the plugins still loaded.
    assert [p.name for p in server.hooks.plugins] == ["hl7", "webhook"]


def test_silent_or_absent_receivers_bounded_by_the_time_budget(mllp, receiver) -> None:
    event = {"study_uid": "1.2.3", "patient_id": "P1", "instances": 1}
    listener = mllp(["silent"] * 5)
    settings = hl7.parse_settings({"host": LOCAL, "port": listener.port, "timeout": 0.4})
    text, control_id = hl7.build(event, settings)
    began = time.monotonic()
    assert hl7.deliver(text, control_id, settings, "1.2.3") is False
    assert 0.35 < time.monotonic() - began < 1.5
    # A port nobody listens on: refused at once, retried with back-off, within the budget.
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        closed_port = s.getsockname()[1]
    settings = hl7.parse_settings({"host": LOCAL, "port": closed_port, "timeout": 0.4,
                                   "attempts": 5})
    began = time.monotonic()
    assert hl7.deliver(text, control_id, settings) is False
    assert time.monotonic() - began < 1.5
    web = webhook.parse_settings({"url": f"http://{LOCAL}:{closed_port}/", "timeout": 0.4})
    began = time.monotonic()
    assert webhook.deliver(b"{}", {}, web, "test") is False
    assert time.monotonic() - began < 1.5


def test_bad_settings_leave_the_plugin_out(make_server, mllp, caplog) -> None:
    listener = mllp()
    server = make_server(
        hooks={"plugins": [HL7, WEBHOOK]},
        **{"plugin.hl7": {"host": LOCAL, "port": listener.port},
           "plugin.webhook": {"url": "file:///etc/passwd"}})
    assert [p.name for p in server.hooks.plugins] == ["hl7"]
    assert "pacsd.plugins.webhook not loaded" in caplog.text and "file" in caplog.text
    for bad, why in (({"host": LOCAL}, "port"), ({"host": LOCAL, "port": 1, "message": "ADT^A08"},
                                                  "message"),
                     ({"host": LOCAL, "port": 1, "viewer_url": "{nope}"}, "placeholders"),
                     ({"host": LOCAL, "port": 1, "colour": "red"}, "unknown")):
        with pytest.raises(ValueError, match=why):
            hl7.parse_settings(bad)
    for bad, why in (({"url": "ftp://x/"}, "http"), ({"url": "http:///nohost"}, "host"),
                     ({"url": "http://x/", "events": ["deleted"]}, "events")):
        with pytest.raises(ValueError, match=why):
            webhook.parse_settings(bad)


def test_hl7_escaping_and_names() -> None:
    assert hl7.escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    assert hl7.escape("two\r\nlines") == "two lines"
    assert hl7.person("Yamada^Tarou=山田^太郎=やまだ^たろう") == "Yamada^Tarou"
    assert hl7.person("=山田^太郎") == "山田^太郎"
    assert hl7.person("Doe^John^Q^Dr^III") == "Doe^John^Q^III^Dr"
    assert hl7.timestamp("20240102", "08:30:15.25") == "20240102083015"
    assert hl7.timestamp("2024", "0830") == ""
    assert hl7.parse_ack(b"\x0bMSH|^~\\&|R|F|||1||ACK|9|P|2.5\rMSA|CA|X1\r\x1c\x0d") == (
        "CA", "X1", "")
