"""A byte-level BPE tokenizer trained locally on a list of texts and cached on disk by a fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["END_OF_TEXT", "PAD", "bpe_fingerprint", "default_cache_dir", "trained_bpe_tokenizer"]

#: separates documents and ends a response; GPT-2's end-of-text token
END_OF_TEXT = "<|endoftext|>"
#: fills a batch's rows after their last token (labels -100 there)
PAD = "<|pad|>"
#: bump when the way a tokenizer is trained changes, so old cache entries are not reused
_FORMAT = 1
_METADATA = "fingerprint.json"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_kd`` (``~/.cache/lightning_kd`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_kd"


def bpe_fingerprint(texts: Sequence[str], vocab_size: int) -> str:
    """SHA-256 of what a trained tokenizer depends on.

    That is the texts (in order), the vocabulary size, the special tokens, the ``tokenizers``
    version and this module's format number.
    """
    import tokenizers

    digest = hashlib.sha256(
        json.dumps([_FORMAT, tokenizers.__version__, vocab_size, [END_OF_TEXT, PAD]]).encode()
    )
    for text in texts:
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


def _train(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (GPT-2's pre-tokenization)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(folder: Path, fingerprint: str) -> tuple[Any, str | None]:
    """The cached tokenizer in ``folder`` and ``None``, or ``None`` and why it cannot be used."""
    from transformers import PreTrainedTokenizerFast

    try:
        metadata = json.loads((folder / _METADATA).read_text())
        if metadata.get("fingerprint") != fingerprint:
            return None, f"its {_METADATA} names another fingerprint"
        if _sha256(folder / "tokenizer.json") != metadata.get("tokenizer_sha256"):
            return None, "tokenizer.json differs from the file that was written (corrupted or changed)"
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        if (tokenizer.eos_token, tokenizer.pad_token) != (END_OF_TEXT, PAD):
            return None, f"it does not name {END_OF_TEXT} and {PAD} as its end-of-text and padding tokens"
        return tokenizer, None
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
        return None, f"it cannot be read ({type(error).__name__}: {error})"


def trained_bpe_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 4096,
    cache_dir: str | Path | None = None,
    name: str = "bpe",
    metadata: dict[str, Any] | None = None,
) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``transformers.PreTrainedTokenizerFast``.

    Byte-level BPE (Sennrich et al., ACL 2016; byte-level as in GPT-2, Radford et al., 2019): any
    text is encoded without unknown tokens and decodes back to itself. Special tokens: ``END_OF_TEXT``
    (id 0, also the EOS token) and ``PAD`` (id 1). The vocabulary has at most ``vocab_size``
    tokens (fewer when the texts hold fewer merges).

    The tokenizer is kept in ``cache_dir/<name>-<vocab_size>-<fingerprint[:16]>/`` (``tokenizer.json``
    and ``tokenizer_config.json``, loadable by ``AutoTokenizer.from_pretrained``) next to
    ``fingerprint.json`` (the full :func:`bpe_fingerprint`, the SHA-256 of ``tokenizer.json``, the
    Python and ``tokenizers`` versions and ``metadata``). It is reused when the fingerprint and the
    file's hash match; a folder that fails these checks is replaced, with a warning. The folder is
    written under a temporary name and renamed when complete, so a crash never leaves a partial
    tokenizer under the final name.

    Args:
        texts: the training texts (only the training split, so no test text shapes the vocabulary).
        vocab_size: the largest vocabulary, special tokens included (>= 258: 256 bytes + 2 specials).
        cache_dir: folder of the cache; ``None``: :func:`default_cache_dir`.
        name: first part of the folder's name.
        metadata: JSON-serialisable facts recorded in ``fingerprint.json`` (e.g. the corpus size).
    """
    if vocab_size < 258:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the 256 bytes and the 2 special tokens; use >= 258."
        )
    if not texts:
        raise ValueError("A tokenizer needs at least one training text; the list is empty.")
    fingerprint = bpe_fingerprint(texts, vocab_size)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"{name}-{vocab_size}-{fingerprint[:16]}"
    if folder.exists():
        tokenizer, problem = _load(folder, fingerprint)
        if tokenizer is not None:
            return tokenizer
        warnings.warn(f"Rebuilding the cached tokenizer in {folder}: {problem}.", stacklevel=2)
        shutil.rmtree(folder)
    return _build(texts, vocab_size, fingerprint, folder, metadata or {})


def _build(texts: Sequence[str], vocab_size: int, fingerprint: str, folder: Path, metadata: dict) -> Any:
    """Train, save under a temporary folder, then rename it to ``folder`` (another process may win)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train(texts, vocab_size), eos_token=END_OF_TEXT, pad_token=PAD
    )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as error:
        raise OSError(
            f"Cannot write the tokenizer cache in {folder.parent} ({error}); "
            "pass cache_dir= a writable folder."
        ) from error
    try:
        building.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as its parent
        tokenizer.save_pretrained(str(building))
        record = {
            "fingerprint": fingerprint,
            "tokenizer_sha256": _sha256(building / "tokenizer.json"),
            "vocab_size": vocab_size,
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            **metadata,
        }
        (building / _METADATA).write_text(json.dumps(record, indent=2))
        building.rename(folder)
    except OSError:
        if not folder.exists():
            raise
        # another process finished the same tokenizer first: use theirs if it passes the checks
        cached, problem = _load(folder, fingerprint)
        if cached is None:
            raise RuntimeError(
                f"Another process wrote {folder} at the same time and it fails its checks ({problem}); "
                "delete that folder and run again."
            ) from None
        tokenizer = cached
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return tokenizer
