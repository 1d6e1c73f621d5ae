"""The documentation site: ``mkdocs build --strict`` succeeds (no broken link or anchor between
pages), every page in ``mkdocs.yml``'s nav exists, and the README stays a short front page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
README_MAX_LINES = 150


def _nav_pages(nav) -> list[str]:
    """Every Markdown path in a mkdocs nav (nested lists of {title: path-or-list} or paths)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return [p for item in nav for p in _nav_pages(item)]


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_mkdocs_build_strict(tmp_path):
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_nav_page_exists_and_every_page_is_in_nav():
    config = _config()
    docs = ROOT / config["docs_dir"]
    listed = _nav_pages(config["nav"])
    assert listed and len(listed) == len(set(listed))
    assert [p for p in listed if not (docs / p).is_file()] == []
    on_disk = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md"))
    assert sorted(listed) == on_disk


def test_site_is_built_into_an_ignored_folder():
    top = _config()["site_dir"].split("/", 1)[0]
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert f"{top}/" in ignored or f"/{top}/" in ignored, f"{top}/ is not in .gitignore"


def test_readme_is_short_and_links_to_existing_pages():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert links and [link for link in links if not (ROOT / link).is_file()] == []
