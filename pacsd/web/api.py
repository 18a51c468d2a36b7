"""The pages' JSON API for studies: the list, one study, its tags, ZIP, send, delete, jobs.

The reads are `pacsd.query.studies` (a search box's matching, sorted and paged in
SQL); this module turns the query string into their arguments and their answers into JSON.
Administration (nodes, users, status, log) is in admin.py.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Iterator

import bottle
from pydicom.datadict import dictionary_description
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacsd import query
from pacsd.nodes import ondemand, remote
from pacsd.errors import InvalidDataset
from pacsd.imaging.header import is_valid_uid, read_file_header
from pacsd.config import Config, valid_label
from pacsd.query import scope as scopes, studies
from pacsd.web import visibility
from pacsd.web.app import new_app, utf8_query
from pacsd.web.auth import is_admin
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime
from pacsd.web import deidentified
from pacsd.web.visibility import check_study

log = logging.getLogger(__name__)

MAX_LIMIT = 500
SEARCH_MAX = 256   # characters of a search field read (a PN is 5 x 64 per group, at most)
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


def _typed(q: Any, name: str) -> str:
    """A search field as typed, bounded, without the DICOM wildcards people carry over from
    other PACS (`MUL*`): the list's search matches words and substrings anyway."""
    return re.sub(r"[*?]", " ", (q.get(name) or "")[:SEARCH_MAX]).strip()


def parse_date(text: str, name: str) -> str:
    text = text.strip().replace("-", "")
    if text and not re.fullmatch(r"\d{8}", text):
        raise fail(400, f"{name} must be a date YYYYMMDD or YYYY-MM-DD")
    return text


def study_conditions(q: Any) -> list[Any]:
    """Conditions for the list's search fields (query string `q`): name, description, patient
    ID and accession as studies.conditions says (case and accents ignored); modality and date
    range by DICOM matching."""
    keys: dict[str, str] = {}
    if q.get("modality"):
        keys["ModalitiesInStudy"] = q.get("modality").strip().upper()
    first, last = parse_date(q.get("from", ""), "from"), parse_date(q.get("to", ""), "to")
    if first or last:
        keys["StudyDate"] = f"{first}-{last}" if first != last else first
    # A QueryError (too many words, a bad modality pattern) goes to the errors plugin: 400
    # and one log line.
    conds = studies.conditions(keys, description=_typed(q, "description"),
                               name=_typed(q, "patient"), patient_id=_typed(q, "patient_id"),
                               accession=_typed(q, "accession"))
    if q.get("label"):
        try:
            conds.append(scopes.with_label(valid_label(q.get("label"))))
        except ValueError as e:
            raise fail(400, str(e)) from None
    seen = visibility.scope()
    if seen is not None:
        conds.append(seen.condition())
    return conds


