"""The pages' JSON API for running the server: who am I, status, nodes (with C-ECHO and
Query/Retrieve against them), users, and the recent warnings and errors.

Any user may read the status and the node list, echo a node, query it and retrieve from it
(what a radiologist does in OsiriX's Q&R window); changing nodes or users and reading the log
is for administrators.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import bottle

from pacsd.nodes import remote
from pacsd.config import NODE_RIGHTS, Node
from pacsd.errors import PacsError
from pacsd.index.outbox import RouteQueue
from pacsd.query import studies
from pacsd.web.api import (check_uid, fail, json_body, json_response, json_text, need_admin,
                           parse_date, web_caller)
from pacsd.web import health, visibility
from pacsd.web.app import new_app, utf8_query
from pacsd.web.auth import hash_password, is_admin
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

MIN_PASSWORD = 8


def me(rt: Runtime) -> dict[str, Any]:
    """Who the pages' user is: what they may do decides which buttons show (the routes check
    again). `shared`: a share link's holder, who sees one study, read only."""
    env = bottle.request.environ
    user = env.get("pacsd.user")
    shared = bool(env.get("pacsd.share"))
    return {"user": user.name if user else None, "admin": is_admin(env),
            "auth": user is not None, "shared": shared,
            "restricted": visibility.restricted(env),
            "share": not shared and rt.accounts.may_share(user)}


def status(rt: Runtime) -> dict[str, Any]:
    """/status, flattened for the page, plus what only the page shows."""
    cfg = rt.cfg
    base = health.status(rt)
    counts = base.pop("index")
    today = time.strftime("%Y-%m-%d 00:00:00")
    stored_today = studies.instances_received_since(today)
    index_bytes = rt.archive.index.size_bytes()
    try:   # the bound ports (the configured ones may be 0)
        run = json.loads(cfg.runfile.read_text())
    except (OSError, ValueError):
        run = {}
    return {**base, "started": rt.started,
            "dicom_port": int(run.get("dicom_port", cfg.dicom_port)),
            "http_port": int(run.get("http_port", cfg.http_port)),
            "stored_today": stored_today, "patients": counts["patients"],
            "studies": counts["studies"], "series": counts["series"],
            "instances": counts["instances"], "stored_bytes": counts["bytes"],
            "index_bytes": index_bytes, "storage_path": base["storage"], "data": str(cfg.data)}


# --- nodes ------------------------------------------------------------------------------------

def _node_dict(node: Node, source: str) -> dict[str, Any]:
    # A switch appears only when it is off (absent: true), so the list keeps its shape.
    return {"name": node.name, "aet": node.aet, "host": node.host, "port": node.port,
            "source": source, **{k: False for k in NODE_RIGHTS if not getattr(node, k)},
            **({"wado_url": node.wado_url} if node.wado_url else {})}


def _node(rt: Runtime, name: str) -> Node:
    node = rt.accounts.node(name)
    if node is None:
        raise fail(404, f"no node named {name!r}")
    return node


def save_node(rt: Runtime, replacing: str | None) -> bottle.HTTPResponse:
    need_admin()
    node = rt.accounts.save_node(json_body(), replacing)
    log.warning("node %s (%s@%s:%d) %s on the admin page", node.name, node.aet, node.host,
                node.port, "changed" if replacing else "added")
    return json_response(_node_dict(node, "admin"), 200 if replacing else 201)


def remove_node(rt: Runtime, name: str) -> dict[str, Any]:
    need_admin()
    rt.accounts.remove_node(name)
    log.warning("node %s removed on the admin page", name)
    return {"removed": name}


def echo(rt: Runtime, name: str) -> dict[str, Any]:
    ok, ms, message = remote.echo(rt.cfg, _node(rt, name))
    return {"ok": ok, "ms": round(ms, 1), "message": message}


REMOTE_RETURN_KEYS = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
                      "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
                      "NumberOfStudyRelatedInstances")


def _unrestricted() -> None:
    """Query/Retrieve from other nodes is for users who see every study: what a restricted
    user (in [[groups]]) fetched would land beyond what they may see, and what other nodes hold
    is not ours to scope."""
    if visibility.restricted():
        raise fail(403, "Query/Retrieve from other nodes is for users who see every study")


