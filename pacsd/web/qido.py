"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, under /dicom-web.

Answered from the index alone, through pacsd.query (the matching C-FIND uses); each result
carries its RetrieveURL, as the client sees this server.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

import bottle
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from pacsd import query
from pacsd.nodes import ondemand
from pacsd.query import studies
from pacsd.imaging.dicom_json import without_empty_values
from pacsd.imaging.dicom_xml import native_xml
from pacsd.web.dicomweb_common import (DICOM_JSON, check_uids, dumps, fail, representation, url,
                                       xml_parts)
from pacsd.web.guard import client_of
from pacsd.web import visibility
from pacsd.web.runtime import Runtime

log = logging.getLogger(__name__)

MAX_RESULTS = 10_000      # per QIDO-RS response; more are had with offset (PS3.18 8.3.4.4)

# PS3.18 Tables 10.6.3-3 / -4 / -5: what each level returns by default (of what the index has).
STUDY_KEYS = ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
# SOP Classes in Study (0008,0062): returned with study results when asked for (includefield,
# or all), never matched. Read from the study's instances, so not by default: every instance row
# of the studies is read (300 ms for 101 studies of 2,000 instances).
SOP_CLASSES = "SOPClassesInStudy"
SERIES_KEYS = ["Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances"]
INSTANCE_KEYS = ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                 "NumberOfFrames"]
LEVEL_KEYS = {"STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": INSTANCE_KEYS}
_NOT_MATCHING = {"limit", "offset", "includefield", "fuzzymatching"}


