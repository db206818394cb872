"""bf16-mixed vs 32-true on CPU: the same short KD fit gives the same loss curve within bf16 tolerance.

Under ``bf16-mixed`` the models run in bfloat16 (autocast), the frozen teacher under ``no_grad``,
and every loss term in float32 (``_float32_math`` in ``lightning_kd.losses.functional``).
Tolerance: rtol 1e-2 per step over 8 steps (bfloat16 keeps 8 mantissa bits, ~4e-3 relative per
rounding; measured max 6e-4). ``16-mixed`` (float16 AMP) is not supported on CPU: Lightning warns
and uses ``bf16-mixed`` instead.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_kd import DistillationModule
from lightning_kd.losses import StepOutputs
from tests.helpers import RandomDataModule, make_trainer, small_net


class RecordingModule(DistillationModule):
    """Records the dtypes that reach the loss terms and what each term returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logit_dtypes: set[torch.dtype] = set()
        self.term_dtypes: set[torch.dtype] = set()
        self.losses: list[float] = []

    def compute_loss(self, outputs: StepOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        total, values = super().compute_loss(outputs)
        if self.training:
            self.logit_dtypes |= {outputs.student_logits.dtype, outputs.teacher_logits.dtype}
            self.term_dtypes |= {value.dtype for value in values.values()}
            self.losses.append(float(total.detach()))
        return total, values


class TeacherSpy:
    """A forward hook on the teacher: was autograd on, and in which dtype did it answer?"""

    def __init__(self, teacher: nn.Module) -> None:
        self.grad_enabled: set[bool] = set()
        self.dtypes: set[torch.dtype] = set()
        teacher.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.grad_enabled.add(torch.is_grad_enabled())
        self.dtypes.add(output.dtype)


def fit(precision: str) -> tuple[RecordingModule, TeacherSpy]:
    pl.seed_everything(0, verbose=False)
    teacher = small_net(batchnorm=False)
    module = RecordingModule(small_net(batchnorm=False), teacher)
    spy = TeacherSpy(teacher)
    make_trainer(max_epochs=2, precision=precision, limit_val_batches=0).fit(
        module, datamodule=RandomDataModule()
    )
    return module, spy


def test_bf16_mixed_loss_curve_matches_float32() -> None:
    full, full_spy = fit("32-true")
    mixed, mixed_spy = fit("bf16-mixed")
    assert full.logit_dtypes == {torch.float32}
    assert mixed.logit_dtypes == {torch.bfloat16}  # the models really ran in bf16
    assert full.term_dtypes == mixed.term_dtypes == {torch.float32}  # loss math in float32
    assert mixed_spy.grad_enabled == full_spy.grad_enabled == {False}  # teacher under no_grad
    assert mixed_spy.dtypes == {torch.bfloat16}
    assert len(mixed.losses) == len(full.losses) == 8 and len(set(full.losses)) > 1
    torch.testing.assert_close(torch.tensor(mixed.losses), torch.tensor(full.losses), rtol=1e-2, atol=0)
    assert mixed.losses != full.losses  # bf16 did change the arithmetic


def test_16_mixed_on_cpu_falls_back_to_bf16() -> None:
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = make_trainer(precision="16-mixed")
    assert trainer.precision == "bf16-mixed"
