"""Who may see which study on the web side (issue 22, item 1): the one seam every route that
finds or serves studies goes through. Auth puts the caller's scope in the request
(environ["pacsd.scope"]: pacsd.query.scope.Scope, None for everything); routes that serve one
study, series or instance by UID call a `check_*` before serving, searches add `scope()` to
their query.

A study the caller may not see answers 404, as one that does not exist: a restricted caller
learns nothing of what is stored beyond its scope."""

from __future__ import annotations

import json
import logging
from typing import Any

import bottle

from pacsd.query.scope import Scope, study_of

log = logging.getLogger(__name__)


def scope(environ: dict[str, Any] | None = None) -> Scope | None:
    env = bottle.request.environ if environ is None else environ
    found: Scope | None = env.get("pacsd.scope")
    return found


def _hidden(what: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps({"error": f"no such {what}"}), 404,
                               {"Content-Type": "application/json"})


def check_study(environ: dict[str, Any] | None, study_uid: str) -> None:
    """Raise a 404 answer when the caller may not see this study."""
    s = scope(environ)
    if s is not None and not s.allows(study_uid):
        log.debug("study %s is outside what %s may see", study_uid, s.who)
        raise _hidden("study")


def check_level(environ: dict[str, Any] | None, level: str, uid: str) -> None:
    """The same for a study ("STUDY"), series ("SERIES") or instance ("IMAGE") by its UID."""
    s = scope(environ)
    if s is None:
        return
    study = uid if level == "STUDY" else study_of(level, uid)
    if study is None or not s.allows(study):
        raise _hidden({"STUDY": "study", "SERIES": "series"}.get(level, "instance"))


def restricted(environ: dict[str, Any] | None = None) -> bool:
    return scope(environ) is not None
