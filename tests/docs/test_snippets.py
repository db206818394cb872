"""Every ```python block of the README and the documentation runs, so none can rot.

Each page's blocks run in order in one namespace (a page may build on its earlier blocks), in
a temporary working directory. A block preceded by ``<!-- no-run -->`` is skipped; there may be
only a handful. Shell blocks (``lightning-kd ...``) are not run here: the CLI has its own tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
NO_RUN = "<!-- no-run -->"
MAX_SKIPPED = 3
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line, code, skipped)`` of every fenced python block of a Markdown text."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == NO_RUN
        indent = match.group("indent")
        body = "".join(line[len(indent) :] for line in match.group("body").splitlines(keepends=True))
        blocks.append((text.count("\n", 0, match.start()) + 1, body, skipped))
    return blocks


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if any(not s for _, _, s in python_blocks(page.read_text()))]


def test_pages_have_snippets() -> None:
    assert any(page.name == "README.md" for page in RUNNABLE)
    assert len(RUNNABLE) >= 8, [page_id(page) for page in RUNNABLE]


def test_few_snippets_are_skipped() -> None:
    skipped = [(page_id(p), line) for p in PAGES for line, _, s in python_blocks(p.read_text()) if s]
    assert len(skipped) <= MAX_SKIPPED, skipped


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"snippets_{page.stem.replace('-', '_')}"}
    for line, code, skipped in python_blocks(page.read_text()):
        if skipped:
            continue
        try:
            exec(compile(code, f"{page_id(page)}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"The python block at {page_id(page)}:{line} fails: {error!r}") from error


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_site_builds_in_strict_mode(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    command = [str(mkdocs) if mkdocs.exists() else "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "api" / "losses" / "index.html").exists()
