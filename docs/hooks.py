"""MkDocs hook: include files of the repository (paths from the repository root, any working folder).

``--8<-- "<path>.md"`` on a line of its own is replaced by that file (CONTRIBUTING.md, CHANGELOG.md).
A benchmark result table (``benchmarks/results/<name>.md``) loses its ``# title`` (the page gives
each table a heading) and its other headings move one level down, so that the page keeps one
title and an orderly table of contents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r'^--8<-- "([\w./-]+\.md)"\s*$', re.M)


def _included(root: Path, name: str) -> str:
    text = (root / name).read_text()
    if not name.startswith("benchmarks/results/"):
        return text
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if re.match(r"#{2,5} ", line) else line for line in lines).strip() + "\n"


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    """Expand the includes of a page."""
    root = Path(config["config_file_path"]).parent
    return _INCLUDE.sub(lambda match: _included(root, match.group(1)), markdown)
