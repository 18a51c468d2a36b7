"""What every patch of another library's internals has: a name, a kind, and a check.

A `Patch` is one thing pacsd does with a library's private parts (a class swapped at run time,
a private method overridden, private state read). Its `probe` looks, against the installed
library and without opening a socket, whether what the patch relies on is still there and
shaped as expected; it raises `Misfit` saying what changed.

Two kinds, with two policies (pacsd.compat.enforce):

- speed: the patch makes pacsd faster or leaner than the library's own way; when it no longer
  fits, one WARNING in plain words, and the code takes the library's own way (`fits` is False).
- safety: the patch protects the server (the PDU size bound); when it no longer fits, `pacsd
  serve` refuses to start (LibraryMismatch, the configuration exit code).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

log = logging.getLogger(__name__)

Kind = Literal["speed", "safety"]


class Misfit(Exception):
    """What a probe found changed in the library (its text completes "X.Y changed ...")."""


@dataclass(frozen=True)
class Finding:
    """The result of one patch's check, as `pacsd config --check` prints it."""

    name: str
    kind: Kind
    ok: bool
    message: str


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


class Patch:
    """One patch: `check()` looks again; `fits` is the first look's answer, for the code that
    chooses between the patch and its fallback (a speed patch's misfit is logged there once)."""

    def __init__(self, name: str, kind: Kind, library: str, what: str, fallback: str,
                 probe: Callable[[], None]) -> None:
        self.name, self.kind, self.library = name, kind, library
        self.what = what          # what the patch does, for the report
        self.fallback = fallback  # what happens instead when it no longer fits
        self.probe = probe
        self._fits: bool | None = None
        self._lock = threading.Lock()

    def check(self) -> Finding:
        v = version(self.library)
        try:
            self.probe()
        except Misfit as e:
            return Finding(self.name, self.kind, False, f"{self.library} {v} changed {e}; "
                                                         f"{self.fallback}")
        except Exception as e:  # noqa: BLE001 - a probe that breaks is a misfit too
            return Finding(self.name, self.kind, False,
                           f"{self.library} {v} changed ({type(e).__name__}: {e}); "
                           f"{self.fallback}")
        return Finding(self.name, self.kind, True, f"{self.library} {v}: {self.what}")

    @property
    def fits(self) -> bool:
        """Whether the patch applies in this process (looked at once; a speed patch's misfit
        is logged once as a WARNING, here)."""
        if self._fits is None:
            with self._lock:
                if self._fits is None:
                    finding = self.check()
                    if not finding.ok and self.kind == "speed":
                        log.warning("%s", finding.message)
                    self._fits = finding.ok
        return self._fits

    def reset(self) -> None:
        """Forget the answer (tests that change the library and change it back)."""
        self._fits = None


# --- what probes use -----------------------------------------------------------------------------

def need_attr(owner: Any, name: str, label: str = "") -> Any:
    """`owner.name`, or Misfit naming it."""
    try:
        return inspect.getattr_static(owner, name)
    except AttributeError:
        raise Misfit(f"{label or getattr(owner, '__name__', owner)}.{name} (gone)") from None


def need_params(func: Any, names: tuple[str, ...], label: str) -> None:
    """`func` takes (at least) these parameters, in this order."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        raise Misfit(f"{label} (no signature)") from None
    got = [p for p in params if p in names]
    if got != list(names):
        raise Misfit(f"{label}'s parameters (now {', '.join(params)}; we rely on "
                     f"{', '.join(names)})")


def need_source(func: Any, texts: tuple[str, ...], label: str) -> None:
    """`func`'s source holds each of `texts` (how the library uses what we patch)."""
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        raise Misfit(f"{label} (its source cannot be read to check it)") from None
    missing = [t for t in texts if t not in source]
    if missing:
        raise Misfit(f"{label} (it no longer does {' / '.join(repr(t) for t in missing)})")
