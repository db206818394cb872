"""Pairing the student's and the teacher's positions on the text: hand-made strings, trained tokenizers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_kd.data.bpe import trained_bpe_tokenizer
from lightning_kd.language import CrossTokenizerCollator, aligned_positions, token_anchors
from tests.language.cross_tokenizer_setup import student_tokenizer, teacher_tokenizer


def test_anchors_skip_leading_whitespace_repeats_and_empty_spans() -> None:
    text = "a  bc\n\n é"
    # "a" (0,1); "  bc" (1,5) anchors at "b" (3); "\n\n" (5,7) is all whitespace: its start;
    # " é" split into two byte tokens of the same span (7,9): the second repeats anchor 8;
    # a special token (0,0) has no span
    offsets = [(0, 1), (1, 5), (5, 7), (7, 9), (7, 9), (0, 0)]
    assert token_anchors(text, offsets) == [0, 3, 5, 8, -1, -1]


def test_positions_pair_where_the_predicted_tokens_begin_at_the_same_character() -> None:
    # "hello world": student hel|lo| wor|ld (byte-level style, the space in " wor"); teacher hello|world
    text = "hello world"
    student = token_anchors(text, [(0, 3), (3, 5), (5, 9), (9, 11)])
    teacher = token_anchors(text, [(0, 5), (6, 11)])
    assert student == [0, 3, 6, 9] and teacher == [0, 6]
    # student position 0 read "hel", predicts "lo" (3): the teacher never begins a token at 3 -> -1;
    # position 1 read "hello", predicts " wor" (6) = teacher position 0, which read "hello" and
    # predicts "world";
    # position 2 predicts "ld" (9): inside the teacher's "world" -> -1
    assert aligned_positions(student, teacher) == [-1, 0, -1]
    # the other way round: teacher position 0 predicts "world" (6) = student position 1
    assert aligned_positions(teacher, student) == [1]
    # a repeated anchor (second byte of a character) is never paired, even if the other side begins there
    assert aligned_positions([0, 1, -1, 2], [0, 1, 2]) == [0, -1, 1]


def test_collator_pairs_every_position_of_two_hand_built_tokenizers() -> None:
    collator = CrossTokenizerCollator(student_tokenizer(), teacher_tokenizer(), max_length=16)
    batch = collator(["hello world, the json module", {"text": "json module"}])
    # student: hel ##lo wor ##ld , the json mod ##ule   (ids 2 3 4 5 8 9 10 6 7)
    # teacher: hello world , the json module            (ids 2 3 4 5 6 7)
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5, 8, 9, 10, 6, 7], [10, 6, 7, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [10, 6, 7, *[-100] * 6]
    assert batch["teacher_input_ids"].tolist() == [[2, 3, 4, 5, 6, 7], [6, 7, 0, 0, 0, 0]]
    assert batch["teacher_attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    # student positions predict: ##lo(3) wor(6) ##ld(9) ,(11) the(13) json(17) mod(22) ##ule(25)
    # teacher positions predict: world(6) ,(11) the(13) json(17) module(22)
    assert batch["teacher_positions"].tolist() == [
        [-1, 0, -1, 1, 2, 3, 4, -1],
        [0, -1, -1, -1, -1, -1, -1, -1],  # mod(5) = the teacher's module; ##ule and padding: none
    ]
    assert batch["teacher_positions"].dtype == torch.long


def test_text_the_teachers_truncation_cut_off_is_not_paired() -> None:
    collator = CrossTokenizerCollator(student_tokenizer(), teacher_tokenizer(), 16, teacher_max_length=3)
    batch = collator(["hello world, the json module"])
    assert batch["teacher_input_ids"].tolist() == [[2, 3, 4]]  # hello world ,
    assert batch["teacher_positions"].tolist() == [[-1, 0, -1, 1, -1, -1, -1, -1]]


def test_rows_of_one_token_are_padded_to_one_predicting_position() -> None:
    batch = CrossTokenizerCollator(student_tokenizer(), teacher_tokenizer(), 8)(["json", "the"])
    assert batch["input_ids"].shape == batch["teacher_input_ids"].shape == (2, 2)
    assert batch["teacher_positions"].tolist() == [[-1], [-1]]
    assert batch["labels"].tolist() == [[10, -100], [9, -100]]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Docstrings of the json package: a few thousand words of English and code."""
    return [
        part.strip()
        for source in (json, json.decoder, json.encoder, json.scanner)
        for part in [source.__doc__ or "", *(getattr(v, "__doc__", "") or "" for v in vars(source).values())]
        if part and len(part) > 40
    ]