def remote_studies(rt: Runtime, name: str) -> dict[str, Any]:
    """C-FIND at study level on a node, from the Q/R page's fields."""
    _unrestricted()
    node = _node(rt, name)
    q = utf8_query()   # names typed in the page are UTF-8
    keys = {k: "" for k in REMOTE_RETURN_KEYS}
    for field, key in (("patient", "PatientName"), ("patient_id", "PatientID"),
                       ("accession", "AccessionNumber")):
        text = q.get(field, "").strip()
        if text:
            # Prefix matching, as OsiriX asks: what the person typed starts the value.
            keys[key] = text if "*" in text or "?" in text else text + "*"
    if q.get("modality", "").strip():
        keys["ModalitiesInStudy"] = q.get("modality").strip().upper()
    first, last = parse_date(q.get("from", ""), "from"), parse_date(q.get("to", ""), "to")
    if first or last:
        keys["StudyDate"] = f"{first}-{last}" if first != last else first
    matches = remote.find(rt.cfg, node, "STUDY", keys)
    names = {"StudyInstanceUID": "study_uid", "PatientName": "patient_name",
             "PatientID": "patient_id", "StudyDate": "study_date", "StudyTime": "study_time",
             "AccessionNumber": "accession", "StudyDescription": "description",
             "ModalitiesInStudy": "modalities"}
    studies = []
    for m in matches:
        study: dict[str, Any] = {out: m.get(key, "") for key, out in names.items()}
        count = m.get("NumberOfStudyRelatedInstances", "")
        study["instances"] = int(count) if str(count).strip().isdigit() else None
        if study["study_uid"]:
            studies.append(study)
    return {"studies": studies}


def retrieve(rt: Runtime, name: str) -> bottle.HTTPResponse:
    """C-MOVE the chosen studies from a node to our own AE title, as a job."""
    _unrestricted()
    node = _node(rt, name)
    uids = json_body().get("studies")
    if not isinstance(uids, list) or not uids or not all(isinstance(u, str) for u in uids):
        raise fail(400, '"studies" must be a list of Study Instance UIDs')
    for uid in uids:
        check_uid(uid)
    cfg = rt.cfg

    def work(job: Any) -> str:
        done, failed = remote.move_studies(cfg, node, uids, progress=job.progress)
        return (f"{done} instance(s) retrieved from {node.name}"
                + (f", {failed} failed" if failed else ""))
    job = rt.jobs.start("retrieve", f"Retrieve {len(uids)} study(ies) from {node.name}", work)
    log.info("retrieve of %d study(ies) from %s started (job %s)", len(uids), node.aet, job.id)
    return json_response({"job": job.id}, 202)


# --- users ------------------------------------------------------------------------------------

def _password(body: dict[str, Any], required: bool) -> str | None:
    password = body.get("password")
    if password in (None, "") and not required:
        return None
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise fail(400, f"a password has at least {MIN_PASSWORD} characters")
    return hash_password(password)


def users(rt: Runtime) -> str:
    need_admin()
    return json_text([{"name": u.name, "admin": u.admin, "source": source}
                  for u, source in rt.accounts.users().values()])


def save_user(rt: Runtime, name: str | None) -> bottle.HTTPResponse:
    """Add (POST) or change (PUT) a user. The first user is an administrator whatever the
    form says, and the last administrator is never demoted (409): pacsd.accounts decides."""
    need_admin()
    body = json_body()
    new = name is None
    name = str(body.get("name") or "") if new else name
    admin = body.get("admin")
    user = rt.accounts.save_user(name or "", password_hash=_password(body, required=new),
                                  admin=None if admin is None else bool(admin), new=new)
    log.warning("user %s %s on the admin page", user.name, "added" if new else "changed")
    answer: dict[str, Any] = {"name": user.name, "admin": user.admin, "source": "admin"}
    if new and user.admin and not admin:
        answer["note"] = ("made an administrator: the first user always is (log-in is now "
                          "on, and someone must be able to run this page)")
    return json_response(answer, 201 if new else 200)


