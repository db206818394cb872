"""Checkpoints: frozen teacher left out (or kept), round trips, resume, teacher checkpoint errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import DistillationModule
from tests.helpers import RandomDataModule, make_trainer, small_net


def _fit(module: DistillationModule, directory: Path, epochs: int = 1, **kwargs: Any) -> Path:
    checkpoint = ModelCheckpoint(dirpath=directory, filename="model", enable_version_counter=False)
    trainer = make_trainer(max_epochs=epochs, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, datamodule=RandomDataModule(), **kwargs)
    return Path(checkpoint.last_model_path or checkpoint.best_model_path)


@pytest.fixture
def trained_teacher(tmp_path: Path) -> Path:
    """A teacher trained by the module itself (no teacher): its network is saved under `student.`."""
    return _fit(DistillationModule(small_net(hidden=32)), tmp_path / "teacher", epochs=2)


def test_teacher_checkpoint_round_trip(trained_teacher: Path, tmp_path: Path) -> None:
    teacher = small_net(hidden=32)
    module = DistillationModule(small_net(), teacher, teacher_checkpoint=trained_teacher)
    saved = torch.load(trained_teacher, weights_only=True)["state_dict"]
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, saved[f"student.{name}"]), name

    student_ckpt = _fit(module, tmp_path / "student")
    state = torch.load(student_ckpt, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teacher.") for key in state)

    # the teacher comes back from its own source: the teacher_checkpoint
    restored = DistillationModule.load_from_checkpoint(
        student_ckpt, student=small_net(), teacher=small_net(hidden=32)
    )
    for name, tensor in module.student.state_dict().items():
        assert torch.equal(tensor, restored.student.state_dict()[name]), name
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, restored.teacher.state_dict()[name]), name


def test_save_teacher_keeps_it_and_costs_its_size(trained_teacher: Path, tmp_path: Path) -> None:
    def build(save_teacher: bool) -> DistillationModule:
        return DistillationModule(small_net(), small_net(hidden=512), save_teacher=save_teacher)

    without = _fit(build(False), tmp_path / "without")
    with_teacher = _fit(build(True), tmp_path / "with")
    state = torch.load(with_teacher, weights_only=True)["state_dict"]
    assert any(key.startswith("teacher.") for key in state)
    teacher_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("teacher."))
    growth = with_teacher.stat().st_size - without.stat().st_size
    assert growth >= teacher_bytes  # the teacher's tensors are what the flag adds


def test_co_trained_teacher_is_always_saved(tmp_path: Path) -> None:
    module = DistillationModule(small_net(), small_net(), teacher_mode="trainable")
    state = torch.load(_fit(module, tmp_path), weights_only=True)["state_dict"]
    assert any(key.startswith("teacher.") for key in state)


def test_resume_without_teacher_in_checkpoint(tmp_path: Path) -> None:
    teacher = small_net()
    first = _fit(DistillationModule(small_net(), teacher), tmp_path / "a", epochs=1)
    module = DistillationModule(small_net(), teacher)
    trainer = make_trainer(max_epochs=2)
    with pytest.warns(UserWarning, match="Resumed with another run length"):  # 1 epoch planned, now 2
        trainer.fit(module, datamodule=RandomDataModule(), ckpt_path=first)
    assert trainer.current_epoch == 2 and trainer.global_step == 8


def test_teacher_checkpoint_of_another_architecture(trained_teacher: Path) -> None:
    with pytest.raises(
        ValueError, match=r"does not fit Sequential.*of another shape.*\(32, 8\) vs model \(16, 8\)"
    ):
        DistillationModule(small_net(), small_net(hidden=16), teacher_checkpoint=trained_teacher)


def test_truncated_teacher_checkpoint(trained_teacher: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained_teacher.read_bytes()[:200])
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        DistillationModule(small_net(), small_net(hidden=32), teacher_checkpoint=broken)
