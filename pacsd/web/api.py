"""The pages' JSON API for studies: the list, one study, its tags, ZIP, send, delete, jobs.

Matching reuses `pacsd.query.condition` (the C-FIND / QIDO-RS semantics) on the indexed
columns; the list is sorted and paged in SQL, so a page of 50 out of half a million studies
costs what a page of 50 costs. Administration (nodes, users, status, log) is in admin.py.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Iterator

import bottle
from peewee import fn
from pydicom.datadict import dictionary_description
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacsd import query
from pacsd.nodes import remote
from pacsd.errors import InvalidDataset
from pacsd.imaging.header import is_valid_uid, read_file_header
from pacsd.index.models import Instance, Patient, Series, Study, reading
from pacsd.web.auth import is_admin
from pacsd.web.guard import client_of

log = logging.getLogger(__name__)

MAX_LIMIT = 500
SORTS: dict[str, tuple[Any, ...]] = {
    "date": (Study.study_date, Study.study_time),
    "patient": (Patient.patient_name_key,),
    "patient_id": (Patient.patient_id,),
    "accession": (Study.accession_number,),
    "description": (Study.study_description,),
    "modalities": (Study.modalities_in_study,),
    "instances": (Study.number_of_instances,),
    "received": (Study.created,),
}
STUDY_FIELDS = (Study.study_instance_uid, Patient.patient_name, Patient.patient_id,
                Patient.patient_birth_date, Patient.patient_sex, Study.study_date,
                Study.study_time, Study.accession_number, Study.study_description,
                Study.modalities_in_study, Study.number_of_series, Study.number_of_instances,
                Study.study_id, Study.referring_physician_name, Study.institution_name,
                Study.created)
STUDY_NAMES = ("study_uid", "patient_name", "patient_id", "birth_date", "sex", "study_date",
               "study_time", "accession", "description", "modalities", "series", "instances",
               "study_id", "referring", "institution", "received")
TAG_VALUE_MAX = 256
TAG_DEPTH_MAX = 8
TAG_ITEMS_MAX = 100


def json_response(data: Any, status: int = 200) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(data), status, {"Content-Type": "application/json"})


def fail(status: int, message: str) -> bottle.HTTPResponse:
    return json_response({"error": message}, status)


def need_admin() -> None:
    if not is_admin(bottle.request.environ):
        raise fail(403, "administrators only")


def json_body() -> dict[str, Any]:
    try:
        data = json.loads(bottle.request.body.read(1 << 20) or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise fail(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise fail(400, "the body must be a JSON object")
    return data


def check_uid(uid: str) -> str:
    if not is_valid_uid(uid):
        raise fail(400, f"{uid[:80]!r} is not a UID")
    return uid


def _words(text: str) -> str:
    """What a person types for a name ("doe jo") as a DICOM pattern: every word, in order,
    anywhere (`*DOE*JO*`); DICOM wildcards typed are kept."""
    words = [w for w in re.split(r"[\s,^]+", text.strip()) if w]
    return "*" + "*".join(words) + "*" if words else ""


def _prefix(text: str) -> str:
    text = text.strip()
    return text if not text or "*" in text or "?" in text else text + "*"


def parse_date(text: str, name: str) -> str:
    text = text.strip().replace("-", "")
    if text and not re.fullmatch(r"\d{8}", text):
        raise fail(400, f"{name} must be a date YYYYMMDD or YYYY-MM-DD")
    return text


def study_conditions(q: Any) -> list[Any]:
    """Conditions for the list's search fields (query string `q`)."""
    keys: dict[str, str] = {}
    if q.get("patient"):
        keys["PatientName"] = _words(q.get("patient"))
    if q.get("patient_id"):
        keys["PatientID"] = _prefix(q.get("patient_id"))
    if q.get("accession"):
        keys["AccessionNumber"] = _prefix(q.get("accession"))
    if q.get("modality"):
        keys["ModalitiesInStudy"] = q.get("modality").strip().upper()
    first, last = parse_date(q.get("from", ""), "from"), parse_date(q.get("to", ""), "to")
    if first or last:
        keys["StudyDate"] = f"{first}-{last}" if first != last else first
    try:
        conds = [c for k, v in keys.items() if (c := query.condition(k, v)) is not None]
    except query.QueryError as e:
        raise fail(400, str(e)) from None
    if q.get("description", "").strip():
        # Case-insensitive substring: what people expect of a description box.
        conds.append(Study.study_description.contains(q.get("description").strip()))
    return conds