def _wordpiece(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[PAD]", "[UNK]"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def _check_every_pair(collator: CrossTokenizerCollator, texts: list[str]) -> float:
    """The fraction of paired positions, after checking every position.

    Each pair read the same text (up to whitespace) and predicts tokens that begin at one character;
    each unpaired student position has no teacher token beginning where its token begins.
    """
    batch = collator(texts)
    paired = total = 0
    for row, text in enumerate(texts):
        student = collator.tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=64)
        teacher = collator.teacher_tokenizer(
            text, return_offsets_mapping=True, truncation=True, max_length=64
        )
        s_spans, t_spans = student["offset_mapping"], teacher["offset_mapping"]

        def begin(span: tuple[int, int], text: str = text) -> int:
            word = text[span[0] : span[1]]
            return span[0] + len(word) - len(word.lstrip()) if word.strip() else span[0]

        t_begins: dict[int, int] = {}
        for j, span in enumerate(t_spans):
            t_begins.setdefault(begin(span), j)
        for i, partner in enumerate(batch["teacher_positions"][row, : len(s_spans) - 1].tolist()):
            total += 1
            start = begin(s_spans[i + 1])
            if partner == -1:
                # the only misses: no teacher token begins there, or a byte token repeating its character
                assert start not in t_begins or t_begins[start] == 0 or begin(s_spans[i]) == start, (text, i)
                continue
            paired += 1
            assert begin(t_spans[partner + 1]) == start
            seen = re.sub(r"\s", "", text[: s_spans[i][1]])
            assert seen == re.sub(r"\s", "", text[: t_spans[partner][1]]), (text, i, partner)
    return paired / total


def test_two_bpe_sizes_trained_on_the_same_text_pair_most_positions(
    corpus: list[str], tmp_path: Path
) -> None:
    small = trained_bpe_tokenizer(corpus, 300, tmp_path, name="small")
    large = trained_bpe_tokenizer(corpus, 600, tmp_path, name="large")
    assert small.get_vocab() != large.get_vocab()
    fraction = _check_every_pair(CrossTokenizerCollator(large, small, 64), corpus[:8])
    assert 0.3 < fraction < 1.0  # the larger vocabulary's tokens often cover several of the smaller's


def test_bpe_and_wordpiece_trained_on_the_same_text(corpus: list[str], tmp_path: Path) -> None:
    bpe = trained_bpe_tokenizer(corpus, 600, tmp_path, name="bpe")
    fraction = _check_every_pair(CrossTokenizerCollator(bpe, _wordpiece(corpus), 64), corpus[:8])
    assert 0.3 < fraction < 1.0  # word beginnings pair although only BPE keeps the spaces


def test_bad_tokenizers_and_samples_name_the_fix() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(
        ValueError, match=r"The teacher's tokenizer Slow is not a fast tokenizer: aligning two"
    ):
        CrossTokenizerCollator(student_tokenizer(), Slow(), 8)
    no_pad = teacher_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(
        ValueError, match=r"The teacher's tokenizer .*'teacher-words' .* has no padding token"
    ):
        CrossTokenizerCollator(student_tokenizer(), no_pad, 8)
    with pytest.raises(ValueError, match=r"max_length=8 and teacher_max_length=1 must be >= 2"):
        CrossTokenizerCollator(student_tokenizer(), teacher_tokenizer(), 8, teacher_max_length=1)
    collator = CrossTokenizerCollator(student_tokenizer(), teacher_tokenizer(), 8)
    with pytest.raises(
        TypeError, match=r"Sample 1 is a dict without a text: .* a 'text' string \(got NoneType\)"
    ):
        collator(["json", {"input_ids": [1, 2]}])
