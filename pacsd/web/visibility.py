"""Who may see which study on the web side: the one seam every route that serves a study by
its UID goes through (issue 22, item 1). The lead fills in the scopes (labels, groups,
referring physicians, source AE titles); routes call `check_study` before serving."""

from __future__ import annotations

from typing import Any


def check_study(environ: dict[str, Any], study_uid: str) -> None:
    """Raise a 404 error when the caller of this request may not see the study.
    Administrators see every study. (Scopes land with the visibility work of issue 22.)"""
    return None