def _int(q: Any, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(q.get(name) or default)
    except ValueError:
        raise fail(400, f"{name} must be an integer") from None
    return max(low, min(high, value))


def _study_dict(row: tuple) -> dict[str, Any]:
    d = dict(zip(STUDY_NAMES, row, strict=True))
    d["received"] = str(d["received"] or "")
    return d


def list_studies(q: Any) -> dict[str, Any]:
    conds = study_conditions(q)
    sort = q.get("sort") or "date"
    if sort not in SORTS:
        raise fail(400, f"sort must be one of {', '.join(SORTS)}")
    desc = (q.get("order") or ("desc" if sort in ("date", "received") else "asc")) == "desc"
    limit = _int(q, "limit", 50, 1, MAX_LIMIT)
    offset = _int(q, "offset", 0, 0, 1 << 40)
    order = [f.desc() if desc else f.asc() for f in SORTS[sort]]
    order.append(Study.id.desc() if desc else Study.id.asc())
    with reading():
        base = Study.select().join(Patient)
        for c in conds:
            base = base.where(c)
        total = base.count()
        rows: Any = base.select(*STUDY_FIELDS).order_by(*order).limit(limit).offset(offset)
        studies = [_study_dict(r) for r in rows.tuples()]
    return {"total": total, "offset": offset, "limit": limit, "studies": studies}


def one_study(uid: str) -> dict[str, Any]:
    check_uid(uid)
    with reading():
        row = (Study.select(*STUDY_FIELDS).join(Patient)
               .where(Study.study_instance_uid == uid).tuples().first())
        if row is None:
            raise fail(404, "no such study")
        study = _study_dict(row)
        first_sop = (Instance.select(Instance.sop_instance_uid)
                     .where(Instance.series == Series.id)
                     .order_by(fn.COALESCE(Instance.instance_number, 1 << 30), Instance.id)
                     .limit(1))
        series: Any = (Series.select(Series.series_instance_uid, Series.series_number,
                                Series.modality, Series.series_description,
                                Series.body_part_examined, Series.number_of_instances,
                                first_sop.alias("first_sop"))
                  .join(Study).where(Study.study_instance_uid == uid)
                  .order_by(fn.COALESCE(Series.series_number, 1 << 30), Series.id).tuples())
        study["series"] = [dict(zip(("series_uid", "number", "modality", "description",
                                     "body_part", "instances", "first_sop"), r, strict=True))
                           for r in series]
    return study


# --- tags -------------------------------------------------------------------------------------

def _value(elem: DataElement) -> str:
    if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or isinstance(elem.value, bytes):
        length = len(elem.value) if elem.value is not None else 0
        return f"<{length} bytes>"
    if elem.value is None:
        return ""
    text = elem.repval if elem.VM > 64 else (
        "\\".join(str(v) for v in elem.value) if elem.VM > 1 else str(elem.value))
    return text if len(text) <= TAG_VALUE_MAX else text[:TAG_VALUE_MAX] + "…"


def tag_list(ds: Dataset, depth: int = 0) -> list[dict[str, Any]]:
    out = []
    for elem in ds:
        try:
            name = dictionary_description(elem.tag) if not elem.tag.is_private else ""
        except KeyError:
            name = ""
        entry: dict[str, Any] = {"tag": f"({elem.tag.group:04X},{elem.tag.element:04X})",
                                 "name": name or elem.name, "keyword": elem.keyword,
                                 "vr": elem.VR}
        if elem.VR == "SQ":
            items = list(elem.value or [])
            entry["value"] = f"{len(items)} item(s)"
            entry["items"] = ([tag_list(item, depth + 1) for item in items[:TAG_ITEMS_MAX]]
                              if depth < TAG_DEPTH_MAX else [])
        else:
            try:
                entry["value"] = _value(elem)
            except Exception:   # a value pydicom cannot convert: show it raw, cut
                entry["value"] = repr(elem.value)[:TAG_VALUE_MAX]
        out.append(entry)
    return out


def instance_tags(rt: Any, sop: str) -> list[dict[str, Any]]:
    check_uid(sop)
    with reading():
        path = (Instance.select(Instance.path).where(Instance.sop_instance_uid == sop)
                .scalar())
    if path is None:
        raise fail(404, "no such instance")
    try:
        # a deflated one is inflated only as far as its header, within limits
        ds = read_file_header(rt.archive.store.path(path), defer_size=None)
    except (InvalidDicomError, OSError, ValueError, InvalidDataset) as e:
        raise fail(500, f"the stored file cannot be read: {e}") from None
    return tag_list(ds.file_meta) + tag_list(ds)


# --- actions ----------------------------------------------------------------------------------

def stored(level: str, uid: str) -> list[query.StoredInstance]:
    check_uid(uid)
    key = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}[level]
    with reading():
        insts = query.instances(query.Request(level, {key: uid}))
    if not insts:
        raise fail(404, f"no such {level.lower()}")
    return insts


