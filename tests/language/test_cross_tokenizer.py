"""CrossTokenizerDistillationModule: a teacher of another tokenizer, ULD on the aligned tokens."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_kd import CausalLMDistillationModule, CrossTokenizerDistillationModule, TokenDivergenceTerm
from lightning_kd.losses import TokenCrossEntropyTerm, ULDTerm
from tests.helpers import make_trainer
from tests.language.cross_tokenizer_setup import cross_loader, student_tokenizer, teacher_tokenizer
from tests.language.helpers import tiny_gpt2


def models(sharp_teacher: float = 1.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A student of the WordPiece vocabulary (15 ids), a teacher of the word vocabulary (12 ids)."""
    student = tiny_gpt2(16, vocab=len(student_tokenizer()), pad_token_id=0)
    teacher = tiny_gpt2(16, vocab=len(teacher_tokenizer()), seed=1, pad_token_id=0)
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(sharp_teacher)  # tied head: confident next-token predictions
    return student, teacher


def test_the_step_gathers_the_teachers_logits_at_the_partners() -> None:
    student, teacher = models()
    module = CrossTokenizerDistillationModule(student, teacher, tokenizer=student_tokenizer())
    batch = next(iter(cross_loader(2, batch_size=2)))
    outputs = module.step_outputs(batch)
    tokens = outputs.tokens
    teacher_logits = teacher(input_ids=batch["teacher_input_ids"]).logits
    partners = batch["teacher_positions"]
    assert tokens.vocab_size == 15 and tokens.teacher_logits.shape == (*partners.shape, 12)
    for row, position in zip(*np.nonzero(partners.numpy() >= 0), strict=True):
        torch.testing.assert_close(
            tokens.teacher_logits[row, position], teacher_logits[row, partners[row, position]]
        )
    labels = batch["labels"][:, 1:]
    assert torch.equal(tokens.aligned, (partners >= 0) & (labels != -100))
    assert torch.equal(tokens.targets, labels)


def _held_out_losses(
    module: CrossTokenizerDistillationModule, batch: dict[str, torch.Tensor]
) -> dict[str, float]:
    with torch.no_grad():
        _, values = module.compute_loss(module.step_outputs(batch))
    return {name: float(value) for name, value in values.items()}


def test_a_teacher_of_another_tokenizer_lowers_the_students_loss() -> None:
    held_out = next(iter(cross_loader(8, batch_size=8, seed=1)))
    trained = {}
    for uld_weight in (1.0, 0.0):
        student, teacher = models(sharp_teacher=8.0)
        module = CrossTokenizerDistillationModule(
            student,
            teacher,
            losses=[TokenCrossEntropyTerm("ce"), ULDTerm("uld", weight=uld_weight)],
            tokenizer=student_tokenizer(),
            teacher_tokenizer=teacher_tokenizer(),
            optimizer=lambda params: torch.optim.Adam(params, lr=0.02),
            cosine_decay=False,
        )
        before = _held_out_losses(module, held_out)
        trainer = make_trainer(max_epochs=4, limit_val_batches=1)
        trainer.fit(module, cross_loader(32, batch_size=8), cross_loader(8, batch_size=8, seed=1))
        trained[uld_weight] = after = _held_out_losses(module, held_out)
        total = {when: v["ce"] + uld_weight * v["uld"] for when, v in (("before", before), ("after", after))}
        assert total["after"] < total["before"] - 0.1, (before, after)
        frozen = models(sharp_teacher=8.0)[1].transformer.wte.weight
        assert torch.equal(teacher.transformer.wte.weight, frozen)
    # the teacher is sharp (and untrained): with ULD the student's sorted probabilities come closer to its
    assert trained[1.0]["uld"] < 0.5 * before["uld"] and trained[1.0]["uld"] < trained[0.0]["uld"], trained
    counted = held_out["labels"][:, 1:] != -100
    expected = ((held_out["teacher_positions"] >= 0) & counted).sum() / counted.sum()
    assert float(trainer.callback_metrics["val/aligned"]) == pytest.approx(float(expected))
    assert torch.isfinite(trainer.callback_metrics["val/teacher_perplexity"])


