"""Real English text that ships with Python: the pydoc topics and the standard library's docstrings."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from lightning_kd.data.sentences import _source_files

__all__ = ["Document", "document_split", "python_docs_corpus"]

Split = Literal["train", "val", "test"]


class Document(NamedTuple):
    """One document of the corpus: a ``title`` (a pydoc topic or a dotted name) and its ``text``."""

    title: str
    text: str


def _module_name(path: Path, root: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _named_docstrings(node: ast.AST, name: str) -> Iterator[Document]:
    """The docstrings of the classes and functions under ``node``, named ``name.<dotted path>``.

    Definitions inside ``if`` / ``try`` blocks (platform variants) keep the enclosing name.
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(child, clean=True)
            if text:
                yield Document(f"{name}.{child.name}", text)
            yield from _named_docstrings(child, f"{name}.{child.name}")
        else:
            yield from _named_docstrings(child, name)


def _pydoc_topics() -> Iterator[Document]:
    """The help topics of ``pydoc`` (``help("FORMATTING")``) by name; a data module, safe to import."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(name, topics[name].strip())


def _docstring_documents(folder: Path) -> Iterator[Document]:
    """The docstrings of the ``.py`` files under ``folder``, parsed with ``ast`` (nothing imported or run)."""
    base = folder.parent if (folder / "__init__.py").is_file() else folder  # a package keeps its name
    for path in _source_files(folder):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue  # a file of another Python version or encoding: not text we can read
        module = _module_name(path, base)
        text = ast.get_docstring(tree, clean=True)
        if text:
            yield Document(module, text)
        yield from _named_docstrings(tree, module)


def python_docs_corpus(
    stdlib: str | Path | None = None,
    topics: bool = True,
    min_chars: int = 100,
    max_non_ascii: float = 0.01,
) -> list[Document]:
    """English documents from Python's own documentation, built offline and in a fixed order.

    The ``pydoc`` help topics (``pydoc_data.topics``, sorted by name) come first, then the
    module, class and function docstrings of the standard library's ``.py`` files (sorted by
    path; ``test/``, ``idlelib/`` and ``site-packages/`` are skipped), read with ``ast`` so no
    module is imported. Documents shorter than ``min_chars`` characters or with more than
    ``max_non_ascii`` of their characters outside ASCII are dropped, and so is every repeat of a
    text already taken (so a text can never be in two splits of :func:`document_split`). On
    Python 3.11 this gives about 3,900 documents and 1.9 million characters; the corpus changes
    slightly between Python versions.

    Args:
        stdlib: the folder whose docstrings are read; ``None``: the standard library of this
            interpreter (``sysconfig.get_paths()["stdlib"]``).
        topics: include the ``pydoc`` topics.
        min_chars: shortest document kept, in characters.
        max_non_ascii: largest share of non-ASCII characters in a kept document.
    """
    if min_chars < 1 or not 0 <= max_non_ascii <= 1:
        raise ValueError(
            f"min_chars must be >= 1 and max_non_ascii in [0, 1], got {min_chars} and {max_non_ascii}."
        )
    folder = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    if not folder.is_dir():
        raise ValueError(f"stdlib={str(folder)!r} is not a folder; pass the folder of .py files to read.")
    documents = [*_pydoc_topics()] if topics else []
    documents += _docstring_documents(folder)
    seen: set[str] = set()
    kept = []
    for document in documents:
        text = document.text
        if (
            len(text) < min_chars
            or text in seen
            or sum(not c.isascii() for c in text) > max_non_ascii * len(text)
        ):
            continue
        seen.add(text)
        kept.append(document)
    return kept


def document_split(text: str, val_fraction: float, test_fraction: float) -> Split:
    """The split of a document, from the SHA-256 of its text: the same text is always in the same split.

    The first 64 bits of the hash, read as a number in ``[0, 1)``, below ``val_fraction`` give
    ``"val"``, below ``val_fraction + test_fraction`` ``"test"``, otherwise ``"train"``; the
    assignment needs no seed and no list of the other documents.
    """
    position = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    if position < val_fraction:
        return "val"
    return "test" if position < val_fraction + test_fraction else "train"
