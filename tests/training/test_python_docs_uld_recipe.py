"""The ULD recipes: uld_teacher.yaml builds the teacher of the other tokenizer, uld.yaml fits from YAML.

Tiny overrides as in test_python_docs_recipes.py: one-layer GPT-2s, 40 documents, a 512-token
student tokenizer and a 384-token teacher tokenizer cached in a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd import CrossTokenizerDistillationModule
from lightning_kd.cli import main
from tests.training.test_python_docs_recipes import CONFIGS, size, small

TEACHER_VOCAB = 384


def vocab(role: str, tokens: int) -> str:
    return f"--model.init_args.{role}.init_args.config.init_args.vocab_size={tokens}"


def test_uld_recipes_build_a_teacher_of_the_other_tokenizer() -> None:
    teacher_run = yaml.safe_load((CONFIGS / "uld_teacher.yaml").read_text())
    uld = yaml.safe_load((CONFIGS / "uld.yaml").read_text())
    config = "init_args", "config", "init_args"

    def gpt2(recipe: dict, role: str) -> dict:
        node = recipe["model"]["init_args"][role]
        for key in config:
            node = node[key]
        return node

    # the teacher run trains as its "student" exactly the network uld.yaml loads as its teacher
    assert gpt2(teacher_run, "student") == gpt2(uld, "teacher") and gpt2(uld, "teacher")["vocab_size"] == 2048
    assert teacher_run["data"]["init_args"]["vocab_size"] == uld["data"]["init_args"]["teacher_vocab_size"]
    assert gpt2(uld, "student")["vocab_size"] == uld["data"]["init_args"]["vocab_size"] == 4096
    assert uld["model"]["init_args"]["teacher_checkpoint"] == "runs/python_docs/uld_teacher/latest.ckpt"
    assert teacher_run["trainer"]["logger"]["init_args"]["name"] == "uld_teacher"


def test_uld_recipe_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "uld.yaml"),
            *small(tmp_path / "cache"),
            "--model.init_args.teacher_checkpoint=null",  # an untrained teacher: the recipe's plumbing only
            f"--data.init_args.teacher_vocab_size={TEACHER_VOCAB}",
            vocab("student", 512),
            vocab("teacher", TEACHER_VOCAB),
            *size("student", 1, 16, 2),
            *size("teacher", 1, 32, 2),
        ]
    )
    header = (tmp_path / "runs/python_docs/uld/version_0/metrics.csv").read_text().splitlines()[0]
    for column in (
        "train/loss_ce",
        "train/loss_uld",
        "val/perplexity",
        "val/teacher_perplexity",
        "val/aligned",
    ):
        assert column in header, column
    restored = CrossTokenizerDistillationModule.load_from_checkpoint(
        tmp_path / "runs/python_docs/uld/latest.ckpt"
    )
    assert restored.teacher.lm_head.weight.shape == (TEACHER_VOCAB, 32)
    assert restored.student.lm_head.weight.shape == (512, 16)
    assert torch.isfinite(restored.student.lm_head.weight).all()


def test_one_vocabulary_for_both_models_is_refused() -> None:
    from lightning_kd.data import PythonDocsCrossTokenizerText

    with pytest.raises(
        ValueError, match=r"teacher_vocab_size=512 equals vocab_size: both models would share one"
    ):
        PythonDocsCrossTokenizerText(vocab_size=512, teacher_vocab_size=512)
