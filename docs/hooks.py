"""MkDocs hook: include the benchmark result tables with their headings nested under the page's.

``--8<-- "benchmarks/results/<name>.md"`` on a line of its own is replaced by that file, its
``# title`` dropped (the page gives each table a heading) and its other headings moved one
level down, so that the page keeps one title and an orderly table of contents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_INCLUDE = re.compile(r'^--8<-- "(benchmarks/results/[\w.-]+\.md)"\s*$', re.M)


def _nested(path: Path) -> str:
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("#" + line if re.match(r"#{2,5} ", line) else line for line in lines).strip() + "\n"


def on_page_markdown(markdown: str, *, config: Any, **kwargs: Any) -> str:
    """Expand the result-table includes of a page."""
    root = Path(config["config_file_path"]).parent
    return _INCLUDE.sub(lambda match: _nested(root / match.group(1)), markdown)
