"""Resuming a fit: the schedule follows the run's real length, and another teacher, student or a too
short run is refused with the fix."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import DistillationModule
from lightning_kd.paradigms import MutualLearningModule
from tests.helpers import CrashAtEpoch, RandomDataModule, make_trainer, small_net

LR = 1e-3
STEPS_PER_EPOCH = 4  # RandomDataModule: 64 samples, batch 16


class RecordLR(pl.Callback):
    """The learning rate every optimizer step uses, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def fit(
    module: pl.LightningModule,
    directory: Path,
    max_epochs: int,
    ckpt_path: Path | None = None,
    callbacks: list[pl.Callback] | None = None,
) -> pl.Trainer:
    """Fit with a checkpoint after every epoch at ``directory/model.ckpt``."""
    checkpoint = ModelCheckpoint(dirpath=directory, filename="model", enable_version_counter=False)
    trainer = make_trainer(
        max_epochs=max_epochs, callbacks=[checkpoint, *(callbacks or [])], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=RandomDataModule(), ckpt_path=ckpt_path)
    return trainer


def interrupted(module: DistillationModule, directory: Path, planned: int, done: int) -> Path:
    """A fit of ``planned`` epochs stopped after ``done``; its last checkpoint."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(module, directory, planned, callbacks=[CrashAtEpoch(done)])
    return directory / "model.ckpt"


def cosine(step: int, total: int) -> float:
    """``LR (1 + cos(pi step / total)) / 2``: the default schedule of a ``total``-step run, computed here."""
    return LR * (1 + math.cos(math.pi * step / total)) / 2


def non_increasing(lrs: dict[int, float]) -> bool:
    values = [lrs[step] for step in sorted(lrs)]
    return all(later <= earlier for earlier, later in zip(values, values[1:], strict=False))


def test_a_resumed_fit_of_another_length_follows_the_cosine_of_its_real_length(tmp_path: Path) -> None:
    first = RecordLR()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(DistillationModule(small_net()), tmp_path, 4, callbacks=[first, CrashAtEpoch(2)])
    planned, done, total = 4 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 6 * STEPS_PER_EPOCH
    assert sorted(first.lrs) == list(range(done))
    for step, lr in first.lrs.items():  # the first run followed its plan of 4 epochs
        assert lr == pytest.approx(cosine(step, planned), rel=1e-9)

    resumed = RecordLR()
    with pytest.warns(
        UserWarning,
        match=r"planned for 16 optimizer steps \(max_epochs=4\), this run has 24 \(max_epochs=6\)\. "
        r"From step 8 on it follows the cosine of a 24-step run: the learning rate goes from 0\.0005 to "
        r"0\.00075 and decays to 0 at step 24",
    ):
        trainer = fit(DistillationModule(small_net()), tmp_path, 6, tmp_path / "model.ckpt", [resumed])
    assert sorted(resumed.lrs) == list(range(done, total))
    for step, lr in resumed.lrs.items():  # what a run planned for 6 epochs uses at these steps
        assert lr == pytest.approx(cosine(step, total), rel=1e-9)
    assert non_increasing(resumed.lrs)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-15)


def test_a_re_planned_run_resumed_again_keeps_its_new_plan(tmp_path: Path) -> None:
    checkpoint = interrupted(DistillationModule(small_net()), tmp_path, planned=4, done=1)
    with pytest.warns(UserWarning, match="planned for 16 optimizer steps"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(DistillationModule(small_net()), tmp_path, 6, checkpoint, [CrashAtEpoch(3)])
    recorder = RecordLR()  # resumed with the length it was re-planned for: no warning, the same plan
    trainer = fit(DistillationModule(small_net()), tmp_path, 6, checkpoint, [recorder])
    assert sorted(recorder.lrs) == list(range(12, 24))
    for step, lr in recorder.lrs.items():
        assert lr == pytest.approx(cosine(step, 24), rel=1e-9)
    assert trainer.global_step == 24


def test_a_finished_run_extended_trains_on_at_the_longer_runs_rate(tmp_path: Path) -> None:
    fit(DistillationModule(small_net()), tmp_path, 1)  # its cosine ended: learning rate 0
    recorder = RecordLR()
    with pytest.warns(
        UserWarning, match=r"the learning rate goes from 0 to 0\.0005 and decays to 0 at step 8"
    ):
        trainer = fit(DistillationModule(small_net()), tmp_path, 2, tmp_path / "model.ckpt", [recorder])
    for step, lr in recorder.lrs.items():
        assert lr == pytest.approx(cosine(step, 8), rel=1e-9)
    assert sorted(recorder.lrs) == [4, 5, 6, 7] and trainer.global_step == 8


def test_mutual_learning_follows_the_real_length_too(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(MutualLearningModule([small_net(), small_net()]), tmp_path, 2, callbacks=[CrashAtEpoch(1)])
    recorder = RecordLR()
    with pytest.warns(UserWarning, match="planned for 8 optimizer steps"):
        fit(
            MutualLearningModule([small_net(), small_net()]), tmp_path, 3, tmp_path / "model.ckpt", [recorder]
        )
    for step, lr in recorder.lrs.items():
        assert lr == pytest.approx(cosine(step, 12), rel=1e-9)
    assert sorted(recorder.lrs) == list(range(4, 12))


def test_a_user_scheduler_carrying_a_length_is_kept_with_a_warning(tmp_path: Path) -> None:
    def build() -> DistillationModule:
        cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4)
        return DistillationModule(small_net(), lr_scheduler=cosine, lr_scheduler_interval="epoch")

    checkpoint = interrupted(build(), tmp_path, planned=4, done=2)
    with pytest.warns(
        UserWarning,
        match=r"the checkpoint's run had 4 epochs, this one has 6, but the lr_scheduler CosineAnnealingLR "
        r"was restored with T_max=4 for the old length",
    ):
        trainer = fit(build(), tmp_path, 6, checkpoint)
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 4  # the user's schedule, left as restored


def test_resuming_with_fewer_epochs_or_steps_than_done_is_refused(tmp_path: Path) -> None:
    checkpoint = interrupted(DistillationModule(small_net()), tmp_path, planned=4, done=2)
    with pytest.raises(
        ValueError, match=r"has trained 2 epochs, more than this run's max_epochs=1.*max_epochs >= 2"
    ):
        fit(DistillationModule(small_net()), tmp_path, 1, checkpoint)
    trainer = make_trainer(max_epochs=4, max_steps=5)
    with pytest.raises(
        ValueError, match=r"has trained 8 steps, more than this run's max_steps=5.*max_steps >= 8"
    ):
        trainer.fit(DistillationModule(small_net()), datamodule=RandomDataModule(), ckpt_path=checkpoint)


def test_a_resumed_fit_with_another_teacher_is_refused(tmp_path: Path) -> None:
    teacher_file = tmp_path / "teacher.pt"
    torch.save(small_net().state_dict(), teacher_file)

    def build() -> DistillationModule:
        return DistillationModule(small_net(), small_net(), teacher_checkpoint=teacher_file)

    checkpoint = interrupted(build(), tmp_path / "run", planned=3, done=1)
    torch.save(small_net().state_dict(), teacher_file)  # the teacher is retrained in between
    with pytest.raises(
        ValueError,
        match=rf"'{checkpoint}' was trained with another frozen teacher: it recorded teacher_checkpoint "
        rf"'{teacher_file}' \(SHA-256 [0-9a-f]{{12}}\.\.\.\), but this module's teacher, teacher_checkpoint "
        rf"'{teacher_file}', has other weights.*Restore the teacher the run started with .*"
        "or start a fresh run",
    ):
        fit(build(), tmp_path / "run", 3, checkpoint)
    # loaded for inference, a checkpoint takes any teacher (as documented: load_from_checkpoint)
    restored = DistillationModule.load_from_checkpoint(checkpoint, student=small_net(), teacher=small_net())
    assert torch.equal(restored.teacher[0].weight, torch.load(teacher_file)["0.weight"])


def test_a_resume_keeps_its_teacher_network_and_stops_if_its_weights_changed(tmp_path: Path) -> None:
    teacher = small_net()
    checkpoint = interrupted(DistillationModule(small_net(), teacher), tmp_path, planned=2, done=1)
    assert torch.load(checkpoint, weights_only=True)["frozen_teacher"]["teacher_checkpoint"] is None
    trainer = fit(DistillationModule(small_net(), teacher), tmp_path, 2, checkpoint)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH

    with torch.no_grad():
        teacher[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="it recorded the teacher network passed to the module"):
        fit(DistillationModule(small_net(), teacher), tmp_path, 3, checkpoint)


def test_resuming_with_another_student_architecture_names_the_parameters(tmp_path: Path) -> None:
    checkpoint = interrupted(DistillationModule(small_net(hidden=16)), tmp_path, planned=2, done=1)
    message = (
        r"holds another student architecture than this module's Sequential: 5 of another shape "
        r"\['student.0.bias: checkpoint \(16,\) vs this module \(32,\)', 'student.0.weight: checkpoint "
        r"\(16, 8\) vs this module \(32, 8\)'.*Build the module with the student configuration"
    )
    with pytest.raises(ValueError, match=message):
        fit(DistillationModule(small_net(hidden=32)), tmp_path, 2, checkpoint)
    with pytest.raises(ValueError, match=message):
        DistillationModule.load_from_checkpoint(checkpoint, student=small_net(hidden=32))
