"""Python-docs text: corpus, document splits, the cached BPE tokenizer, packed and prompt/response rows."""

from __future__ import annotations

import json
import platform
import re
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="install the [transformers] extra")

from lightning_kd.data import PythonDocsText, document_split, python_docs_corpus, trained_bpe_tokenizer  # noqa: E402
from lightning_kd.data import bpe as bpe_module  # noqa: E402
from lightning_kd.data.text import describe_corpus, pack_blocks, prompt_response_rows  # noqa: E402

#: a small real stdlib package, so tests read a few files instead of the whole standard library
JSON_PACKAGE = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container.\n\n  Indented code  stays.",
    "Ünïcödé text, tabs\tand  double spaces survive a byte-level round trip.",
] * 20


def write(folder: Path, name: str, source: str) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(source, encoding="utf-8")


def test_corpus_keeps_long_ascii_unique_docstrings_with_dotted_names(tmp_path: Path) -> None:
    long = "Return the thing. " * 8
    write(tmp_path, "pkg/__init__.py", f'"""{long}"""\n')
    write(tmp_path, "pkg/mod.py", f'class A:\n    """{long}A"""\n    def f(self):\n        """{long}f"""\n')
    write(tmp_path, "pkg/short.py", '"""Too short."""\n')
    write(tmp_path, "pkg/accents.py", f'"""{"é" * 20}{long}"""\n')  # 20 of 164 characters non-ASCII
    write(tmp_path, "pkg/copy.py", f'"""{long}"""\n')  # the package docstring again
    write(tmp_path, "pkg/broken.py", '"""never closed\n')
    write(tmp_path, "pkg/plat.py", f'if True:\n    def g():\n        """{long}g"""\n')
    write(tmp_path, "test/test_x.py", f'"""{long}test"""\n')
    corpus = python_docs_corpus(tmp_path, topics=False)
    assert [d.title for d in corpus] == ["pkg", "pkg.mod.A", "pkg.mod.A.f", "pkg.plat.g"]
    assert corpus[2].text == (long + "f").strip()
    assert python_docs_corpus(tmp_path, topics=False, max_non_ascii=0.2)[1].title == "pkg.accents"
    with pytest.raises(ValueError, match="is not a folder; pass the folder"):
        python_docs_corpus(tmp_path / "missing")


def test_corpus_starts_with_the_pydoc_topics_sorted_and_is_deterministic() -> None:
    from pydoc_data.topics import topics

    corpus = python_docs_corpus(JSON_PACKAGE)
    names = [d.title for d in corpus if d.title in topics]
    assert len(names) > 50 and [d.title for d in corpus[: len(names)]] == sorted(names)
    assert {"json", "json.dumps", "json.decoder.JSONDecoder"} <= {d.title for d in corpus}
    assert corpus == python_docs_corpus(JSON_PACKAGE)


def test_document_split_is_a_pure_function_of_the_text_with_the_asked_fractions() -> None:
    texts = [f"document {i}" for i in range(4000)]
    splits = [document_split(t, 0.1, 0.05) for t in texts]
    assert splits == [document_split(t, 0.1, 0.05) for t in texts]
    assert abs(splits.count("val") / 4000 - 0.1) < 0.02 and abs(splits.count("test") / 4000 - 0.05) < 0.015
    assert "test" not in {document_split(t, 0.1, 0.0) for t in texts}


def test_tokenizer_round_trip_and_special_tokens(tmp_path: Path) -> None:
    tokenizer = trained_bpe_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|endoftext|>", 0, 1)
    assert len(tokenizer) == 300
    unseen = "Zebra 🦓 naïve\r\n\tx = {'a': 1}  "
    for text in [*TEXTS[:3], unseen]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    folder = next(tmp_path.iterdir())
    metadata = json.loads((folder / "fingerprint.json").read_text())
    assert metadata["vocab_size"] == 300 and metadata["python"].count(".") == 2


def test_tokenizer_is_reused_and_rebuilt_when_the_fingerprint_changes(tmp_path: Path, monkeypatch) -> None:
    first = trained_bpe_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    trained = []
    original = bpe_module._train
    monkeypatch.setattr(bpe_module, "_train", lambda *a: trained.append(a) or original(*a))
    again = trained_bpe_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert not trained and again.get_vocab() == first.get_vocab()
    trained_bpe_tokenizer(TEXTS, vocab_size=290, cache_dir=tmp_path)
    trained_bpe_tokenizer([*TEXTS, "one more text"], vocab_size=300, cache_dir=tmp_path)
    assert len(trained) == 2 and len(list(tmp_path.iterdir())) == 3  # the old entries are kept


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "trunc'), "differs from the file"),
        (lambda f: (f / "fingerprint.json").unlink(), "cannot be read"),
        (lambda f: (f / "fingerprint.json").write_text('{"fingerprint": "0"}'), "names another fingerprint"),
        (lambda f: (f / "tokenizer_config.json").unlink(), "does not name <|endoftext|> and <|pad|>"),
    ],
    ids=["truncated-tokenizer", "partial-folder", "wrong-fingerprint", "no-config"],
)
def test_a_damaged_cached_tokenizer_is_rebuilt_identically_with_a_warning(
    tmp_path: Path, fault, reason
) -> None:
    trained_bpe_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    good = (folder / "tokenizer.json").read_bytes()
    fault(folder)
    with pytest.warns(UserWarning, match=f"Rebuilding the cached tokenizer in .*: .*{re.escape(reason)}"):
        tokenizer = trained_bpe_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert (folder / "tokenizer.json").read_bytes() == good  # training is deterministic
    assert tokenizer.decode(tokenizer(TEXTS[2])["input_ids"]) == TEXTS[2]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left


