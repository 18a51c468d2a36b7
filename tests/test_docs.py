"""The README's two quick-start commands are the ones CI runs, and they work as written; the
README stays short and its links land in docs/; the manual builds with `mkdocs build --strict`
(the settings and hooks references generated from the code by docs/hooks/generate.py)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, re.S)


def manual_generator() -> ModuleType:
    """docs/hooks/generate.py, the MkDocs hook that writes the two reference pages."""
    spec = importlib.util.spec_from_file_location("pacsd_docs_generate",
                                                  ROOT / "docs" / "hooks" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    serve, test = commands
    assert "pacsd serve" in serve and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text()


def test_readme_fits_on_a_few_screens():
    assert len((ROOT / "README.md").read_bytes()) < 12_000


def test_readme_links_point_at_files_in_docs():
    readme = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme)
             if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert links, "the README links into the manual"
    for target in links:
        path = (ROOT / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT / "docs"), f"{target}: not in docs/"
        assert path.is_file(), f"{target}: no such file"


def test_every_page_of_the_manual_is_in_its_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f" {page.name}\n" in nav, page.name


def test_manual_builds_strict(tmp_path):
    """`mkdocs build --strict`: any warning (a broken link or anchor, a page left out of the
    nav, a failing generator) fails the build."""
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    settings = (site / "reference" / "settings" / "index.html").read_text()
    hooks = (site / "reference" / "hooks" / "index.html").read_text()
    assert "PACSD_DICOM_AET" in settings and "on_instance_stored" in hooks
    assert (site / "studies.png").is_file() and (site / "viewer.png").is_file()
    assert not (site / "hooks").exists()   # the generator is not published


def test_settings_reference_has_a_section_per_config_section():
    from pacsd import config

    page = manual_generator().settings_page()
    for section in dict.fromkeys(s.section for s in config.SETTINGS):
        assert f"\n## [{section}]\n" in page, section
