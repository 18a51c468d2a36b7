"""Open a study in another viewer: Weasis (its weasis:// protocol and a manifest) and OHIF.

Weasis: the page's link `GET /api/studies/<uid>/weasis` answers a redirect to
`weasis://?$dicom:get -w "<manifest URL>"` (URL-encoded), as weasis-pacs-connector's /weasis
service does; the browser hands it to Weasis installed on the same machine. Weasis then fetches
the manifest, `GET /api/studies/<uid>/weasis.xml` (the Weasis manifest 2.5 XML,
http://www.weasis.org/xsd/2.5: arcQuery > Patient > Study > Series > Instance), and each
instance by WADO-URI from this server (`/wado?requestType=WADO&studyUID=…&seriesUID=…&
objectUID=…&contentType=application/dicom`, plus the arcQuery's additionnalParameters).

Weasis sends neither the page's cookie nor a password. So the manifest URL and every WADO URL
carry a study token (auth.Sessions.study_token: the user, an expiry an hour away, signed with
the session key together with the study's UID), which Auth accepts for those two routes of
that one study only. With no users at all (open mode, loopback only) no token is needed.

OHIF: `[http] ohif_url` set, the pages link `{ohif_url}/viewer?StudyInstanceUIDs=<uid>`; OHIF
reads the study with its own DICOMweb data source (pacsd's /dicom-web, CORS by
`[http] cors_origins`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import bottle

from pacsd import query
from pacsd.query import studies
from pacsd.web.api import check_uid, fail
from pacsd.web.app import new_app
from pacsd.web.auth import STUDY_TOKEN, Sessions
from pacsd.web.dicomweb_common import base_url
from pacsd.web.guard import client_of
from pacsd.web.runtime import Runtime
from pacsd.web.visibility import check_study

log = logging.getLogger(__name__)

NS = "http://www.weasis.org/xsd/2.5"
ARC_ID = "pacsd"   # arcId: required, names the archive within the manifest
MAX_INSTANCES = 100_000   # in one manifest (a study larger than that is not one Weasis opens)
PATIENT = ("PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY = ("StudyInstanceUID", "StudyDescription", "StudyDate", "StudyTime", "AccessionNumber",
         "StudyID", "ReferringPhysicianName")
SERIES = ("SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "Modality")
INSTANCE = ("SOPInstanceUID", "InstanceNumber")


# The attributes the schema requires (use="required"), written even when empty.
REQUIRED = {"PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID"}


def _attrs(row: dict[str, Any], names: tuple[str, ...]) -> str:
    """XML attributes of the values present (the schema's optional ones left out when empty)."""
    return "".join(f" {n}={quoteattr(_text(row.get(n) or ''))}" for n in names
                   if row.get(n) not in (None, "") or n in REQUIRED)


def _text(value: Any) -> str:
    # Characters XML 1.0 cannot carry (control characters a modality may put in a name) go.
    return "".join(c for c in str(value) if c >= " " or c in "\t\n\r")


def manifest_xml(rt: Runtime, uid: str, wado: str, token: str) -> str:
    """The Weasis manifest of one study: every stored instance, by series."""
    keys = list(PATIENT + STUDY + SERIES + INSTANCE)
    with rt.archive.index.reading():
        rows = list(query.find(query.Request("IMAGE", {"StudyInstanceUID": uid},
                                             limit=MAX_INSTANCES), keys))
    if not rows:
        raise fail(404, "no such study")
    by_series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_series.setdefault(row["SeriesInstanceUID"], []).append(row)
    extra = f"&{STUDY_TOKEN}={token}" if token else ""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<manifest xmlns="{NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">',
           # Weasis builds each URL as baseUrl?requestType=WADO&studyUID=..&seriesUID=..&
           # objectUID=..&contentType=application%2Fdicom + additionnalParameters (its spelling).
           f'<arcQuery arcId="{ARC_ID}" baseUrl={quoteattr(wado)} '
           f'requireOnlySOPInstanceUID="false" additionnalParameters={quoteattr(extra)}>',
           f"<Patient{_attrs(rows[0], PATIENT)}>", f"<Study{_attrs(rows[0], STUDY)}>"]
    for series in sorted(by_series.values(), key=lambda s: (_number(s[0], "SeriesNumber"),
                                                            s[0]["SeriesInstanceUID"])):
        # No WadoTransferSyntaxUID: each instance comes as it is stored (Weasis would otherwise
        # ask for a transferSyntax, "*" included, which WADO-URI answers only when it can).
        out.append(f"<Series{_attrs(series[0], SERIES)}>")
        for inst in sorted(series, key=lambda i: (_number(i, "InstanceNumber"),
                                                  i["SOPInstanceUID"])):
            out.append(f"<Instance{_attrs(inst, INSTANCE)}/>")
        out.append("</Series>")
    out += ["</Study>", "</Patient>", "</arcQuery>", "</manifest>", ""]
    return "\n".join(out)