def test_tokenizer_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot hold the 256 bytes and the 2 special tokens; use >= 258"):
        trained_bpe_tokenizer(TEXTS, vocab_size=257, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one training text"):
        trained_bpe_tokenizer([], cache_dir=tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(
        OSError, match="Cannot write the tokenizer cache in .*; pass cache_dir= a writable folder"
    ):
        trained_bpe_tokenizer(TEXTS, cache_dir=tmp_path / "a-file")


def test_packed_blocks_keep_every_token_once_and_mask_only_the_padding() -> None:
    blocks = pack_blocks([[5, 6, 7], [8], [9, 10]], block_size=4, eos_id=0, pad_id=1)
    assert blocks.input_ids.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10], [0, 1, 1, 1]]
    assert blocks.labels.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10], [0, -100, -100, -100]]
    assert blocks[2]["attention_mask"].tolist() == [1, 0, 0, 0]


def test_prompt_response_rows_learn_only_the_response() -> None:
    rows = prompt_response_rows([[3, 4], [5]], [[6, 7], [8, 9, 10, 11, 12]], block_size=5, eos_id=0, pad_id=1)
    assert rows.input_ids.tolist() == [[3, 4, 6, 7, 0], [5, 8, 9, 10, 11]]
    assert rows.labels.tolist() == [[-100, -100, 6, 7, 0], [-100, 8, 9, 10, 11]]
    short = prompt_response_rows([[3]], [[6]], block_size=5, eos_id=0, pad_id=1)
    assert short.labels.tolist() == [[-100, 6, 0, -100, -100]] and short.attention_mask.tolist() == [
        [1, 1, 1, 0, 0]
    ]
    with pytest.raises(ValueError, match="leaves no room for its response in block_size=2; raise block_size"):
        prompt_response_rows([[3, 4]], [[6]], block_size=2, eos_id=0, pad_id=1)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> PythonDocsText:
    data = PythonDocsText(
        block_size=32,
        vocab_size=400,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.2,
        stdlib=JSON_PACKAGE,
        cache_dir=str(tmp_path_factory.mktemp("tokenizers")),
    )
    data.setup("fit")
    return data


def test_splits_are_disjoint_and_the_tokenizer_sees_only_training_text(blocks: PythonDocsText) -> None:
    texts = {split: {d.text for d in docs} for split, docs in blocks.documents.items()}
    assert all(texts.values()) and not (texts["train"] & texts["val"] or texts["train"] & texts["test"])
    assert not texts["val"] & texts["test"]
    assert all(document_split(t, 0.2, 0.2) == s for s, ts in texts.items() for t in ts)
    (folder,) = Path(blocks.cache_dir).iterdir()
    metadata = json.loads((folder / "fingerprint.json").read_text())
    assert metadata["train_documents"] == len(texts["train"])
    assert metadata["train_characters"] == sum(map(len, texts["train"]))
    described = describe_corpus(blocks.documents)
    assert described["val"] == {"documents": len(texts["val"]), "characters": sum(map(len, texts["val"]))}
    assert described["python"] == metadata["python"] == platform.python_version()


def test_packed_batches_hold_the_split_text_with_unshifted_labels(blocks: PythonDocsText) -> None:
    batch = next(iter(blocks.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, 32)
    val = blocks.datasets["val"]
    stream = val.input_ids[val.attention_mask.bool()].tolist()
    eos = blocks.tokenizer.eos_token_id
    expected = [t for d in blocks.documents["val"] for t in (*blocks.tokenizer(d.text)["input_ids"], eos)]
    assert stream == expected
    assert torch.equal(val.labels, val.input_ids.masked_fill(val.attention_mask == 0, -100))
    assert val.attention_mask[-1].sum() < 32 and blocks.vocab_size == len(blocks.tokenizer) == 400


def test_prompt_response_format_masks_the_prompt(blocks: PythonDocsText) -> None:
    data = PythonDocsText(
        format="prompt_response",
        block_size=64,
        vocab_size=400,
        val_fraction=0.2,
        test_fraction=0.2,
        stdlib=JSON_PACKAGE,
        cache_dir=blocks.cache_dir,
    )
    data.setup("fit")
    assert len(list(Path(blocks.cache_dir).iterdir())) == 1  # the same tokenizer, reused
    document, row = data.documents["val"][0], data.datasets["val"][0]
    prompt = data.tokenizer(f"Topic: {document.title}\n")["input_ids"]
    response = data.tokenizer(document.text)["input_ids"]
    length = min(64, len(prompt) + len(response) + 1)
    assert row["input_ids"][: len(prompt)].tolist() == prompt
    assert (row["labels"][: len(prompt)] == -100).all() and (row["labels"][length:] == -100).all()
    assert row["labels"][len(prompt) : length].tolist() == [*response, 0][: length - len(prompt)]
    assert len(data.datasets["val"]) == len(data.documents["val"])


def test_datamodule_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be 'blocks' or 'prompt_response'"):
        PythonDocsText(format="chat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        PythonDocsText(block_size=1)
    with pytest.raises(ValueError, match="leave documents for training"):
        PythonDocsText(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(RuntimeError, match=r"Call setup\(\) before reading vocab_size"):
        _ = PythonDocsText().vocab_size
    tiny = PythonDocsText(max_documents=3, stdlib=JSON_PACKAGE, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="The 3 documents leave the val split empty; raise max_documents"):
        tiny.setup("fit")


def test_datamodule_is_configured_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PythonDocsText, "data")
    config = parser.parse_string("data:\n  format: prompt_response\n  block_size: 64\n  vocab_size: 1024\n")
    data = parser.instantiate_classes(config).data
    assert (data.format, data.block_size, data.hparams.vocab_size) == ("prompt_response", 64, 1024)
    with pytest.raises(SystemExit):
        parser.parse_string("data:\n  format: chat\n")
