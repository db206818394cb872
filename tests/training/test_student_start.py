"""student_checkpoint: a student that starts from trained weights (e.g. the supervised baseline's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import DistillationModule
from tests.helpers import RandomDataModule, make_trainer, small_net


def _fit(module: DistillationModule, directory: Path) -> Path:
    checkpoint = ModelCheckpoint(dirpath=directory, filename="model", enable_version_counter=False)
    make_trainer(max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        module, datamodule=RandomDataModule()
    )
    return Path(checkpoint.best_model_path)


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    """A student trained alone (no teacher): its weights are saved under ``student.``."""
    return _fit(DistillationModule(small_net()), tmp_path / "baseline")


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


def test_a_reloaded_module_holds_its_trained_student_not_the_start(baseline: Path, tmp_path: Path) -> None:
    distilled = _fit(
        DistillationModule(small_net(), small_net(), student_checkpoint=baseline), tmp_path / "kd"
    )
    trained = _saved_student(distilled)
    start = _saved_student(baseline)
    assert any(not torch.equal(trained[name], start[name]) for name in trained)  # it did train
    restored = DistillationModule.load_from_checkpoint(distilled, student=small_net(), teacher=small_net())
    for name, value in restored.student.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # the start file gone: reloading says how, and works with student_checkpoint=None
    baseline.unlink()
    with pytest.raises(FileNotFoundError, match=r"load_from_checkpoint\(path, student_checkpoint=None\)"):
        DistillationModule.load_from_checkpoint(distilled, student=small_net(), teacher=small_net())
    restored = DistillationModule.load_from_checkpoint(
        distilled, student=small_net(), teacher=small_net(), student_checkpoint=None
    )
    assert torch.equal(restored.student[0].weight, trained["0.weight"])


def test_a_checkpoint_of_another_student_is_refused_with_the_shapes(baseline: Path) -> None:
    with pytest.raises(ValueError, match=r"does not fit.*of another shape"):
        DistillationModule(small_net(hidden=32), student_checkpoint=baseline)
