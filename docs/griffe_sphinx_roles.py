r"""Griffe extension: render the package's reST-flavoured Google docstrings as Markdown.

The docstrings use Sphinx roles (``:class:`~lightning_kd.X```, ``:func:``, ``:math:``, ...),
``.. math::`` blocks and ``::`` literal blocks, which mkdocstrings' Markdown would show raw.
Before the Google parser sees a docstring, this extension rewrites them:

- ``:math:`x``` -> ``\(x\)`` and ``.. math::`` blocks -> ``$$ ... $$`` (pymdownx.arithmatex);
- ``:class:`~a.b.C``` -> ```C``` and ``:func:`a.b.f``` -> ```a.b.f```: plain code, since many
  targets are relative names that no cross-reference could resolve without guessing;
- a paragraph ending in ``::`` followed by an indented block -> a fenced text block.

The package's files are not changed; this runs only when the documentation is built.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")


def _xref(match: re.Match[str]) -> str:
    tilde, target = match.group(1), match.group(2).strip()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(text: str) -> str:
    """Turn ``.. math::`` and ``::`` literal blocks into Markdown blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        is_math = stripped.startswith(".. math::")
        is_literal = not is_math and stripped.endswith("::") and not stripped.startswith("..")
        if not (is_math or is_literal):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            body.pop()
            j -= 1
        if not any(b.strip() for b in body):
            out.append(line)
            i += 1
            continue
        inner = min(_indent(b) for b in body if b.strip())
        content = [b[inner:] if b.strip() else "" for b in body]
        while content and not content[0]:
            content.pop(0)
        pad = " " * base
        if is_math:
            first = stripped[len(".. math::") :].strip()
            math = ([first] if first else []) + content
            out += ["", pad + "$$", *(pad + m if m else "" for m in math), pad + "$$", ""]
        else:
            out.append(line[: len(line) - 1])  # "text::" reads "text:"
            out += ["", pad + "```text", *(pad + c if c else "" for c in content), pad + "```", ""]
        i = j
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring ``text`` with Sphinx roles and directives turned into Markdown."""
    text = _blocks(text)
    text = _MATH_ROLE.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
    return _XREF_ROLE.sub(_xref, text)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
