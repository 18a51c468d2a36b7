"""The one seam for what pacsd patches in other libraries (pynetdicom, pydicom, cheroot).

Every use of another library's private members lives in this package, one module per library,
each behind a small named function or class whose docstring says what it patches and why, and
each with a `Patch` (pacsd.compat.patch) whose probe checks, against the installed library and
without opening a socket, that what it relies on is still there and shaped as expected.

- `check()`: every patch's finding (name, kind, ok, message), for `pacsd config --check`.
- `enforce()`: at start-up (pacsd.daemon.server, before the listeners open): each speed patch that no
  longer fits logs one WARNING and the code takes the library's own way; a safety patch that
  no longer fits raises LibraryMismatch (the configuration exit code): pacsd refuses to start.

The library modules are imported when first asked for, so that importing `pacsd.compat.peewee`
(the index does) does not import pynetdicom and cheroot.
"""

from __future__ import annotations

import importlib
import logging

from pacsd.compat.patch import Finding, Patch
from pacsd.errors import LibraryMismatch

log = logging.getLogger(__name__)

__all__ = ["Finding", "Patch", "check", "enforce", "patches"]

MODULES = ("pacsd.compat.pynetdicom", "pacsd.compat.pydicom", "pacsd.compat.cheroot")


def patches() -> list[Patch]:
    """Every patch, library by library (the safety patch first)."""
    found: list[Patch] = []
    for name in MODULES:
        found += importlib.import_module(name).PATCHES
    return found


def check() -> list[Finding]:
    """Look at every patch again against the installed libraries; log nothing."""
    return [p.check() for p in patches()]


def enforce() -> list[Finding]:
    """What `pacsd serve` does before it listens: settle every patch for this process (a speed
    patch that does not fit is logged once and falls back), and refuse to start when a safety
    patch does not fit."""
    findings = []
    for p in patches():
        # `fits` is settled once per process (a speed patch's misfit logged then).
        findings.append(Finding(p.name, p.kind, True, p.what) if p.fits else p.check())
    broken = [f for f in findings if f.kind == "safety" and not f.ok]
    if broken:
        raise LibraryMismatch("; ".join(f.message for f in broken)
                              + " (pacsd was checked against the versions pinned in its "
                                "pyproject.toml)")
    return findings