def _keyword(name: str) -> str:
    """A keyword from a query parameter naming an attribute by keyword or by tag (ggggeeee)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
    elif "." in name:
        raise fail(400, f"{name!r}: attributes inside sequences cannot be matched here")
    else:
        keyword = name if tag_for_keyword(name) is not None else ""
    if not keyword:
        raise fail(400, f"{name!r} is not a DICOM attribute keyword or tag")
    return keyword


def _int_param(params: list[tuple[str, str]], name: str) -> int | None:
    values = [v for k, v in params if k == name]
    if not values:
        return None
    try:
        n = int(values[-1])
    except ValueError:
        raise fail(400, f"{name} must be an integer, not {values[-1]!r}") from None
    if n < 0:
        raise fail(400, f"{name} must not be negative")
    return n


def _requested(keywords: list[str]) -> list[DataElement]:
    elems = []
    for kw in dict.fromkeys(keywords):
        tag = tag_for_keyword(kw)
        if tag is not None:
            elems.append(DataElement(tag, dictionary_VR(tag).split(" ")[0], None))
    return elems


def search(rt: Runtime, level: str, scope: dict[str, str]) -> Any:
    """One QIDO-RS search at `level` ("STUDY", "SERIES", "IMAGE") within `scope` (UIDs from
    the path); the query parameters come from the request."""
    check_uids(*scope.values())
    form = representation("search results")
    params = parse_qsl(bottle.request.environ.get("QUERY_STRING", ""), keep_blank_values=True)
    depth = query.LEVELS.index(level)
    keys: dict[str, list[str]] = {}
    include: list[str] = []
    warnings = []
    for name, value in params:
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include += [k for k, key in query.KEYS.items()
                                if query.LEVELS.index(key.level) <= depth] + [SOP_CLASSES]
                elif item:
                    include.append(_keyword(item))
        elif name == "fuzzymatching":
            if value.strip().lower() == "true":
                warnings.append("The fuzzymatching parameter is not supported. Only literal "
                                "matching has been performed.")
        elif name not in _NOT_MATCHING:
            kw = _keyword(name)
            if kw not in query.KEYS:
                warnings.append(f"{kw} is not supported as a matching key; it was ignored.")
                continue
            if query.LEVELS.index(query.KEYS[kw].level) > depth:
                warnings.append(f"{kw} is below the {level.lower()} level; it was ignored.")
                continue
            if query.KEYS[kw].kind in (query.UID, query.MODALITIES):
                value = value.replace(",", "\\")   # PS3.18 8.3.4.1: a list, comma-separated
            keys.setdefault(kw, []).append(value)
    limit = _int_param(params, "limit")
    offset = _int_param(params, "offset") or 0
    cap = MAX_RESULTS if limit is None else min(limit, MAX_RESULTS)
    matching = {k: "\\".join(v) for k, v in keys.items()}
    matching.update(scope)
    # Defaults of the level and of the levels the path does not fix (PS3.18 10.6.3.3).
    defaults = list(LEVEL_KEYS[level])
    if level in ("SERIES", "IMAGE") and "StudyInstanceUID" not in scope:
        defaults = STUDY_KEYS + defaults
    if level == "IMAGE" and "SeriesInstanceUID" not in scope:
        defaults = SERIES_KEYS + defaults
    asked = defaults + list(scope) + list(keys) + include
    sop_classes = level == "STUDY" and SOP_CLASSES in asked
    wanted = [k for k in dict.fromkeys(asked)
              if k in query.KEYS and query.LEVELS.index(query.KEYS[k].level) <= depth]
    returned = [k for k in wanted if k != "SpecificCharacterSet"]
    # The UIDs that make up each result's RetrieveURL.
    uids = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"][:depth]
    if rt.hooks is not None and rt.hooks.has("on_query"):
        env = bottle.request.environ
        verdict = rt.hooks.decide("on_query", {
            "source": "QIDO-RS", "user": getattr(env.get("pacsd.user"), "name", ""),
            "peer_address": client_of(env), "level": level,
            "keys": dict(matching)})
        if verdict.refused:
            log.warning("QIDO-RS from %s refused by plugin %s: %s", client_of(env),
                        ", ".join(verdict.by), verdict.reason)
            raise fail(403, f"refused: {verdict.reason}")
        if isinstance(verdict.value, dict) and isinstance(verdict.value.get("keys"), dict):
            matching = {str(k): str(v) for k, v in verdict.value["keys"].items()}
    seen = visibility.scope()
    upstream = ondemand.start(rt.cfg, level, {**{k: "" for k in returned + uids}, **matching},
                              seen)
    req = query.Request(level, matching, limit=cap + (limit is None or limit > cap), offset=offset,
                        scope=seen)
    if upstream is not None:
        # Local first, then the upstreams' (pacsd.nodes.ondemand): the local matches are read
        # from the first, so that the page is cut from the merged list and no upstream match
        # repeats a local one; `offset` of tens of thousands reads as many rows.
        req.limit, req.offset = offset + cap + 1, 0
    try:
        with rt.archive.index.reading():
            matches = list(query.find(req, list(dict.fromkeys(returned + uids))))
    except query.QueryError as e:
        raise fail(400, str(e)) from None
    remote: dict[int, str] = {}   # position in `matches` -> the upstream node's name
    if upstream is not None:
        if len(matches) <= offset + cap:   # every local match is read: the upstreams' follow
            for found in upstream.results(m.get(query.UNIQUE_KEYS[level]) or ""
                                          for m in matches):
                remote[len(matches)] = found.node.name
                matches.append(found.values)
        first = min(offset, len(matches))
        remote = {i - first: name for i, name in remote.items() if i >= first}
        matches = matches[first:first + cap + 1]
        if remote:
            bottle.response.set_header("X-pacsd-Upstream", ", ".join(
                f"{name}={n}" for name, n in Counter(
                    v for i, v in remote.items() if i < cap).items()))
    if len(matches) > cap:
        matches = matches[:cap]
        warnings.append("There are additional results that can be requested.")
    elems = _requested(returned)
    classes = (studies.sop_classes_in_studies([m["StudyInstanceUID"] for m in matches])
               if sop_classes else {})
    results = []
    for i, m in enumerate(matches):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"   # what JSON carries: Unicode
        query.fill_dataset(ds, elems, m)
        if sop_classes:
            ds.add_new(0x00080062, "UI", classes.get(m["StudyInstanceUID"]) or None)
        if i in remote:   # an upstream's: retrieved through us (fetched on open, later)
            ds.add_new(0x00080054, "AE", rt.cfg.dicom_aet)   # Retrieve AE Title
            ds.add_new(0x00080056, "CS", "NEARLINE")
        else:
            ds.add_new(0x00080056, "CS", "ONLINE")   # Instance Availability
        ds.add_new(0x00081190, "UR", url(*(m.get(u) or "" for u in uids)))
        results.append(without_empty_values(ds.to_json_dict(suppress_invalid_tags=True)))
    for text in warnings:
        bottle.response.add_header("Warning", f'299 pacsd: "{text}"')
    # No match: 200 and an empty array (CP-2473 aligned PS3.18 10.6.3.1 with RFC 9110; 204 was
    # the older text, and DICOMweb clients and conformance suites expect 200 []).
    if form == "xml":   # PS3.18 10.6.3: one NativeDicomModel part per result
        return xml_parts(("", native_xml(r)) for r in results)
    bottle.response.content_type = DICOM_JSON
    return dumps(results)


# --- the routes -------------------------------------------------------------------------------

def add_routes(app: bottle.Bottle, rt: Runtime) -> None:
    """QIDO-RS's resources (PS3.18 10.6.1), on the DICOMweb app."""
    S, SE = "/studies/<study>", "/series/<series>"
    app.get("/studies", callback=lambda: search(rt, "STUDY", {}))
    app.get("/series", callback=lambda: search(rt, "SERIES", {}))
    app.get("/instances", callback=lambda: search(rt, "IMAGE", {}))
    app.get(S + "/series", callback=lambda study: search(
        rt, "SERIES", {"StudyInstanceUID": study}))
    app.get(S + "/instances", callback=lambda study: search(
        rt, "IMAGE", {"StudyInstanceUID": study}))
    app.get(S + SE + "/instances", callback=lambda study, series: search(
        rt, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series}))
