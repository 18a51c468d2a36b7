"""The web side reads the index through pacsd.query only: no module under pacsd/web imports
the models or peewee (parsed with `ast`, so a lazy import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pacsd.web

WEB = Path(pacsd.web.__file__).parent
FORBIDDEN = ("peewee", "playhouse", "pacsd.index.models")


def imported(source: str, package: str) -> list[str]:
    """Every module an import in `source` may name (`from a import b` counts as a and a.b;
    relative imports resolved against `package`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def forbidden(source: str, package: str) -> list[str]:
    return [m for m in imported(source, package)
            if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_web_imports_no_models():
    modules = sorted(WEB.rglob("*.py"))
    assert len(modules) > 10   # the package was found
    offending = {str(path.relative_to(WEB.parent)): found for path in modules
                 if (found := forbidden(path.read_text(encoding="utf-8"), "pacsd.web"))}
    assert offending == {}


def test_the_check_sees_every_kind_of_import():
    source = ("import peewee\nfrom pacsd.index import models\nfrom ..index.models import Study\n"
              "def f():\n    from playhouse.pool import PooledDatabase\n"
              "from pacsd.query import studies\nfrom . import api\n")
    assert forbidden(source, "pacsd.web") == [
        "peewee", "pacsd.index.models", "pacsd.index.models", "pacsd.index.models.Study",
        "playhouse.pool", "playhouse.pool.PooledDatabase"]