def send(rt: Any, level: str, uid: str) -> bottle.HTTPResponse:
    name = str(json_body().get("node") or "")
    node = rt.accounts.node(name)
    if node is None:
        raise fail(404, f"no node named {name!r}")
    insts = stored(level, uid)
    cfg, store = rt.cfg, rt.archive.store

    def work(job: Any) -> str:
        job.total = len(insts)
        done, failed = remote.send(cfg, node, insts, store, progress=job.progress)
        return f"{done} sent, {failed} failed"
    job = rt.jobs.start("send", f"Send {len(insts)} instance(s) of a {level.lower()} to "
                        f"{node.name}", work)
    log.info("send of %s %s to %s started (job %s)", level.lower(), uid, node.aet, job.id)
    return json_response({"job": job.id}, 202)


def delete(rt: Any, level: str, uid: str) -> dict[str, int]:
    need_admin()
    check_uid(uid)
    n = rt.archive.delete(level, [uid])
    if not n:
        raise fail(404, f"no such {level.lower()}")
    user = bottle.request.environ.get("pacsd.user")
    log.warning("%s %s deleted (%d instances) by %s from %s", level.lower(), uid, n,
                user.name if user else "an open-access caller", client_of(bottle.request.environ))
    return {"deleted": n}


def zip_download(rt: Any, level: str, uid: str) -> Iterator[bytes]:
    from pacsd.imaging.media import zip_stream
    insts = stored(level, uid)
    with reading():
        row = (Study.select(Patient.patient_id, Study.study_date).join(Patient)
               .switch(Study).join(Series).join(Instance)
               .where(Instance.sop_instance_uid == insts[0].sop_instance_uid).tuples().first())
    stem = "-".join(p for p in (row or ()) if p) or "study"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] + ("" if level == "STUDY" else "-series")
    with_dicomdir = bottle.request.query.get("dicomdir", "1") not in ("0", "no", "false")
    store = rt.archive.store
    bottle.response.content_type = "application/zip"
    bottle.response.set_header("Content-Disposition", f'attachment; filename="{stem}.zip"')
    return zip_stream([store.path(i.path) for i in insts], dicomdir=with_dicomdir)


def make_app(rt: Any) -> bottle.Bottle:
    from pacsd.web import new_app
    app = new_app()

    def route(method: str, path: str, fn_: Callable) -> None:
        app.route("/api" + path, method, fn_)

    route("GET", "/studies", lambda: list_studies(bottle.request.query))
    route("GET", "/studies/<uid>", one_study)
    route("GET", "/instances/<sop>/tags", lambda sop: json_text(instance_tags(rt, sop)))
    route("GET", "/studies/<uid>/zip", lambda uid: zip_download(rt, "STUDY", uid))
    route("GET", "/series/<uid>/zip", lambda uid: zip_download(rt, "SERIES", uid))
    route("POST", "/studies/<uid>/send", lambda uid: send(rt, "STUDY", uid))
    route("POST", "/series/<uid>/send", lambda uid: send(rt, "SERIES", uid))
    route("DELETE", "/studies/<uid>", lambda uid: delete(rt, "STUDY", uid))
    route("DELETE", "/series/<uid>", lambda uid: delete(rt, "SERIES", uid))
    route("GET", "/jobs", lambda: json_text([j.as_dict() for j in rt.jobs.recent()]))

    def job(job_id: str) -> dict[str, Any]:
        found = rt.jobs.get(job_id)
        if found is None:
            raise fail(404, "no such job")
        return found.as_dict()
    route("GET", "/jobs/<job_id>", job)
    return app


def json_text(data: Any) -> str:
    bottle.response.content_type = "application/json"
    return json.dumps(data)