def _number(row: dict[str, Any], key: str) -> int:
    """A series or instance number for sorting; a missing one after every real one."""
    try:
        value = row.get(key)
        return int(value) if value not in (None, "") else 1 << 30
    except (TypeError, ValueError):
        return 1 << 30


def _token(sessions: Sessions, uid: str) -> str:
    """A study token for the caller; "" in open mode (no users: nothing to prove). A share
    link's holder (issue 22's share links) is no user a token could name: refused."""
    env = bottle.request.environ
    if env.get("pacsd.share"):
        raise fail(403, "a shared study opens in this page's viewer only")
    user = env.get("pacsd.user")
    return sessions.study_token(user, uid) if user is not None else ""


def weasis_launch(rt: Runtime, sessions: Sessions, uid: str) -> bottle.HTTPResponse:
    """A redirect to weasis://, the manifest's URL carrying a fresh study token."""
    check_uid(uid)
    check_study(bottle.request.environ, uid)
    if studies.study_summary(uid) is None:
        raise fail(404, "no such study")
    token = _token(sessions, uid)
    manifest = f"{base_url()}/api/studies/{uid}/weasis.xml"
    if token:
        manifest += f"?{STUDY_TOKEN}={token}"
    launch = "weasis://?" + quote(f'$dicom:get -w "{manifest}"', safe="")
    user = bottle.request.environ.get("pacsd.user")
    log.info("study %s opened in Weasis by %s from %s", uid,
             user.name if user else "open access", client_of(bottle.request.environ))
    body = {"url": launch, "manifest": manifest,
            "expires": int(time.time()) + Sessions.STUDY_TOKEN_S if token else None}
    return bottle.HTTPResponse(json.dumps(body), 302, {
        "Location": launch, "Content-Type": "application/json", "Cache-Control": "no-store"})


def weasis_manifest(rt: Runtime, sessions: Sessions, uid: str) -> str:
    check_uid(uid)
    check_study(bottle.request.environ, uid)
    # The token this request came with (Auth checked it), handed on to the WADO URLs; a
    # caller with a cookie or a password (a script) gets a fresh one for Weasis.
    token = bottle.request.query.get(STUDY_TOKEN, "") if bottle.request.environ.get(
        "pacsd.study_token") == uid else ""
    body = manifest_xml(rt, uid, f"{base_url()}/wado", token or _token(sessions, uid))
    bottle.response.content_type = "application/xml; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-store")
    return body


def settings(rt: Runtime) -> dict[str, Any]:
    """What the pages need to show the links (GET /api/viewers)."""
    return {"ohif_url": rt.cfg.http.ohif_url.rstrip("/") or None, "weasis": True}


def make_app(rt: Runtime, sessions: Sessions) -> bottle.Bottle:
    app = new_app()
    app.route("/api/viewers", "GET", lambda: settings(rt))
    app.route("/api/studies/<uid>/weasis", "GET", lambda uid: weasis_launch(rt, sessions, uid))
    app.route("/api/studies/<uid>/weasis.xml", "GET",
              lambda uid: weasis_manifest(rt, sessions, uid))
    return app