def remove_user(rt: Runtime, name: str) -> dict[str, Any]:
    need_admin()
    rt.accounts.remove_user(name)
    log.warning("user %s removed on the admin page", name)
    return {"removed": name}


# --- the routing queue (pacsd.index.outbox) --------------------------------------------------------

def _outbox(rt: Runtime) -> RouteQueue:
    # The daemon always hands one over; a Runtime built without routing answers 500.
    if rt.outbox is None:
        raise PacsError("the routing queue is not running")
    return rt.outbox


def queue(rt: Runtime) -> str:
    """The routing jobs of one state (default: dead, the list someone must look at)."""
    need_admin()
    state = bottle.request.query.get("state") or "dead"
    if state not in ("queued", "done", "dead", "all"):
        raise fail(400, "state must be queued, done, dead or all")
    try:
        limit = max(1, min(1000, int(bottle.request.query.get("limit") or 200)))
    except ValueError:
        raise fail(400, "limit must be an integer") from None
    outbox = _outbox(rt)
    return json_text({"counts": outbox.counts(), "jobs": [
        j.as_dict() for j in outbox.jobs(None if state == "all" else state, limit)]})


def _job_ids(body: dict[str, Any]) -> list[int] | None:
    if body.get("dead") is True:
        return None
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise fail(400, 'give {"ids": [job ids]} or {"dead": true}')
    return ids


def queue_retry(rt: Runtime) -> dict[str, Any]:
    need_admin()
    ids = _job_ids(json_body())
    n = _outbox(rt).retry(ids)
    log.warning("%d routing job(s) queued again on the admin page", n)
    return {"queued": n}


def queue_forget(rt: Runtime) -> dict[str, Any]:
    need_admin()
    ids = _job_ids(json_body())
    if ids is None:
        raise fail(400, 'give {"ids": [job ids]}')
    n = _outbox(rt).forget(ids)
    log.warning("%d routing job(s) forgotten on the admin page", n)
    return {"forgotten": n}


# --- the recycle bin (pacsd.storage.trash) and the history ------------------------------------

def trash(rt: Runtime) -> str:
    need_admin()
    n, size = rt.archive.index.bin_totals()
    return json_text({"instances": n, "bytes": size, "days": rt.cfg.storage_trash_days,
                      "entries": [e.as_dict() for e in reversed(rt.archive.bin.entries())]})


def trash_restore(rt: Runtime) -> dict[str, Any]:
    need_admin()
    uid = str(json_body().get("uid") or "")
    if not (uid.isdigit() and len(uid) < 12):
        check_uid(uid)
    done = rt.archive.bin.restore(uid, web_caller())
    if not (done.restored or done.already_stored or done.missing):
        raise fail(404, f"nothing of {uid} is in the recycle bin")
    log.warning("%s: %d instance(s) restored from the recycle bin on the admin page", uid,
                done.restored)
    return {"restored": done.restored, "already_stored": done.already_stored,
            "missing": done.missing}


def trash_empty(rt: Runtime) -> dict[str, Any]:
    need_admin()
    days = json_body().get("older_than_days")
    if days is not None and (not isinstance(days, (int, float)) or isinstance(days, bool)
                             or days < 0):
        raise fail(400, "older_than_days must be a number of days (0 or more)")
    deletions, instances, size = rt.archive.bin.empty(
        None if days is None else float(days) * 86400, web_caller(), "emptied on the admin page")
    log.warning("recycle bin emptied on the admin page: %d deletion(s), %d instance(s)",
                deletions, instances)
    return {"deletions": deletions, "instances": instances, "bytes": size}


# --- corrections (pacsd.storage.corrections) -------------------------------------------------

def _corrected(done: Any) -> dict[str, Any]:
    if hasattr(done, "change"):
        return {"change": done.change, "instances": done.instances}
    return {"restored": done.restored, "already_stored": done.already_stored}


