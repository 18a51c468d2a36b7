"""MkDocs hook: the settings and hooks references, generated from the code at every build.

`reference/settings.md` comes from `pacsd.config.describe()` (every setting, its TOML key, env
name, flag, default and help), `reference/hooks.md` from `pacsd/plugins/specs.py` (each hook's
signature and docstring, each payload TypedDict with the string under each field). Neither page
is committed, so neither can drift from the code. tests/test_docs.py and tests/test_config.py
import `settings_page` and `hooks_page` from here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

SETTINGS_URI = "reference/settings.md"
HOOKS_URI = "reference/hooks.md"


def settings_page() -> str:
    """The settings reference: describe()'s table, cut into one table per section."""
    from pacsd import config

    rows = config.describe().splitlines()
    header, body = rows[:2], rows[2:]
    sections: dict[str, list[str]] = {}
    for row in body:
        m = re.match(r"\| `\[([\w.]+)\] ", row)
        sections.setdefault(m.group(1) if m else "other", []).append(row)
    out = ["# Settings reference", "",
           "Generated from `pacsd.config` at build time; `pacsd config --list` prints every "
           "setting with the value in effect and where it comes from. Each setting is read from the TOML file (`[section] key`), then from its "
           "environment variable, then from its `pacsd serve` flag, each overriding the one "
           "before (see [Configuration](../configuration.md)). `[[nodes]]`, `[[users]]`, "
           "`[[routes]]` and `[plugin.NAME]` are tables of their own: see "
           "[Configuration](../configuration.md), [Routing](../routing.md) and "
           "[Plugins](../plugins.md).", ""]
    for name, section_rows in sections.items():
        out += [f"## [{name}]", "", *header, *section_rows, ""]
    return "\n".join(out)


def _docs(cls: ast.ClassDef) -> list[tuple[str, str, str]]:
    """(field, annotation, the string under it) of a TypedDict class body."""
    fields = []
    body = cls.body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                doc = " ".join(nxt.value.value.split())
            fields.append((node.target.id, ast.unparse(node.annotation), doc))
    return fields


def _fields(name: str, classes: dict[str, ast.ClassDef]) -> list[tuple[str, str, str]]:
    """A TypedDict's fields, those of its bases (defined in the same module) first."""
    cls = classes[name]
    inherited: list[tuple[str, str, str]] = []
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            inherited += _fields(base.id, classes)
    return inherited + _docs(cls)


def _ann(node: ast.expr) -> str:
    """An annotation as written, without the quotes of a string one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ast.unparse(node)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def hooks_page() -> str:
    """The hooks reference: each function a plugin may define, then each payload's fields."""
    from pacsd.plugins import specs

    source = Path(specs.__file__).read_text()
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    intro = ast.get_docstring(tree) or ""
    out = ["# Hooks reference", "",
           "Generated from `pacsd/plugins/specs.py` at build time. How plugins are loaded, "
           "isolated and configured: [Plugins](../plugins.md).", "",
           # The module docstring but its title line and its last paragraph (for developers).
           "\n\n".join(intro.split("\n\n")[1:-1]), "",
           "| hook | kind | payload |", "|---|---|---|"]
    for hook, (kind, payload) in specs.PAYLOADS.items():
        out.append(f"| [`{hook}`](#{hook}) | {kind} | [`{payload.__name__}`]"
                   f"(#{payload.__name__.lower()}) |")
    out.append("")
    for fn in specs.SIGNATURES:
        node = funcs[fn.__name__]
        returns = f" -> {_ann(node.returns)}" if node.returns else ""
        args = ", ".join(f"{a.arg}: {_ann(a.annotation)}" if a.annotation else a.arg
                         for a in node.args.args)
        kind = specs.PAYLOADS[fn.__name__][0] if fn.__name__ in specs.PAYLOADS else "function"
        out += [f"## `{fn.__name__}`", "", f"*{kind}*", "", "```python",
                f"def {fn.__name__}({args}){returns}", "```", "",
                " ".join((ast.get_docstring(node) or "").split()), ""]
    out += ["## Payloads", ""]
    for _hook, (_kind, payload) in specs.PAYLOADS.items():
        name = payload.__name__
        out += [f"### {name}", "", " ".join((ast.get_docstring(classes[name]) or "").split()),
                "", "| key | type | meaning |", "|---|---|---|"]
        out += [f"| `{key}` | `{_cell(ann)}` | {_cell(doc)} |"
                for key, ann, doc in _fields(name, classes)]
        out.append("")
    return "\n".join(out)


def on_files(files: Any, config: Any) -> Any:
    """Add the two generated pages to the build (mkdocs >= 1.6: File.generated)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, SETTINGS_URI, content=settings_page()))
    files.append(File.generated(config, HOOKS_URI, content=hooks_page()))
    return files
