"""What a rule of the config file ([[routes]], [[labels]]) matches: the calling AE title and
any attribute of the data set (a keyword or a tag, DICOM wildcards `*` and `?`, a list meaning
any of them)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue


class Rule(Protocol):
    @property
    def calling_aets(self) -> tuple[str, ...]: ...

    @property
    def match(self) -> tuple[tuple[str, tuple[str, ...]], ...]: ...


def _values(value: Any) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, (MultiValue, list, tuple, set)):
        return [str(v) for v in value] or [""]
    return [str(value)]


def matches(rule: Rule, values: dict[str, Any], callers: Iterable[str]) -> bool:
    """Whether `rule` takes what has these attribute `values` (keyword -> value or values),
    sent by these calling AE titles."""
    if rule.calling_aets and not set(rule.calling_aets) & {c.strip() for c in callers}:
        return False
    for keyword, patterns in rule.match:
        have = _values(values.get(keyword))
        # DICOM's wildcards are * and ? only (PS3.4 C.2.2.2.4): '[' is fnmatch's, made literal.
        globs = [pat.replace("[", "[[]") for pat in patterns]
        if not any(fnmatch.fnmatchcase(v.strip(), pat) for v in have for pat in globs):
            return False
    return True


def dataset_values(ds: Dataset, keys: Iterable[str]) -> dict[str, Any]:
    """The values of these keys (keywords, or 8 hex digits for a tag pydicom has no name for)."""
    out: dict[str, Any] = {}
    for key in keys:
        try:
            elem = ds[int(key, 16)] if re.fullmatch(r"[0-9A-Fa-f]{8}", key) else ds[key]
        except (KeyError, ValueError):
            continue
        out[key] = elem.value
    return out
