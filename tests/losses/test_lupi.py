"""Generalized distillation with privileged information: loss, plumbing, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_kd import DistillationModule
from lightning_kd.cli import main
from lightning_kd.data import MNISTPrivilegedDataModule
from lightning_kd.losses import GeneralizedDistillationTerm, StepOutputs
from lightning_kd.losses.functional import generalized_distillation_loss
from lightning_kd.models import MLP
from lightning_kd.recipes import RECIPES_DIR
from tests.helpers import make_trainer

CONFIGS = RECIPES_DIR / "mnist_privileged"


def hand_loss(
    student: Tensor, teacher: Tensor, target: Tensor, temperature: float, imitation: float
) -> float:
    """Eq. 2 of Lopez-Paz et al. in float64 with explicit softmax and cross-entropy sums."""
    student, teacher = student.double(), teacher.double()
    total = 0.0
    for s, t, y in zip(student, teacher, target.tolist(), strict=True):
        p_student = torch.exp(s) / torch.exp(s).sum()
        soft = torch.exp(t / temperature) / torch.exp(t / temperature).sum()
        hard_ce = -torch.log(p_student[y])
        soft_ce = -(soft * torch.log(p_student)).sum()
        total += float((1 - imitation) * hard_ce + imitation * soft_ce)
    return total / len(target)


@pytest.mark.parametrize(("temperature", "imitation"), [(1.0, 0.0), (2.0, 0.3), (10.0, 0.7), (5.0, 1.0)])
def test_loss_matches_float64_hand_computation(temperature: float, imitation: float) -> None:
    generator = torch.Generator().manual_seed(3)
    student = 3 * torch.randn(6, 5, generator=generator)
    teacher = 3 * torch.randn(6, 5, generator=generator)
    target = torch.randint(0, 5, (6,), generator=generator)
    value = generalized_distillation_loss(student, teacher, target, temperature, imitation)
    expected = hand_loss(student, teacher, target, temperature, imitation)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_pure_imitation_needs_no_labels_and_soft_targets_ignore_student_temperature() -> None:
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    value = generalized_distillation_loss(student, teacher, None, temperature=4.0, imitation=1.0)
    assert value.item() == pytest.approx(
        hand_loss(student, teacher, torch.zeros(4, dtype=torch.long), 4.0, 1.0)
    )
    # At its minimum the student's T=1 probabilities equal the teacher's T=4 ones: logits t / 4.
    matched = generalized_distillation_loss(teacher / 4, teacher, None, temperature=4.0, imitation=1.0)
    assert matched < generalized_distillation_loss(teacher, teacher, None, temperature=4.0, imitation=1.0)


def test_loss_rejects_bad_settings() -> None:
    logits = torch.randn(2, 3)
    with pytest.raises(ValueError, match="needs labels when imitation < 1"):
        generalized_distillation_loss(logits, logits, None, imitation=0.5)
    with pytest.raises(ValueError, match=r"imitation \(lambda\) must be in \[0, 1\]"):
        generalized_distillation_loss(logits, logits, torch.zeros(2, dtype=torch.long), imitation=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GeneralizedDistillationTerm(temperature=0.0)


def test_term_detaches_the_teacher_and_matches_the_function() -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 2, 1, 1])
    term = GeneralizedDistillationTerm(temperature=2.0, imitation=0.4)
    value = term(StepOutputs(student_logits=student, targets=target, teacher_logits=teacher))
    value.backward()
    assert value.item() == pytest.approx(
        hand_loss(student.detach(), teacher.detach(), target, 2.0, 0.4), rel=1e-5
    )
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="batch has no targets"):
        term(StepOutputs(student_logits=student, teacher_logits=teacher))


class ShapeRecorder(nn.Module):
    """Wraps a model and records the shape of every input it receives."""

    def __init__(self, model: nn.Module, forbidden_features: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_classes = 10
        self.forbidden_features = forbidden_features
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(tuple(x.shape[1:]))
        if self.forbidden_features is not None and x[0].numel() == self.forbidden_features:
            raise AssertionError(f"received an input with {self.forbidden_features} features")
        return self.model(x)


def lupi_module(**kwargs: object) -> DistillationModule:
    student = ShapeRecorder(MLP(in_features=49, hidden=(8,)), forbidden_features=28 * 28)
    teacher = ShapeRecorder(MLP(in_features=28 * 28, hidden=(8,)))
    options = dict(input_key="image", target_key="label", teacher_input_key="privileged")
    options.update(kwargs)
    return DistillationModule(
        student, teacher, losses=[GeneralizedDistillationTerm(temperature=5.0, imitation=0.5)], **options
    )


def test_student_never_receives_the_privileged_images(small_mnist: MNISTPrivilegedDataModule) -> None:
    module = lupi_module()
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    trainer.fit(module, datamodule=small_mnist)
    trainer.test(module, datamodule=small_mnist, verbose=False)
    assert len(module.student.seen) >= 4 and set(module.student.seen) == {(1, 7, 7)}
    assert len(module.teacher.seen) >= 4 and set(module.teacher.seen) == {(1, 28, 28)}


def test_batch_without_the_privileged_key_names_it(small_mnist: MNISTPrivilegedDataModule) -> None:
    batch = next(iter(small_mnist.train_dataloader()))
    del batch["privileged"]
    with pytest.raises(KeyError, match="teacher_input_key.*privileged"):
        lupi_module().step_outputs(batch)


SMALL = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_samples=64",
    "--data.init_args.val_samples=32",
    "--data.init_args.test_samples=100",
]


def test_recipes_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for recipe in ("teacher", "student", "lupi"):
        main(["fit", "--config", str(CONFIGS / f"{recipe}.yaml"), *SMALL])
        assert (tmp_path / f"runs/mnist_privileged/{recipe}/latest.ckpt").is_file()
    lupi = torch.load(tmp_path / "runs/mnist_privileged/lupi/latest.ckpt", weights_only=True)
    assert not any(key.startswith("teacher.") for key in lupi["state_dict"])
    assert lupi["state_dict"]["student.features.1.weight"].shape[1] == 49
    metrics = (tmp_path / "runs/mnist_privileged/lupi/version_0/metrics.csv").read_text()
    assert "train/loss_gd" in metrics and "val/teacher_acc" in metrics