def correct(rt: Runtime, what: str, uid: str | None = None) -> dict[str, Any]:
    """A correction asked on the admin side: one JSON body, the answer says what changed."""
    from pacsd.storage.corrections import CorrectionRefused, Corrections
    need_admin()
    body = json_body()
    c, who = Corrections(rt.archive), web_caller()
    given = body.get("changes")
    if what in ("patient", "study") and (not isinstance(given, dict) or not all(
            isinstance(v, str) for v in given.values())):
        raise fail(400, 'give {"changes": {"Keyword": "new value", ...}}')
    changes: dict[str, str] = given if isinstance(given, dict) else {}
    try:
        if what == "patient":
            assert uid is not None
            issuer = body.get("issuer")
            done: Any = c.update_patient(uid, changes, who,
                                         issuer=issuer if isinstance(issuer, str) else None)
        elif what == "merge":
            done = c.merge_patients(str(body.get("from") or ""), str(body.get("into") or ""),
                                    who)
        elif what == "study":
            done = c.update_study(check_uid(uid or ""), changes, who)
        elif what == "study-move":
            done = c.move_study(check_uid(uid or ""), str(body.get("to_patient") or ""), who)
        elif what == "series-move":
            to = body.get("to_study")
            done = c.move_series(check_uid(uid or ""),
                                 None if to == "new" else check_uid(str(to or "")), who)
        else:
            done = c.undo(str(body.get("uid") or ""), who)
    except CorrectionRefused as e:
        raise fail(e.http_status, str(e)) from None
    return _corrected(done)


def history(rt: Runtime) -> str:
    need_admin()
    uid = bottle.request.query.get("uid") or None
    if uid is not None:
        check_uid(uid)
    return json_text([c.as_dict() for c in rt.archive.index.history(uid)])


def recent_log(rt: Runtime) -> str:
    need_admin()
    try:
        limit = max(1, min(500, int(bottle.request.query.get("limit") or 200)))
    except ValueError:
        raise fail(400, "limit must be an integer") from None
    return json_text([{"time": e.time, "level": e.level, "logger": e.logger, "message": e.message}
                  for e in rt.logbook.recent(limit)])


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    routes: list[tuple[str, str, Any]] = [
        ("GET", "/me", lambda: me(rt)),
        ("GET", "/status", lambda: status(rt)),
        ("GET", "/nodes", lambda: json_text([_node_dict(n, s) for n, s in rt.accounts.nodes()])),
        ("POST", "/nodes", lambda: save_node(rt, None)),
        ("PUT", "/nodes/<name>", lambda name: save_node(rt, name)),
        ("DELETE", "/nodes/<name>", lambda name: remove_node(rt, name)),
        ("POST", "/nodes/<name>/echo", lambda name: echo(rt, name)),
        ("GET", "/nodes/<name>/studies", lambda name: remote_studies(rt, name)),
        ("POST", "/nodes/<name>/retrieve", lambda name: retrieve(rt, name)),
        ("GET", "/users", lambda: users(rt)),
        ("POST", "/users", lambda: save_user(rt, None)),
        ("PUT", "/users/<name>", lambda name: save_user(rt, name)),
        ("DELETE", "/users/<name>", lambda name: remove_user(rt, name)),
        ("GET", "/log", lambda: recent_log(rt)),
        ("GET", "/queue", lambda: queue(rt)),
        ("POST", "/queue/retry", lambda: queue_retry(rt)),
        ("POST", "/queue/forget", lambda: queue_forget(rt)),
        ("GET", "/trash", lambda: trash(rt)),
        ("POST", "/trash/restore", lambda: trash_restore(rt)),
        ("POST", "/trash/empty", lambda: trash_empty(rt)),
        ("GET", "/history", lambda: history(rt)),
        ("POST", "/patients/<pid>/update", lambda pid: correct(rt, "patient", pid)),
        ("POST", "/patients/merge", lambda: correct(rt, "merge")),
        ("POST", "/studies/<uid>/update", lambda uid: correct(rt, "study", uid)),
        ("POST", "/studies/<uid>/move", lambda uid: correct(rt, "study-move", uid)),
        ("POST", "/series/<uid>/move", lambda uid: correct(rt, "series-move", uid)),
        ("POST", "/undo", lambda: correct(rt, "undo")),
    ]
    for method, path, callback in routes:
        app.route("/api" + path, method, callback)
    return app
