"""Sequence-level KD: the teacher's completions written resumably, fingerprinted, and read back."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd.data import PromptCollator
from lightning_kd.data.text import pack_blocks
from lightning_kd.language import GenerationSettings, SequenceKDData, generate_teacher_completions
from lightning_kd.language.sequence_kd import completions_identity, read_teacher_completions
from tests.language.helpers import tiny_gpt2

EOS, PAD = 0, 1
X = -100
SETTINGS = GenerationSettings(max_new_tokens=5, temperature=1.0, top_p=0.9, do_sample=True)


def prompts(count: int = 10) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 6, (count,), generator=generator).tolist()
    return [torch.randint(2, 48, (length,), generator=generator) for length in lengths]


def run(directory: Path, teacher: Any = None, settings: GenerationSettings = SETTINGS, **kwargs: Any) -> list:
    teacher = teacher if teacher is not None else tiny_gpt2(32, seed=1)
    kwargs.setdefault("fingerprint", {"tokenizer": "t1"})
    return generate_teacher_completions(teacher, prompts(), directory, settings, PAD, batch_size=3, **kwargs)


class Killed(Exception):
    """Stands for the process being killed."""


def test_a_killed_pass_resumes_to_the_completions_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = run(tmp_path / "whole")
    assert len(whole) == 10 and len(list((tmp_path / "whole").glob("batch-*.pt"))) == 4

    def kill_after_two(index: int) -> None:
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "resumed", on_batch=kill_after_two)
    with pytest.raises(
        ValueError, match="holds 6 completions for 10 prompts: the generation pass did not finish"
    ):
        identity = completions_identity(tiny_gpt2(32, seed=1), prompts(), SETTINGS, 0, 3, {"tokenizer": "t1"})
        read_teacher_completions(tmp_path / "resumed", identity)
    generated: list[int] = []
    resumed = run(tmp_path / "resumed", on_batch=generated.append)
    assert generated == [2, 3]  # only the missing batches
    assert resumed == whole
    assert read_teacher_completions(tmp_path / "resumed", identity) == whole
    for name in ("batch-00000.pt", "batch-00003.pt"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_completions_end_at_the_first_eos_or_after_max_new_tokens(tmp_path: Path) -> None:
    teacher = tiny_gpt2(32, seed=1)
    with torch.no_grad():  # the end: the first prompt's most likely next token, so that row ends at once
        eos = int(teacher(input_ids=prompts()[0][None]).logits[0, -1].argmax())
    teacher.generation_config.eos_token_id = eos
    greedy = run(tmp_path, teacher, GenerationSettings(max_new_tokens=5, do_sample=False))
    assert greedy[0] == [eos]
    for prompt, completion in zip(prompts(), greedy, strict=True):
        assert 1 <= len(completion) <= 5
        assert eos not in completion[:-1]
        assert len(completion) == 5 or completion[-1] == eos
        # greedy: each token is the teacher's most likely next token after prompt + the tokens before it
        ids = torch.cat([prompt, torch.tensor(completion)])[None]
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == completion


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("settings", "generation"),
        ("teacher", "teacher"),
        ("tokenizer", "tokenizer"),
        ("seed", "generation"),
    ],
)
def test_a_folder_of_other_completions_is_refused_with_what_differs(
    tmp_path: Path, change: str, named: str
) -> None:
    run(tmp_path)
    kwargs: dict[str, Any] = {
        "settings": {"settings": GenerationSettings(max_new_tokens=4, top_p=0.9)},
        "teacher": {"teacher": tiny_gpt2(32, seed=2)},
        "tokenizer": {"fingerprint": {"tokenizer": "t2"}},
        "seed": {"seed": 1},
    }[change]
    before = sorted(path.read_bytes() for path in tmp_path.iterdir() if path.name != "lock")
    with pytest.raises(
        ValueError, match=rf"generated with another {named} \(.*Delete the folder to generate"
    ):
        run(tmp_path, **kwargs)
    assert sorted(path.read_bytes() for path in tmp_path.iterdir() if path.name != "lock") == before


def test_a_damaged_batch_file_is_named_and_kept(tmp_path: Path) -> None:
    run(tmp_path)
    shard = tmp_path / "batch-00001.pt"
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(
        ValueError, match="batch-00001.pt is damaged .*delete that file; the next pass generates"
    ):
        run(tmp_path)
    assert shard.is_file()


def test_one_writer_per_folder(tmp_path: Path) -> None:
    tmp_path.joinpath("lock").touch()
    descriptor = os.open(tmp_path / "lock", os.O_RDWR)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        with pytest.raises(RuntimeError, match="Another process is generating completions into"):
            run(tmp_path)
    finally:
        os.close(descriptor)
    assert len(run(tmp_path)) == 10


def test_reading_before_any_pass_names_the_command(tmp_path: Path) -> None:
    identity = completions_identity(tiny_gpt2(32, seed=1), prompts(), SETTINGS, 0, 3)
    with pytest.raises(
        FileNotFoundError, match=r"run the generation pass \(`lightning-kd generate --config RECIPE`"
    ):
        read_teacher_completions(tmp_path, identity)


class Text(pl.LightningDataModule):
    """Prompts (the first 4 tokens of 8 random blocks) and held-out rows, as PythonDocsPrompts has them."""

    batch_size = 4

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        documents = [torch.randint(2, 48, (9,), generator=generator).tolist() for _ in range(8)]
        self.datasets = {"train": pack_blocks(documents, 10, EOS, PAD)}
        self.tokenizer = SimpleNamespace(pad_token_id=PAD, get_vocab=lambda: {str(i): i for i in range(48)})
        self.prompt_collator = PromptCollator(PAD, prompt_length=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=4)


def test_the_datamodule_serves_prompt_and_completion_with_labels_on_the_completion(tmp_path: Path) -> None:
    data = SequenceKDData(
        Text(), tiny_gpt2(32, seed=1), str(tmp_path), max_new_tokens=5, generation_batch_size=3
    )
    data.prepare_data()
    data.setup("fit")
    rows = data.text.datasets["train"]
    completions = read_teacher_completions(
        tmp_path,
        completions_identity(data.teacher, data.prompts()[0], data.settings, 0, 3, data.extra_fingerprint),
    )
    assert len(data.samples) == len(rows) == len(completions) == 8
    for sample, row, completion in zip(data.samples, rows, completions, strict=True):
        assert sample["input_ids"].tolist() == row["input_ids"][:4].tolist() + completion
        assert sample["prompt_length"] == 4
    batch = next(
        iter(DataLoader(data.samples[:4], batch_size=4, collate_fn=data.train_dataloader().collate_fn))
    )
    for i, completion in enumerate(completions[:4]):
        padding = batch["labels"].shape[1] - 4 - len(completion)
        assert batch["labels"][i].tolist() == [X] * 4 + completion + [X] * padding