def _int(q: Any, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(q.get(name) or default)
    except ValueError:
        raise fail(400, f"{name} must be an integer") from None
    return max(low, min(high, value))


def list_studies(q: Any, cfg: Config | None = None) -> dict[str, Any]:
    conds = study_conditions(q)
    sort = q.get("sort") or "date"
    if sort not in studies.SORTS:
        raise fail(400, f"sort must be one of {', '.join(studies.SORTS)}")
    desc = (q.get("order") or ("desc" if sort in ("date", "received") else "asc")) == "desc"
    limit = _int(q, "limit", 50, 1, MAX_LIMIT)
    offset = _int(q, "offset", 0, 0, 1 << 40)
    # Labels are this archive's: a search by label does not fall through.
    upstream = (ondemand.start(cfg, "STUDY", upstream_keys(q), visibility.scope())
                if cfg is not None and not q.get("label") else None)
    total, page = studies.study_page(conds, sort, desc, limit, offset)
    labels = scopes.labels_of(s["study_uid"] for s in page)
    for s in page:
        s["labels"] = labels[s["study_uid"]]
    if upstream is not None:
        # Local first, then the upstreams' studies that are not stored here at all, in the
        # order they came: the page is cut from that merged list.
        found = upstream.results(())
        stored = studies.patients_of_studies([f.values["StudyInstanceUID"] for f in found])
        rows = [upstream_row(f) for f in found if f.values["StudyInstanceUID"] not in stored]
        first = max(0, offset - total)
        page += rows[first:first + max(0, limit - len(page))]
        total += len(rows)
    return {"total": total, "offset": offset, "limit": limit, "studies": page}


# The study list's fields as the upstreams' C-FIND return keys (PS3.4 C.6.2.1.2).
_UPSTREAM_FIELDS = {"patient_name": "PatientName", "patient_id": "PatientID",
                    "birth_date": "PatientBirthDate", "sex": "PatientSex",
                    "study_date": "StudyDate", "study_time": "StudyTime",
                    "accession": "AccessionNumber", "description": "StudyDescription",
                    "modalities": "ModalitiesInStudy", "series": "NumberOfStudyRelatedSeries",
                    "instances": "NumberOfStudyRelatedInstances", "study_id": "StudyID",
                    "referring": "ReferringPhysicianName", "institution": "InstitutionName"}


def upstream_keys(q: Any) -> dict[str, str]:
    """The list's search fields as C-FIND keys for the upstreams: the words typed as
    wildcards (`*text*`; the IDs as prefixes), the dates as a range."""
    keys = {k: "" for k in _UPSTREAM_FIELDS.values()}
    keys["StudyInstanceUID"] = ""
    for field, keyword, pattern in (("patient", "PatientName", "*{}*"),
                                    ("description", "StudyDescription", "*{}*"),
                                    ("patient_id", "PatientID", "{}*"),
                                    ("accession", "AccessionNumber", "*{}*")):
        text = _typed(q, field)
        if text:
            keys[keyword] = pattern.format(" ".join(text.split()).replace(" ", "*"))
    if q.get("modality"):
        keys["ModalitiesInStudy"] = q.get("modality").strip().upper()
    first, last = parse_date(q.get("from", ""), "from"), parse_date(q.get("to", ""), "to")
    if first or last:
        keys["StudyDate"] = f"{first}-{last}" if first != last else first
    return keys


def upstream_row(found: ondemand.Found) -> dict[str, Any]:
    """An upstream's study as a row of the list, marked with the node that has it."""
    v = found.values
    row: dict[str, Any] = {name: v.get(kw, "") for name, kw in _UPSTREAM_FIELDS.items()}
    for name in ("series", "instances"):
        try:
            row[name] = int(row[name])
        except (TypeError, ValueError):
            row[name] = None
    row.update(study_uid=v["StudyInstanceUID"], received="", labels=[],
               upstream=found.node.name)
    return row


def one_study(uid: str) -> dict[str, Any]:
    check_uid(uid)
    visibility.check_study(None, uid)
    study = studies.study_summary(uid)
    if study is None:
        raise fail(404, "no such study")
    study["labels"] = scopes.labels_of([uid])[uid]
    return study


def relabel(rt: Runtime, uid: str) -> dict[str, Any]:
    """POST {"add": [...], "remove": [...]}: administrators label studies by hand."""
    need_admin()
    check_uid(uid)
    body = json_body()
    lists = {}
    for key in ("add", "remove"):
        value = body.get(key) or []
        if not isinstance(value, list) or len(value) > 100:
            raise fail(400, f"{key} must be a list of labels")
        try:
            lists[key] = [valid_label(v) for v in value]
        except ValueError as e:
            raise fail(400, str(e)) from None
    after = rt.archive.index.relabel(uid, lists["add"], lists["remove"])
    log.info("study %s labels by %s: %s", uid, web_caller(), ", ".join(after) or "none")
    return {"study_uid": uid, "labels": after}


def labels_in_use() -> str:
    return json_text([{"label": label, "studies": n} for label, n in scopes.all_labels()
                      if not visibility.restricted()
                      or label in (visibility.scope() or scopes.Scope()).labels])


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


def instance_tags(rt: Runtime, sop: str) -> list[dict[str, Any]]:
    check_uid(sop)
    visibility.check_level(None, "IMAGE", sop)
    path = studies.instance_path(sop)
    if path is None:
        raise fail(404, "no such instance")
    try:
        # a deflated one is inflated only as far as its header, within limits
        ds = read_file_header(rt.archive.store.placed(path), defer_size=None)
    except (InvalidDicomError, OSError, ValueError, InvalidDataset) as e:
        raise fail(500, f"the stored file cannot be read: {e}") from None
    return tag_list(ds.file_meta) + tag_list(ds)


# --- actions ----------------------------------------------------------------------------------

def stored(level: str, uid: str) -> list[query.StoredInstance]:
    check_uid(uid)
    visibility.check_level(None, level, uid)
    insts = studies.stored_in(level, uid)
    if not insts:
        raise fail(404, f"no such {level.lower()}")
    return insts


def send(rt: Runtime, level: str, uid: str) -> bottle.HTTPResponse:
    body = json_body()
    name = str(body.get("node") or "")
    node = rt.accounts.node(name)
    if node is None:
        raise fail(404, f"no node named {name!r}")
    insts = stored(level, uid)
    check_study(bottle.request.environ, insts[0].study_instance_uid)
    cfg, store = rt.cfg, rt.archive.store
    deid = deidentified.wanted(body)   # {"deidentify": true, ...}: each instance on its way

    def work(job: Any) -> str:
        job.total = len(insts)
        done, failed = remote.send(cfg, node, insts, store, progress=job.progress,
                                   transform=deid.apply if deid else None)
        said = f"{done} sent, {failed} failed"
        if deid is not None:
            said += " (de-identified)" + "".join(f"; {n.line()}" for n in deid.notes())
        return said
    job = rt.jobs.start("send", f"Send {len(insts)} instance(s) of a {level.lower()} to "
                        f"{node.name}" + (", de-identified" if deid else ""), work)
    log.info("send of %s %s to %s started (job %s)%s", level.lower(), uid, node.aet, job.id,
             ", de-identified" if deid else "")
    return json_response({"job": job.id}, 202)


def delete(rt: Runtime, level: str, uid: str) -> dict[str, int]:
    need_admin()
    check_uid(uid)
    n = rt.archive.delete(level, [uid], who=web_caller())
    if not n:
        raise fail(404, f"no such {level.lower()}")
    user = bottle.request.environ.get("pacsd.user")
    log.warning("%s %s deleted (%d instances) by %s from %s, into the recycle bin",
                level.lower(), uid, n, user.name if user else "an open-access caller",
                client_of(bottle.request.environ))
    return {"deleted": n}


def web_caller() -> str:
    """Who made this request, for the history: the user and where from."""
    env = bottle.request.environ
    user = env.get("pacsd.user")
    return f"{user.name if user else 'open access'} (web, {client_of(env)})"


def zip_download(rt: Runtime, level: str, uid: str) -> Iterator[bytes]:
    from pacsd.imaging.media import zip_stream
    insts = stored(level, uid)
    study_uid = insts[0].study_instance_uid
    check_study(bottle.request.environ, study_uid)
    deid = deidentified.wanted(utf8_query())
    row = studies.patient_and_date(insts[0].sop_instance_uid)
    stem = "-".join(p for p in (row or ()) if p) or "study"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] + ("" if level == "STUDY" else "-series")
    with_dicomdir = bottle.request.query.get("dicomdir", "1") not in ("0", "no", "false")
    store = rt.archive.store
    bottle.response.content_type = "application/zip"
    if deid is None:
        bottle.response.set_header("Content-Disposition", f'attachment; filename="{stem}.zip"')
        return zip_stream([store.placed(i.path) for i in insts], dicomdir=with_dicomdir)
    # De-identified: no patient data in the name either; the warning known from the index
    # goes in a header, the full one in README.txt at the end.
    bottle.response.set_header("Content-Disposition",
                               'attachment; filename="deidentified.zip"')
    risky = deidentified.preview(store, study_uid, uid if level == "SERIES" else None)
    if risky:
        bottle.response.set_header(deidentified.HEADER, deidentified.header_value(risky))
    log.info("de-identified ZIP of %s %s (%d instances) for %s", level.lower(), uid,
             len(insts), web_caller())
    return zip_stream([store.placed(i.path) for i in insts], dicomdir=with_dicomdir,
                      transform=deid.apply, trailer=lambda: deidentified.readme(deid))


