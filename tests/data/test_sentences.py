"""Docstring sentences: deterministic, with disjoint splits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd.data import DocstringSentencesDataModule  # noqa: E402
from lightning_kd.data.sentences import docstring_sentences  # noqa: E402
from tests.helpers import KEYS  # noqa: E402


def test_docstring_sentences_are_deterministic_and_splits_disjoint(tmp_path: Path) -> None:
    data = DocstringSentencesDataModule(
        train_sentences=120, val_sentences=30, test_sentences=30, batch_size=8, cache_dir=str(tmp_path)
    )
    data.setup("fit")
    splits = data.datasets
    assert [len(splits[s]) for s in ("train", "val", "test")] == [120, 30, 30]
    assert len(set(splits["train"]) | set(splits["val"]) | set(splits["test"])) == 180
    assert all(s[0].isupper() and s.endswith(".") for s in splits["test"])
    assert docstring_sentences(180) == splits["train"] + splits["val"] + splits["test"]
    assert docstring_sentences(180, seed=1) != docstring_sentences(180)
    cached = DocstringSentencesDataModule(
        train_sentences=120, val_sentences=30, test_sentences=30, cache_dir=str(tmp_path)
    )
    assert list(tmp_path.glob("*.json")) and cached.corpus() == docstring_sentences(180)
    batch = next(iter(data.val_dataloader()))
    assert set(KEYS) <= set(batch) and batch["input_ids"].shape[0] == 8
    assert batch["attention_mask"].sum(1).min() >= 3 and batch["input_ids"].shape[1] <= 64
