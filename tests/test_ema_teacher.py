"""Mean teacher (teacher_mode="ema"): the update rule, no gradients, checkpoints and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import RandomDataModule, make_trainer, small_net
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_kd import DistillationModule


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
