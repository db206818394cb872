"""Multi-stage distillation (DistillationStages): an init stage, resume inside it, bad stages."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_kd import (
    CrossEntropyTerm,
    DistillationModule,
    DistillationStages,
    FitNetTerm,
    KDTerm,
    Stage,
)
from tests.helpers import RandomDataModule, make_trainer, small_net


def _hint_module() -> DistillationModule:
    pl.seed_everything(0, verbose=False)
    losses = [CrossEntropyTerm(weight=1.0), KDTerm(weight=0.5), FitNetTerm("2", "2", weight=100.0)]
    return DistillationModule(small_net(hidden=16), small_net(hidden=32), losses=losses)


def _stages() -> DistillationStages:
    return DistillationStages(
        [Stage(epochs=2, weights={"fitnet": 1.0}, trainable=["loss_terms.fitnet"]), Stage(epochs=None)]
    )


class Snapshots(pl.Callback):
    """Student state and term weights at the end of every epoch."""

    def __init__(self) -> None:
        self.students: list[dict[str, torch.Tensor]] = []
        self.regressors: list[torch.Tensor] = []
        self.weights: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.students.append(copy.deepcopy(pl_module.student.state_dict()))
        self.regressors.append(pl_module.loss_terms["fitnet"].regressor.weight.detach().clone())
        self.weights.append({name: term.weight for name, term in pl_module.loss_terms.items()})


def test_init_stage_trains_only_the_adapter_then_the_student() -> None:
    module = _hint_module()
    initial = copy.deepcopy(module.student.state_dict())  # BatchNorm statistics included
    snapshots = Snapshots()
    trainer = make_trainer(max_epochs=4, callbacks=[_stages(), snapshots])
    trainer.fit(module, datamodule=RandomDataModule())
    assert snapshots.weights[0] == {"ce": 0.0, "kd": 0.0, "fitnet": 1.0}
    assert snapshots.weights[3] == {"ce": 1.0, "kd": 0.5, "fitnet": 100.0}
    for epoch in (0, 1):  # the student, its BatchNorm statistics too, is untouched in the init stage
        for name, tensor in initial.items():
            assert torch.equal(snapshots.students[epoch][name], tensor), (epoch, name)
    assert not torch.equal(snapshots.regressors[0], snapshots.regressors[1])  # the regressor learns
    assert not torch.equal(snapshots.students[3]["0.weight"], initial["0.weight"])  # then the student does
    # ... with its BatchNorm back in train mode: the running statistics move again
    assert not torch.equal(snapshots.students[3]["1.running_mean"], snapshots.students[2]["1.running_mean"])
    assert trainer.callback_metrics["kd/stage"].item() == 1.0


def test_resume_inside_the_init_stage_reapplies_it(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="stage0", enable_version_counter=False)
    make_trainer(max_epochs=1, callbacks=[_stages(), checkpoint], enable_checkpointing=True).fit(
        _hint_module(), datamodule=RandomDataModule()
    )
    module = _hint_module()
    snapshots = Snapshots()
    with pytest.warns(UserWarning, match="Resumed with another run length"):  # the LR schedule re-plans
        make_trainer(max_epochs=3, callbacks=[_stages(), snapshots]).fit(
            module, datamodule=RandomDataModule(), ckpt_path=tmp_path / "stage0.ckpt"
        )
    assert snapshots.weights == [
        {"ce": 0.0, "kd": 0.0, "fitnet": 1.0},
        {"ce": 1.0, "kd": 0.5, "fitnet": 100.0},
    ]


def test_bad_stages_are_rejected() -> None:
    with pytest.raises(ValueError, match="Stage 0 needs a positive number of epochs"):
        DistillationStages([Stage(epochs=None), Stage(epochs=None)])
    for stages, message in [
        ([Stage(epochs=1, weights={"hint": 1.0}), Stage()], r"unknown loss terms \['hint'\]"),
        ([Stage(epochs=1, trainable=["loss_terms.hint"]), Stage()], "no parameter under 'loss_terms.hint'"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_trainer(callbacks=[DistillationStages(stages)]).fit(
                _hint_module(), datamodule=RandomDataModule()
            )
