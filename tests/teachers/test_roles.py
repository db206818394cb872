"""Teacher roles: frozen, co-trained and mean (EMA) teachers; a teacher without gradients keeps no graph."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import CrossEntropyTerm, DistillationModule, KDTerm, StepOutputs
from lightning_kd.losses import FitNetTerm
from lightning_kd.teachers import TeacherOutputCache
from lightning_kd.teachers.roles import (
    CachedTeacher,
    CoTrainedTeacher,
    EMATeacher,
    FrozenTeacher,
    teacher_role,
)
from tests.helpers import NUM_CLASSES, NUM_FEATURES, RandomDataModule, make_trainer, small_net


class RecordStudent(pl.Callback):
    """The student's state after every optimizer step (on_train_batch_end runs after the step)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.states.append({k: v.detach().clone() for k, v in module.student.state_dict().items()})


def _ema_module(decay: float = 0.9) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        small_net(),
        teacher_mode="ema",
        ema_decay=decay,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        cosine_decay=False,
    )


def test_teacher_is_the_hand_computed_moving_average_after_k_steps() -> None:
    decay = 0.9
    module = _ema_module(decay)
    initial = {k: v.detach().clone().double() for k, v in module.student.state_dict().items()}
    for name, value in module.teacher.state_dict().items():  # starts as the student's copy
        assert torch.equal(value, module.student.state_dict()[name])
    recorder = RecordStudent()
    make_trainer(max_epochs=1, callbacks=[recorder], limit_val_batches=0).fit(
        module, datamodule=RandomDataModule(n=64, batch_size=16)
    )
    assert len(recorder.states) == 4

    expected = dict(initial)
    for state in recorder.states:
        for name, value in state.items():
            if value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value.double()
            else:
                expected[name] = value.double()
    teacher = module.teacher.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(teacher[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    # the average differs from the student it follows (the test can fail)
    assert not torch.allclose(teacher["0.weight"], module.student.state_dict()["0.weight"])
    assert teacher["1.num_batches_tracked"] == 4


def test_ema_teacher_gets_no_gradient_and_stays_in_eval_mode() -> None:
    module = _ema_module()
    assert all(not p.requires_grad for p in module.teacher.parameters())
    module.train()
    assert not module.teacher.training and module.student.training
    outputs = module.step_outputs((torch.randn(8, 8), torch.randint(0, 4, (8,))))
    assert outputs.teacher_logits is not None and not outputs.teacher_logits.requires_grad
    assert all(name.startswith("teacher.") for name in module._ddp_params_and_buffers_to_ignore)
    assert len(module._ddp_params_and_buffers_to_ignore) == len(module.teacher.state_dict())


def _ordered_loader() -> DataLoader:
    data = RandomDataModule(n=64)
    return DataLoader(TensorDataset(data.x, data.y), batch_size=16)


def test_resume_continues_the_average(tmp_path: Path) -> None:
    straight = _ema_module()
    make_trainer(max_epochs=2).fit(straight, train_dataloaders=_ordered_loader())

    first = _ema_module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="ema", enable_version_counter=False)
    make_trainer(max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(
        first, train_dataloaders=_ordered_loader()
    )
    saved = torch.load(tmp_path / "ema.ckpt", weights_only=True)["state_dict"]
    assert any(key.startswith("teacher.") for key in saved), "the EMA teacher is state: it must be saved"

    resumed = DistillationModule(
        small_net(),
        teacher_mode="ema",
        ema_decay=0.9,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        cosine_decay=False,
    )
    make_trainer(max_epochs=2).fit(
        resumed, train_dataloaders=_ordered_loader(), ckpt_path=tmp_path / "ema.ckpt"
    )
    for name, value in straight.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[name], value, msg=name)


def test_bad_ema_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="leave `teacher`"):
        DistillationModule(small_net(), small_net(), teacher_mode="ema")
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        DistillationModule(small_net(), teacher_mode="ema", ema_decay=1.0)


def test_update_follows_tensors_that_a_cast_replaced() -> None:
    """``.double()`` replaces the buffers: the update must average the new ones, not stale copies."""
    module = DistillationModule(small_net(), teacher_mode="ema", ema_decay=0.5)
    module.update_ema_teacher()  # pairs the tensors
    module.double()
    student_bn, teacher_bn = module.student[1], module.teacher[1]
    with torch.no_grad():
        student_bn.running_mean.fill_(2.0)
        teacher_bn.running_mean.fill_(0.0)
        student_bn.weight.fill_(4.0)
        teacher_bn.weight.fill_(0.0)
    student_bn.num_batches_tracked.fill_(7)
    module.update_ema_teacher()
    assert teacher_bn.running_mean.dtype == torch.float64
    assert torch.equal(teacher_bn.running_mean, torch.full_like(teacher_bn.running_mean, 1.0))
    assert torch.equal(teacher_bn.weight, torch.full_like(teacher_bn.weight, 2.0))
    assert int(teacher_bn.num_batches_tracked) == 7


