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


# Imports go one way, from the entry points down (the manual's Architecture page draws it). A
# part may import only parts of lower layers: so the front ends (dimse, web, doctor) never
# import each other, the index never imports a front end, and the settings import nothing.
LAYERS = [
    {"dicom_status", "dicom_commands"},
    {"errors"},
    {"compat", "config", "logbook", "systemd"},
    {"imaging", "audit"},
    {"index"},
    {"query", "storage", "accounts", "plugins"},
    {"nodes"},
    {"dimse", "web", "doctor", "hl7"},
    {"daemon"},
    {"cli"},
    {"__main__"},
]
PACSD = WEB.parent


def parts() -> dict[str, list[Path]]:
    """pacsd's parts (a sub-package or a top-level module) -> their source files."""
    found: dict[str, list[Path]] = {}
    for path in PACSD.rglob("*.py"):
        rel = path.relative_to(PACSD)
        name = rel.parts[0].removesuffix(".py")
        if name != "__init__":
            found.setdefault(name, []).append(path)
    return found


def test_every_part_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(parts()) == placed


def test_imports_go_one_way():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = []
    for name, paths in parts().items():
        for path in paths:
            rel = path.relative_to(PACSD.parent).with_suffix("")
            package = ".".join(rel.parts[:-1]) if rel.name != "__init__" else ".".join(rel.parts)
            for module in imported(path.read_text(encoding="utf-8"), package):
                bits = module.split(".")
                if bits[0] != "pacsd" or len(bits) < 2 or bits[1] not in layer:
                    continue
                if bits[1] != name and layer[bits[1]] >= layer[name]:
                    upward.append(f"{path.relative_to(PACSD.parent)} imports {module}")
    assert upward == []


def test_every_package_is_installed():
    """A package missing from pyproject's list would be left out of the wheel (and of an
    installed pacsd), while the tests, run from the checkout, would still find it."""
    import tomllib
    listed = set(tomllib.loads((PACSD.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(PACSD.parent).parts)
                for p in PACSD.rglob("__init__.py")}
    assert packages - listed == set()