def test_a_different_tokenizer_in_the_same_tokenizer_module_names_the_cross_tokenizer_module() -> None:
    student, teacher = models()
    message = (
        "The student's tokenizer TokenizersBackend 'student-pieces' (15 ids) and "
        "the teacher's TokenizersBackend "
        "'teacher-words' (12 ids) differ (student 15, teacher 12 output ids): "
        "token-level distillation compares "
        "the models id by id, so both need one tokenizer. Distil from a teacher "
        "of the student's tokenizer (or "
        "train the student with the teacher's), or across tokenizers with "
        "CrossTokenizerDistillationModule and "
        "a ULDTerm (Universal Logit Distillation; batches from CrossTokenizerCollator)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        CausalLMDistillationModule(
            student, teacher, tokenizer=student_tokenizer(), teacher_tokenizer=teacher_tokenizer()
        )
    with pytest.raises(
        ValueError, match=r"For a teacher of another tokenizer use CrossTokenizerDistillationModule"
    ):
        CausalLMDistillationModule(student, teacher)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"losses": [TokenCrossEntropyTerm("ce"), TokenDivergenceTerm("kd")]},
            "Loss term 'kd' (TokenDivergenceTerm) compares the teacher and the "
            "student token id by id, but the "
            "student's tokenizer is TokenizersBackend 'student-pieces' (15 ids) and "
            "the teacher's TokenizersBackend "
            "'teacher-words' (12 ids): with a teacher of another tokenizer use ULDTerm",
        ),
        (
            {"losses": [TokenCrossEntropyTerm("ce", path="fused"), ULDTerm()]},
            "Loss term 'ce' takes the fused LM-head path (path='fused'), which "
            "CrossTokenizerDistillationModule "
            "does not support",
        ),
        ({"teacher": None}, "CrossTokenizerDistillationModule needs a teacher"),
        (
            {"teacher_mode": "ema"},
            "teacher_mode='ema': a teacher of another tokenizer is a separate, frozen model",
        ),
    ],
)
def test_unsupported_settings_stop_at_construction(kwargs: dict[str, Any], message: str) -> None:
    student, teacher = models()
    arguments = {
        "teacher": teacher,
        "tokenizer": student_tokenizer(),
        "teacher_tokenizer": teacher_tokenizer(),
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        CrossTokenizerDistillationModule(student, **{**arguments, **kwargs})


def _fit_one(module: CrossTokenizerDistillationModule, batch: dict[str, torch.Tensor]) -> None:
    make_trainer(limit_train_batches=1).fit(module, DataLoader([batch], batch_size=None))


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        (
            "no partners",
            KeyError,
            "no 'teacher_positions' (the teacher position paired with each student position)",
        ),
        (
            "partners of another shape",
            ValueError,
            r"batch['teacher_positions'] must be an integer tensor of shape",
        ),
        (
            "partner past the teacher",
            ValueError,
            "batch['teacher_positions'] holds 6, outside [-1, 6): the teacher has "
            "that many predicting positions",
        ),
        ("teacher id outside", ValueError, "batch['teacher_input_ids'] holds token ids outside [0, 12)"),
        ("no teacher tokens", KeyError, "no 'teacher_input_ids' (token ids)"),
    ],
)
def test_bad_batches_stop_before_the_step(case: str, error: type, message: str) -> None:
    student, teacher = models()
    module = CrossTokenizerDistillationModule(student, teacher)
    batch = next(iter(cross_loader(2, batch_size=2)))
    if case == "no partners":
        del batch["teacher_positions"]
    elif case == "partners of another shape":
        batch["teacher_positions"] = batch["teacher_positions"][:, :-1]
    elif case == "partner past the teacher":
        batch["teacher_positions"][0, 0] = batch["teacher_input_ids"].shape[1] - 1
    elif case == "teacher id outside":
        batch["teacher_input_ids"][1, 0] = 12
    else:
        del batch["teacher_input_ids"]
    weights = student.transformer.wte.weight.clone()
    with pytest.raises(error, match=re.escape(message)):
        _fit_one(module, batch)
    assert torch.equal(student.transformer.wte.weight, weights)  # no step was taken