def deidentify_preview(rt: Runtime, uid: str) -> dict[str, Any]:
    """What a de-identified export of the study will warn about (the page asks first)."""
    check_uid(uid)
    check_study(bottle.request.environ, uid)
    if studies.study_summary(uid) is None:
        raise fail(404, "no such study")
    series = deidentified.preview(rt.archive.store, uid)
    return {"burned_in": series,
            "warning": ("" if not series else
                        "The pixel data is not de-identified: these series may show "
                        "identifying text burned into the images: "
                        + deidentified.header_value(series))}


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()

    def route(method: str, path: str, fn_: Callable) -> None:
        app.route("/api" + path, method, fn_)

    # With upstream nodes, the list falls through to them (PACS On-Demand); else untouched.
    upstreams = rt.cfg if ondemand.upstreams(rt.cfg) else None
    route("GET", "/studies", lambda: list_studies(utf8_query(), upstreams))
    route("GET", "/studies/<uid>", one_study)
    route("GET", "/instances/<sop>/tags", lambda sop: json_text(instance_tags(rt, sop)))
    route("GET", "/studies/<uid>/zip", lambda uid: zip_download(rt, "STUDY", uid))
    route("GET", "/series/<uid>/zip", lambda uid: zip_download(rt, "SERIES", uid))
    route("GET", "/studies/<uid>/deidentify", lambda uid: deidentify_preview(rt, uid))
    route("POST", "/studies/<uid>/send", lambda uid: send(rt, "STUDY", uid))
    route("POST", "/series/<uid>/send", lambda uid: send(rt, "SERIES", uid))
    route("DELETE", "/studies/<uid>", lambda uid: delete(rt, "STUDY", uid))
    route("DELETE", "/series/<uid>", lambda uid: delete(rt, "SERIES", uid))
    route("POST", "/studies/<uid>/labels", lambda uid: relabel(rt, uid))
    route("GET", "/labels", labels_in_use)
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
