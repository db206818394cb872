"""A teacher that gets no gradients (frozen, EMA) keeps no autograd graph: no activations are stored."""

from __future__ import annotations

import pytest
import torch
from conftest import small_net

from lightning_kd.losses.base import StepOutputs
from lightning_kd.losses.feature import FitNetTerm
from lightning_kd.losses.response import CrossEntropyTerm, KDTerm
from lightning_kd.module import DistillationModule


def module_for(teacher_mode: str) -> DistillationModule:
    terms = [CrossEntropyTerm(), KDTerm(), FitNetTerm("1", "1", weight=1.0)]
    if teacher_mode == "trainable":
        terms.append(CrossEntropyTerm("teacher_ce", model="teacher"))
    teacher = None if teacher_mode == "ema" else small_net()
    return DistillationModule(small_net(), teacher, losses=terms, teacher_mode=teacher_mode)


def hooked_step(module: DistillationModule, batch: tuple[torch.Tensor, torch.Tensor]) -> StepOutputs:
    module.build_terms(batch)
    hooks = module.configure_callbacks()[0]
    hooks.attach(module)
    module.train()
    outputs = module.step_outputs(batch)
    total, _ = module.compute_loss(outputs)
    total.backward()
    return outputs


@pytest.mark.parametrize("teacher_mode", ["frozen", "ema"])
def test_teacher_without_gradients_keeps_no_graph(teacher_mode: str) -> None:
    module = module_for(teacher_mode)
    outputs = hooked_step(module, (torch.randn(16, 8), torch.randint(0, 4, (16,))))
    assert outputs.teacher_logits.grad_fn is None and not outputs.teacher_logits.requires_grad
    teacher_feature = outputs.teacher_features["1"]
    assert teacher_feature.grad_fn is None and not teacher_feature.requires_grad
    assert all(p.grad is None for p in module.teacher.parameters())
    student_feature = outputs.student_features["1"]  # the student's side does keep its graph
    assert student_feature.grad_fn is not None and outputs.student_logits.grad_fn is not None


def test_trainable_teacher_keeps_its_graph() -> None:
    module = module_for("trainable")
    outputs = hooked_step(module, (torch.randn(16, 8), torch.randint(0, 4, (16,))))
    assert outputs.teacher_logits.grad_fn is not None
    assert outputs.teacher_features["1"].grad_fn is not None
    assert all(p.grad is not None for p in module.teacher.parameters())
