"""HL7 v2.5 over MLLP: tell a RIS/HIS that a study's images are available, once it is stable.

    [hooks]
    plugins = ["pacsd.plugins.hl7"]
    [plugin.hl7]
    host = "ris.example.org"        # required
    port = 2575                     # required
    message = "ORU^R01"             # or "ORM^O01" (an order status update: exam completed)
    receiving_application = "RIS"   # MSH-5; receiving_facility: MSH-6
    viewer_url = "https://pacs.example.org/viewer?study={study_uid}"   # optional OBX
    timeout = 4.0                   # seconds for the whole delivery, every try included
    attempts = 3                    # tries at most (connection error, no ACK, AE/CE answer)

One message per study each time it becomes stable (`[hooks] study_stable_after` seconds
without a new instance); a study that receives more images later is announced again, with its
new totals and a new control id. The message:

    MSH|^~\\&|PACSD|<our AE>|<receiving app>|<receiving facility>|<now>||ORU^R01^ORU_R01|
        <control id>|P|2.5||||||UNICODE UTF-8
    PID|1||<patient id>^^^<issuer>||<family^given^middle^suffix^prefix>||<birth date>|<sex>
    ORC|RE (SC for ORM^O01)||<accession number>||CM
    OBR|1||<accession number>|^<study description>|||<study date+time>|...|<referring
        physician> (OBR-16)|...|<study UID> (OBR-20)||<now> (OBR-22)||<first modality>
        (OBR-24)|R (OBR-25: results stored, not yet verified)
    OBX|1|ST|110180^Study Instance UID^DCM||<study UID>||||||F
    OBX|2|ST|MODALITIES^Modalities in study^L||CT~SR||||||F
    OBX|3|NM|SERIES^Number of series^L||2||||||F
    OBX|4|NM|INSTANCES^Number of instances^L||120||||||F
    OBX|5|RP|VIEWER^Viewer URL^L||<viewer_url filled in>||||||F    (when viewer_url is set)

Values are escaped (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\; line breaks become spaces); DICOM person
names (family^given^middle^prefix^suffix, alphabetic group) become HL7 XPN components.

Delivery is best-effort: one connection per try, framed 0x0B ... 0x1C 0x0D, then the ACK is
awaited. MSA-1 AA or CA (for our control id) is success; AE/CE, no answer, a closed or refused
connection are retried after 0.25 s, 0.5 s, ... as long as `timeout` allows; AR/CR (the
receiver rejects the message itself) is not retried. After that a WARNING is logged and the
message is dropped: nothing is queued across restarts. Keep `timeout` within `[hooks]
timeout`, else pacsd also logs the hook as late.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

NAME = "hl7"
MESSAGES = ("ORU^R01", "ORM^O01")
START, END = b"\x0b", b"\x1c\x0d"
BACKOFF_S = 0.25
MAX_ACK_BYTES = 1 << 20
URL_FIELDS = ("study_uid", "accession_number", "patient_id")
KNOWN = {"host", "port", "message", "sending_application", "sending_facility",
         "receiving_application", "receiving_facility", "processing_id", "viewer_url",
         "timeout", "attempts"}


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    message: str = "ORU^R01"
    sending_application: str = "PACSD"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    viewer_url: str = ""
    timeout: float = 4.0
    attempts: int = 3


_settings: Settings | None = None


def parse_settings(raw: dict[str, Any], aet: str = "PACSD") -> Settings:
    """[plugin.hl7] as Settings; ValueError or TypeError says what is wrong (the plugin is then
    left out)."""
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise ValueError(f"[plugin.hl7]: unknown setting(s) {', '.join(unknown)}")
    host, port = raw.get("host"), raw.get("port")
    if not isinstance(host, str) or not host:
        raise ValueError("[plugin.hl7] host is required")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError("[plugin.hl7] port must be a TCP port number")
    message = raw.get("message", "ORU^R01")
    if message not in MESSAGES:
        raise ValueError(f"[plugin.hl7] message must be one of {', '.join(MESSAGES)}")
    timeout, attempts = raw.get("timeout", 4.0), raw.get("attempts", 3)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError("[plugin.hl7] timeout must be a positive number of seconds")
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 20:
        raise ValueError("[plugin.hl7] attempts must be between 1 and 20")
    strings = {}
    for key in ("sending_application", "sending_facility", "receiving_application",
                "receiving_facility", "processing_id", "viewer_url"):
        value = raw.get(key, "")
        if not isinstance(value, str):
            raise TypeError(f"[plugin.hl7] {key} must be a string")
        strings[key] = value
    try:
        strings["viewer_url"].format_map({k: "x" for k in URL_FIELDS})
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"[plugin.hl7] viewer_url: placeholders are {{study_uid}}, "
                         f"{{accession_number}}, {{patient_id}} ({type(e).__name__}: {e})"
                         ) from None
    return Settings(host=host, port=port, message=message,
                    sending_application=strings["sending_application"] or "PACSD",
                    sending_facility=strings["sending_facility"] or aet,
                    receiving_application=strings["receiving_application"],
                    receiving_facility=strings["receiving_facility"],
                    processing_id=strings["processing_id"] or "P",
                    viewer_url=strings["viewer_url"], timeout=float(timeout),
                    attempts=attempts)


def setup(settings: dict[str, Any], context: Any) -> None:
    global _settings
    _settings = parse_settings(settings, str(getattr(context, "aet", "") or "PACSD"))
    log.info("hl7: %s to %s:%d when a study is stable", _settings.message, _settings.host,
             _settings.port)


def on_study_stable(event: dict[str, Any]) -> None:
    s = _settings
    if s is None:
        return
    text, control_id = build(event, s)
    deliver(text, control_id, s, str(event.get("study_uid", "")))


# --- the message ------------------------------------------------------------------------------

def escape(value: object) -> str:
    """A value made safe inside one HL7 component (PS: HL7 v2.5 2.7.4 escape sequences)."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\E\\")   # first: the others bring backslashes in
    for char, esc in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, esc)
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def person(pn: object) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, `=` between representations) as HL7 XPN
    components family^given^middle^suffix^prefix; the first non-empty representation."""
    groups = [g for g in str(pn or "").split("=") if g.strip("^ ")]
    if not groups:
        return ""
    parts = (groups[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return "^".join(escape(p) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def timestamp(date: object, tm: object = "") -> str:
    """DICOM DA + TM as an HL7 DTM (YYYYMMDD[HHMM[SS]]); fractions and old colons dropped."""
    day = "".join(c for c in str(date or "") if c.isdigit())[:8]
    if len(day) != 8:
        return ""
    clock = "".join(c for c in str(tm or "").split(".")[0] if c.isdigit())[:6]
    return day + (clock if len(clock) in (2, 4, 6) else "")


def _segment(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def build(event: dict[str, Any], s: Settings, now: float | None = None,
          control_id: str | None = None) -> tuple[str, str]:
    """(the message, its control id) for one on_study_stable event."""
    now_text = time.strftime("%Y%m%d%H%M%S%z", time.localtime(now))
    control_id = control_id or uuid.uuid4().hex[:20].upper()
    study_uid = str(event.get("study_uid", ""))
    accession = escape(event.get("accession_number", ""))
    modalities = [str(m) for m in event.get("modalities") or [] if m]
    patient = escape(event.get("patient_id", ""))
    issuer = str(event.get("issuer_of_patient_id", "") or "")
    if issuer:
        patient += "^^^" + escape(issuer)
    sex = str(event.get("patient_sex", "") or "").strip().upper()
    description = str(event.get("study_description", "") or "") or "Imaging study"
    referring = person(event.get("referring_physician_name", ""))
    segments = [
        _segment("MSH", "^~\\&", escape(s.sending_application), escape(s.sending_facility),
                 escape(s.receiving_application), escape(s.receiving_facility), now_text, "",
                 f"{s.message}^{s.message.replace('^', '_')}", control_id,
                 escape(s.processing_id), "2.5", "", "", "", "", "", "UNICODE UTF-8"),
        _segment("PID", "1", "", patient, "", person(event.get("patient_name", "")), "",
                 timestamp(event.get("patient_birth_date", "")),
                 sex if sex in ("M", "F", "O") else ""),
        _segment("ORC", "SC" if s.message == "ORM^O01" else "RE", "", accession, "", "CM"),
        _segment("OBR", "1", "", accession, "^" + escape(description), "", "",
                 timestamp(event.get("study_date", ""), event.get("study_time", "")),
                 "", "", "", "", "", "", "", "", "^" + referring if referring else "",
                 "", "", "", escape(study_uid), "", now_text, "",
                 escape(modalities[0]) if modalities else "", "R"),
    ]
    observations = [("ST", "110180^Study Instance UID^DCM", escape(study_uid)),
                    ("ST", "MODALITIES^Modalities in study^L",
                     "~".join(escape(m) for m in modalities)),
                    ("NM", "SERIES^Number of series^L", str(int(event.get("series") or 0))),
                    ("NM", "INSTANCES^Number of instances^L",
                     str(int(event.get("instances") or 0)))]
    if s.viewer_url:
        url = s.viewer_url.format_map({k: quote(str(event.get(k, "") or ""), safe="")
                                       for k in URL_FIELDS})
        observations.append(("RP", "VIEWER^Viewer URL^L", escape(url)))
    for n, (kind, code, value) in enumerate(observations, 1):
        segments.append(_segment("OBX", str(n), kind, code, "", value, "", "", "", "", "",
                                 "F"))
    return "\r".join(segments) + "\r", control_id


# --- MLLP -------------------------------------------------------------------------------------

def parse_ack(frame: bytes) -> tuple[str, str, str]:
    """(MSA-1 acknowledgment code, MSA-2 control id, MSA-3 text) of an ACK, framing removed."""
    text = frame.split(START, 1)[-1].split(END, 1)[0].decode("utf-8", "replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    sep = segments[0][3] if segments and segments[0].startswith("MSH") and \
        len(segments[0]) > 3 else "|"
    for seg in segments:
        if seg.startswith("MSA"):
            fields = seg.split(sep) + ["", "", ""]
            return fields[1].strip().upper(), fields[2].strip(), fields[3].strip()
    raise ValueError("the answer has no MSA segment")


def exchange(host: str, port: int, data: bytes, timeout: float) -> tuple[str, str, str]:
    """Send one framed message on a new connection and read the framed answer, all within
    `timeout` seconds; the answer's MSA fields."""
    end = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(end - time.monotonic(), 0.001))
        sock.sendall(data)
        answer = b""
        while END not in answer:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no acknowledgement in time")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed without an acknowledgement")
            answer += chunk
            if len(answer) > MAX_ACK_BYTES:
                raise ValueError("the answer is too long for an acknowledgement")
    return parse_ack(answer)


