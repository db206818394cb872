"""FitNets hint: regressors for each feature shape, built before the optimizer, saved and restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_kd import CrossEntropyTerm, DistillationModule, KDTerm
from lightning_kd.losses import FitNetTerm, StepOutputs, make_regressor
from lightning_kd.losses.functional import fitnet_loss
from tests.helpers import RandomDataModule, make_trainer, small_net


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        ((2, 16), (2, 32)),
        ((2, 8, 40), (2, 64, 40)),
        ((2, 16, 16, 16), (2, 32, 8, 8)),  # twice the size: stride-2 conv
        ((2, 16, 4, 4), (2, 32, 8, 8)),  # half the size: transposed conv
        ((2, 16, 10, 10), (2, 32, 8, 8)),  # larger: 3x3 valid conv
        ((2, 16, 8, 8), (2, 32, 8, 8)),  # equal: 1x1 conv
    ],
)
def test_regressor_maps_student_shape_onto_teacher_shape(student: tuple, teacher: tuple) -> None:
    regressor = make_regressor(student, teacher)
    assert regressor(torch.randn(student)).shape == teacher


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        ((2, 16, 3, 3), (2, 32, 8, 8), r"\(2, 16, 3, 3\).*\(2, 32, 8, 8\)"),
        ((2, 16, 30), (2, 16, 40), r"\(2, 16, 30\).*\(2, 16, 40\).*length"),
        ((2, 16), (2, 32, 8, 8), r"\(2, 16\).*\(2, 32, 8, 8\)"),
    ],
)
def test_unbridgeable_shapes_name_both(student: tuple, teacher: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_regressor(student, teacher)


def test_fitnet_loss_is_the_mean_squared_error() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert fitnet_loss(s, t).item() == pytest.approx((1 + 4 + 4 + 9) / 4)
    with pytest.raises(ValueError, match="regressor must map"):
        fitnet_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_term_gradients_reach_student_and_regressor_not_teacher() -> None:
    term = FitNetTerm("s", "t", regressor=nn.Linear(4, 6))
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 6, requires_grad=True)
    outputs = StepOutputs(torch.zeros(3, 2), student_features={"s": student}, teacher_features={"t": teacher})
    term(outputs).backward()
    assert student.grad is not None and term.regressor.weight.grad is not None
    assert teacher.grad is None


def _fitnet_module() -> DistillationModule:
    hint = FitNetTerm(student_layer="2", teacher_layer="2")  # after the ReLU: 16 -> 32 features
    losses = [CrossEntropyTerm(weight=0.1), KDTerm(weight=0.9), hint]
    return DistillationModule(small_net(hidden=16), small_net(hidden=32), losses=losses)


def test_regressor_is_built_before_the_optimizer_and_trained(tmp_path: Path) -> None:
    module = _fitnet_module()
    assert module.loss_terms["fitnet"].regressor is None
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="fitnet", enable_version_counter=False)
    trainer = make_trainer(max_epochs=2, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, datamodule=RandomDataModule())
    regressor = module.loss_terms["fitnet"].regressor
    assert isinstance(regressor, nn.Linear) and regressor.weight.shape == (32, 16)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in regressor.parameters()} <= optimized
    assert "train/loss_fitnet" in trainer.callback_metrics

    # a resumed fit rebuilds the regressor in setup, then loads its trained weights
    resumed = _fitnet_module()
    resumed.teacher.load_state_dict(module.teacher.state_dict())  # a resume needs the same teacher
    make_trainer(max_epochs=2).fit(resumed, datamodule=RandomDataModule(), ckpt_path=tmp_path / "fitnet.ckpt")
    torch.testing.assert_close(resumed.loss_terms["fitnet"].regressor.weight, regressor.weight)

    # outside a Trainer, built by hand on a batch, then loaded as Lightning does
    restored = _fitnet_module()
    restored.build_terms((torch.randn(4, 8), torch.zeros(4, dtype=torch.long)))
    saved = torch.load(tmp_path / "fitnet.ckpt", weights_only=True)
    restored.on_load_checkpoint(saved)
    restored.load_state_dict(saved["state_dict"])
    torch.testing.assert_close(restored.loss_terms["fitnet"].regressor.weight, regressor.weight)


def test_load_from_checkpoint_skips_unbuilt_adapters_with_a_warning(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="fitnet", enable_version_counter=False)
    make_trainer(callbacks=[checkpoint], enable_checkpointing=True).fit(
        _fitnet_module(), datamodule=RandomDataModule()
    )
    with pytest.warns(UserWarning, match=r"Adapters of loss terms \['fitnet'\] were not restored"):
        loaded = DistillationModule.load_from_checkpoint(
            tmp_path / "fitnet.ckpt",
            student=small_net(hidden=16),
            teacher=small_net(hidden=32),
            losses=list(_fitnet_module().loss_terms.values()),
        )
    assert loaded.loss_terms["fitnet"].regressor is None
    assert loaded(torch.randn(3, 8)).shape == (3, 4)  # the student is restored and usable
