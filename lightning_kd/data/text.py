"""Python's documentation as tokenized text for causal language models (packed blocks or prompt/response)."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_kd.data.bpe import trained_bpe_tokenizer
from lightning_kd.data.indexed import WithIndex
from lightning_kd.data.python_docs import Document, document_split, python_docs_corpus
from lightning_kd.data.splits import SplitsDataModule

__all__ = ["PythonDocsText", "TokenBlocks", "describe_corpus", "pack_blocks", "prompt_response_rows"]


class TokenBlocks(Dataset):
    """Rows of token ids as dict samples ``{"input_ids", "attention_mask", "labels"}``.

    ``labels`` are the ids, unshifted (the causal-LM module shifts once), with -100 where the
    attention mask is 0 and where ``loss_mask`` is False (a prompt's tokens).
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = input_ids.masked_fill(~(loss_mask & attention_mask.bool()), -100)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def pack_blocks(
    token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int, pad_id: int
) -> TokenBlocks:
    """Concatenate the documents, each followed by ``eos_id``, and cut the stream into rows of ``block_size``.

    Every token is in exactly one row; the last row is padded with ``pad_id`` (attention mask 0,
    label -100). A block may start inside one document and end inside the next.
    """
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    rows = -(-len(stream) // block_size)
    ids = torch.full((rows * block_size,), pad_id, dtype=torch.long)
    ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    mask = torch.zeros(rows * block_size, dtype=torch.long)
    mask[: len(stream)] = 1
    ids, mask = ids.view(rows, block_size), mask.view(rows, block_size)
    return TokenBlocks(ids, mask, torch.ones_like(mask, dtype=torch.bool))


def prompt_response_rows(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    block_size: int,
    eos_id: int,
    pad_id: int,
) -> TokenBlocks:
    """One row per pair: prompt, response, ``eos_id``, truncated to ``block_size`` and padded with ``pad_id``.

    Only the response (and its end-of-text token) is learned: labels are -100 on the prompt and on
    the padding, for completion-only training. A prompt must leave room for at least one response token.
    """
    ids = torch.full((len(prompts), block_size), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    learned = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if len(prompt) >= block_size:
            raise ValueError(
                f"A prompt of {len(prompt)} tokens leaves no room for its response in "
                f"block_size={block_size}; raise block_size."
            )
        tokens = [*prompt, *response, eos_id][:block_size]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        learned[row, len(prompt) : len(tokens)] = True
    return TokenBlocks(ids, mask, learned)


class PythonDocsText(SplitsDataModule):
    r"""Offline English text for language-model distillation: Python's documentation, tokenized locally.

    The corpus is :func:`~lightning_kd.data.python_docs.python_docs_corpus` (the ``pydoc`` topics
    and the standard library's docstrings, about 3,900 documents and 1.9 million characters on
    Python 3.11), split by document with :func:`~lightning_kd.data.python_docs.document_split` (a
    hash of each text, so no text is in two splits and the split needs no seed). A byte-level BPE
    tokenizer (:func:`~lightning_kd.data.bpe.trained_bpe_tokenizer`) is trained on the training
    split only and cached in ``cache_dir``; the datamodule's ``tokenizer`` attribute holds it after
    ``setup`` and ``vocab_size`` its length (the models' vocabulary). Building the corpus takes
    about 5 s of CPU, training the tokenizer 0.5 s and tokenizing everything under 1 s.

    Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` of shape ``(batch_size,
    block_size)`` with unshifted labels (-100 where nothing is learned):

    * ``format="blocks"``: the split's documents joined by the end-of-text token and cut into
      blocks of ``block_size`` tokens (language modelling on every token);
    * ``format="prompt_response"``: one row per document, prompt ``"Topic: <title>\n"`` (a pydoc
      topic or a dotted name such as ``json.dumps``) and response its text, truncated to
      ``block_size``; labels -100 on the prompt (completion-only training).

    Training batches are shuffled by the global seed (``seed_everything``), as in the other datamodules.
    With ``return_index``, each training item also carries its position in ``datasets["train"]``
    under ``"index"`` (:class:`~lightning_kd.data.WithIndex`): what
    :class:`~lightning_kd.language.TokenStoreDistillationModule` reads a top-k store by.

    Args:
        format: ``"blocks"`` or ``"prompt_response"``.
        block_size: tokens per row.
        vocab_size: the tokenizer's largest vocabulary.
        batch_size: rows per batch.
        val_fraction: share of the documents in the validation split.
        test_fraction: share of the documents in the test split.
        cache_dir: the tokenizer cache; ``None``: ``~/.cache/lightning_kd`` (``$XDG_CACHE_HOME``).
        stdlib: folder whose docstrings are read; ``None``: this interpreter's standard library.
        max_documents: keep only the first documents of the corpus (small runs and tests); ``None``: all.
        num_workers: dataloader workers (the tokens sit in memory; 0 is fastest).
        return_index: training batches also hold each block's index in the training split (``"index"``).
    """

    def __init__(
        self,
        format: Literal["blocks", "prompt_response"] = "blocks",
        block_size: int = 128,
        vocab_size: int = 4096,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        cache_dir: str | None = None,
        stdlib: str | None = None,
        max_documents: int | None = None,
        num_workers: int = 0,
        return_index: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if format not in ("blocks", "prompt_response"):
            raise ValueError(f"format must be 'blocks' or 'prompt_response', got {format!r}.")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (one token predicts the next), got {block_size}.")
        if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 (validation "
                "> 0) and leave documents for training (sum < 1)."
            )
        self.save_hyperparameters()
        self.format = format
        self.block_size = block_size
        self.vocab_size_limit = vocab_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.cache_dir = cache_dir
        self.stdlib = stdlib
        self.max_documents = max_documents
        self.return_index = return_index
        self.tokenizer: Any = None
        self.documents: dict[str, list[Document]] = {}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (``len(tokenizer)``): the models' vocabulary; after ``setup``."""
        if self.tokenizer is None:
            raise RuntimeError("Call setup() before reading vocab_size: the tokenizer is built there.")
        return len(self.tokenizer)

    def split_documents(self) -> dict[str, list[Document]]:
        """The corpus's documents by split, each in corpus order."""
        corpus = python_docs_corpus(self.stdlib)[: self.max_documents]
        splits: dict[str, list[Document]] = {"train": [], "val": [], "test": []}
        for document in corpus:
            splits[document_split(document.text, self.val_fraction, self.test_fraction)].append(document)
        empty = [split for split in ("train", "val") if not splits[split]]
        if empty:
            raise ValueError(
                f"The {len(corpus)} documents leave the {' and '.join(empty)} split empty; raise "
                "max_documents or val_fraction."
            )
        return splits

    def trained_tokenizer(self, train_texts: list[str], vocab_size: int) -> Any:
        """The byte-level BPE of ``vocab_size`` tokens trained on ``train_texts``, cached in ``cache_dir``."""
        return trained_bpe_tokenizer(
            train_texts,
            vocab_size,
            self.cache_dir,
            name="python-docs-bpe",
            metadata={
                "corpus": "pydoc topics + standard-library docstrings",
                "train_documents": len(train_texts),
                "train_characters": sum(map(len, train_texts)),
            },
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the corpus, train (or load) the tokenizer on the training split, and tokenize every split."""
        if self.datasets:
            return
        self.documents = self.split_documents()
        train_texts = [document.text for document in self.documents["train"]]
        self.tokenizer = self.trained_tokenizer(train_texts, self.vocab_size_limit)
        for split, documents in self.documents.items():
            self.datasets[split] = self._rows(documents)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; with ``return_index``, with each block's index under ``"index"``."""
        loader = super().train_dataloader()
        if not self.return_index:
            return loader
        return DataLoader(
            WithIndex(loader.dataset),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _rows(self, documents: list[Document]) -> TokenBlocks:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        responses = self._encode([document.text for document in documents])
        if self.format == "blocks":
            return pack_blocks(responses, self.block_size, eos, pad)
        prompts = self._encode([f"Topic: {document.title}\n" for document in documents])
        return prompt_response_rows(prompts, responses, self.block_size, eos, pad)


def describe_corpus(documents: dict[str, list[Document]]) -> dict[str, Any]:
    """Documents and characters per split, and the Python version (the corpus changes with it)."""
    return {
        "python": platform.python_version(),
        **{
            split: {"documents": len(docs), "characters": sum(len(d.text) for d in docs)}
            for split, docs in documents.items()
        },
    }