def deliver(text: str, control_id: str, s: Settings, study_uid: str = "") -> bool:
    """Send `text` until acknowledged, at most `s.attempts` tries within `s.timeout` seconds;
    whether it was accepted. Never raises for a network or receiver problem."""
    data = START + text.encode("utf-8") + END
    log.debug("hl7: message %s:\n%s", control_id, text.replace("\r", "\n"))
    deadline = time.monotonic() + s.timeout
    where = f"{s.host}:{s.port}"
    delay, problem, tries = BACKOFF_S, "no time to try", 0
    while tries < s.attempts:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        tries += 1
        try:
            code, acked, note = exchange(s.host, s.port, data, left)
        except (OSError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        else:
            if code in ("AA", "CA") and acked == control_id:
                log.info("hl7: %s for study %s accepted by %s (control id %s)", s.message,
                         study_uid, where, control_id)
                return True
            problem = (f"answered {code or 'nothing'} for control id {acked!r}"
                       + (f": {note}" if note else ""))
            if code in ("AR", "CR"):
                log.warning("hl7: %s for study %s rejected by %s (%s); not sent again",
                            s.message, study_uid, where, problem)
                return False
        wait = min(delay, deadline - time.monotonic())
        if tries >= s.attempts or wait <= 0:
            break
        log.info("hl7: try %d of %d to %s failed (%s); again in %.2f s", tries, s.attempts,
                 where, problem, wait)
        time.sleep(wait)
        delay *= 2
    log.warning("hl7: %s for study %s not delivered to %s after %d tr%s in %g s (%s); given "
                "up (best-effort: not queued)", s.message, study_uid, where, tries,
                "y" if tries == 1 else "ies", s.timeout, problem)
    return False
