"""student_checkpoint: a student that starts from trained weights (e.g. the supervised baseline's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser

from lightning_kd import DistillationModule
from tests.helpers import RandomDataModule, fit_to_checkpoint, make_trainer, small_net


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    """A student trained alone (no teacher): its weights are saved under ``student.``."""
    return fit_to_checkpoint(DistillationModule(small_net()), tmp_path / "baseline")


def _saved_student(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")}


def test_the_student_starts_from_the_checkpoint_and_its_absolute_path_is_recorded(
    baseline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(baseline.parent)
    module = DistillationModule(small_net(), small_net(), student_checkpoint=baseline.name)
    saved = _saved_student(baseline)
    assert saved and set(saved) == set(module.student.state_dict())
    for name, value in module.student.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert module.hparams.student_checkpoint == str(baseline.resolve())


def test_an_ema_teacher_starts_as_a_copy_of_the_loaded_student(baseline: Path) -> None:
    module = DistillationModule(small_net(), teacher_mode="ema", student_checkpoint=baseline)
    saved = _saved_student(baseline)
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_checkpoints_hold_the_trained_student_and_reload_without_the_start_file(
    baseline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(baseline.parent)  # a relative start path, as a user types it
    module = DistillationModule(small_net(), small_net(), student_checkpoint=baseline.name)
    distilled = fit_to_checkpoint(module, tmp_path / "kd")
    saved = torch.load(distilled, weights_only=True)
    assert saved["hyper_parameters"]["student_checkpoint"] is None
    assert saved["student_start"] == str(baseline.resolve())
    assert module.hparams.student_checkpoint == str(baseline.resolve())  # the live module keeps it
    trained, start = _saved_student(distilled), _saved_student(baseline)
    assert any(not torch.equal(trained[name], start[name]) for name in trained)  # it did train
    baseline.unlink()  # the start file gone, from another directory: the trained student comes back
    monkeypatch.chdir(tmp_path)
    restored = DistillationModule.load_from_checkpoint(distilled, student=small_net(), teacher=small_net())
    for name, value in restored.student.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_a_resumed_fit_restores_its_trained_student_over_the_start(baseline: Path, tmp_path: Path) -> None:
    distilled = fit_to_checkpoint(
        DistillationModule(small_net(), small_net(), student_checkpoint=baseline), tmp_path / "kd"
    )
    module = DistillationModule(small_net(), small_net(), student_checkpoint=baseline)
    trainer = make_trainer(max_epochs=1)  # the checkpoint's epoch: the fit restores and ends
    trainer.fit(module, datamodule=RandomDataModule(), ckpt_path=distilled)
    for name, value in module.student.state_dict().items():
        assert torch.equal(value, _saved_student(distilled)[name]), name


def test_a_missing_start_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"Student checkpoint .* does not exist\. Train the model the student"
    ):
        DistillationModule(small_net(), student_checkpoint=tmp_path / "baseline.ckpt")


def test_a_checkpoint_of_another_student_is_refused_with_the_shapes(baseline: Path) -> None:
    with pytest.raises(
        ValueError, match=r"does not fit.*of another shape.*Check that the student's architecture"
    ):
        DistillationModule(small_net(hidden=32), student_checkpoint=baseline)


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_subclasses(direct)}}


def test_every_module_of_the_package_takes_student_checkpoint_from_yaml() -> None:
    import lightning_kd.language  # noqa: F401  (the language modules)
    import lightning_kd.paradigms  # noqa: F401  (data-free and the other paradigm modules)

    modules = {cls for cls in _subclasses(DistillationModule) if cls.__module__.startswith("lightning_kd.")}
    assert len(modules) >= 6  # causal LM, on-policy, store, cross-tokenizer, embeddings, data-free
    for cls in modules:
        parser = LightningArgumentParser()
        parser.add_class_arguments(cls, "model")
        assert "model.student_checkpoint" in {action.dest for action in parser._actions}, cls.__name__