class TeacherModeSpy(pl.Callback):
    def __init__(self) -> None:
        self.teacher_training_flags: list[bool] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.teacher_training_flags.append(pl_module.teacher.training)


def test_frozen_teacher_is_bit_identical_and_stays_in_eval_mode() -> None:
    teacher = small_net()
    module = DistillationModule(small_net(), teacher)
    before = copy.deepcopy(teacher.state_dict())  # BatchNorm running stats included
    spy = TeacherModeSpy()
    trainer = make_trainer(max_epochs=3, callbacks=[spy], num_sanity_val_steps=2)
    trainer.fit(module, datamodule=RandomDataModule())
    assert len(spy.teacher_training_flags) == 12 and not any(
        spy.teacher_training_flags
    )  # after each validation too
    assert module.student.training and not module.teacher.training
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    assert optimizer_params == {id(p) for p in module.student.parameters()}


def test_trainable_teacher_is_co_trained_with_its_own_loss() -> None:
    teacher = small_net()
    module = DistillationModule(small_net(), teacher, teacher_mode="trainable")
    assert list(module.loss_terms) == ["ce", "kd", "teacher_ce"]
    before = copy.deepcopy(teacher.state_dict())
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, datamodule=RandomDataModule())
    assert module.teacher.training
    assert not torch.equal(teacher[0].weight, before["0.weight"])
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in teacher.parameters()} <= optimizer_params
    assert "train/loss_teacher_ce" in trainer.callback_metrics


def test_kd_gradient_does_not_reach_a_co_trained_teacher() -> None:
    teacher = small_net(batchnorm=False)
    module = DistillationModule(small_net(batchnorm=False), teacher, teacher_mode="trainable")
    batch = (torch.randn(6, 8), torch.randint(0, NUM_CLASSES, (6,)))
    outputs = module.step_outputs(batch)
    module.loss_terms["kd"](outputs).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())


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


def test_teacher_mode_selects_a_role_that_answers_every_paradigm_question(tmp_path: Path) -> None:
    # (gradients, weights restored from outside, DDP ignores it, in checkpoints by default)
    expected = {
        "frozen": (FrozenTeacher, False, True, True, False),
        "trainable": (CoTrainedTeacher, True, False, False, True),
        "ema": (EMATeacher, False, False, True, True),
    }
    for mode, (role_class, gradients, restored, ignored, saved) in expected.items():
        role = teacher_role(mode)
        assert type(role) is role_class and role.mode == mode
        assert role.receives_gradients is gradients and role.restored_from_source is restored
        assert role.ddp_ignores_teacher() is ignored and role.in_checkpoint(save_teacher=False) is saved
        assert role.in_checkpoint(save_teacher=True)
    cache = TeacherOutputCache(tmp_path / "cache")
    assert isinstance(teacher_role("frozen", cache=cache, teacher=small_net()), CachedTeacher)
    with pytest.raises(ValueError, match="teacher_mode must be one of"):
        teacher_role("online")
    with pytest.raises(ValueError, match="teacher_cache stores a fixed teacher's outputs"):
        teacher_role("trainable", cache=cache, teacher=small_net())
    with pytest.raises(ValueError, match="teacher_cache stores a fixed teacher's outputs"):
        teacher_role("frozen", cache=cache, teacher=None)


def test_module_runs_a_teacher_the_way_its_role_says() -> None:
    batch = (torch.randn(4, NUM_FEATURES), torch.randint(0, NUM_CLASSES, (4,)))
    frozen = DistillationModule(small_net(), small_net())
    assert not frozen.teacher_forward(batch[0]).requires_grad
    trainable = DistillationModule(small_net(), small_net(), teacher_mode="trainable")
    assert trainable.teacher_forward(batch[0]).requires_grad
    assert all(p.requires_grad for p in trainable.teacher.parameters())
    assert not any(p.requires_grad for p in frozen.teacher.parameters())
    ema = DistillationModule(small_net(), teacher_mode="ema")
    assert ema.teacher is not ema.student and not any(p.requires_grad for p in ema.teacher.parameters())
