"""torch.compile'd student and teacher: hooked features are still captured and the loss is unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_kd import DistillationModule
from lightning_kd.callbacks import FeatureHooks
from lightning_kd.hooks import find_layer, uncompiled
from lightning_kd.losses import ATTerm, CrossEntropyTerm, FitNetTerm
from tests.helpers import RandomDataModule, make_trainer, small_net

BACKENDS = ["eager", "aot_eager"]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (no recompile limit reached through earlier tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def conv_net(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 4),
    )


def test_find_layer_looks_through_compile() -> None:
    net = small_net()
    compiled = torch.compile(net, backend="eager")
    assert uncompiled(compiled) is net and uncompiled(net) is net
    assert find_layer(compiled, "1", "student") is net[1]
    with pytest.raises(ValueError, match="Unknown student layer '_orig_mod.1'"):
        find_layer(compiled, "_orig_mod.1", "student")


def _at_by_hand(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    def attention(f: torch.Tensor) -> torch.Tensor:
        q = f.double().pow(2).mean(dim=1).flatten(1)
        return q / q.norm(dim=1, keepdim=True)

    return (attention(student) - attention(teacher)).pow(2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_models_give_hooked_features_and_losses_of_eager(backend: str) -> None:
    student, teacher = conv_net(4), conv_net(6)
    terms = [CrossEntropyTerm(), ATTerm("2", "2", weight=10.0), FitNetTerm("2", "2", weight=1.0)]
    batch = (torch.randn(8, 3, 5, 5), torch.randint(0, 4, (8,)))
    eager = DistillationModule(student, teacher, losses=terms)
    eager.build_terms(batch)
    compiled = DistillationModule(
        torch.compile(student, backend=backend), torch.compile(teacher, backend=backend), losses=terms
    )
    x = batch[0]
    expected_student = student[:3](x)  # the hooked layer "2" (ReLU) by direct eager calls
    expected_teacher = teacher[:3](x).detach()

    totals, grads = [], []
    for module in (compiled, eager):
        hooks = module.configure_callbacks()[0]
        assert isinstance(hooks, FeatureHooks)
        hooks.attach(module)
        outputs = module.step_outputs(batch)
        student_feature = outputs.student_features["2"]
        teacher_feature = outputs.teacher_features["2"]
        torch.testing.assert_close(student_feature, expected_student, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(teacher_feature, expected_teacher, rtol=1e-6, atol=1e-6)
        assert student_feature.requires_grad and not teacher_feature.requires_grad
        total, values = module.compute_loss(outputs)
        at = _at_by_hand(expected_student, expected_teacher)
        fitnet = (terms[2].regressor(expected_student).double() - expected_teacher.double()).pow(2).mean()
        torch.testing.assert_close(values["at"].double(), at, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(values["fitnet"].double(), fitnet, rtol=1e-5, atol=1e-8)
        student.zero_grad()
        total.backward()
        totals.append(total.detach())
        grads.append([p.grad.clone() for p in student.parameters()])
        hooks.detach()
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-6, atol=0)
    for compiled_grad, eager_grad in zip(*grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: DistillationModule, outputs: Any, *args: Any
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit_curve(how: str, backend: str | Callable = "aot_eager") -> tuple[list[float], DistillationModule]:
    """Loss per step of a 2-epoch FitNet fit.

    ``how``: "eager"; "wrapped" (``torch.compile(model)`` for student and teacher); "in_place"
    (``model.compile()``: same module, same parameter names); "lightning"
    (``trainer.fit(torch.compile(module))``: Lightning compiles the step methods); "option"
    (``DistillationModule(..., compile=...)``: teacher, student and terms in one compiled step).
    """
    pl.seed_everything(0, verbose=False)
    student, teacher = small_net(batchnorm=False), small_net(batchnorm=False)
    if how == "wrapped":
        student, teacher = torch.compile(student, backend=backend), torch.compile(teacher, backend=backend)
    elif how == "in_place":
        student.compile(backend=backend)
        teacher.compile(backend=backend)
    losses = [CrossEntropyTerm(), FitNetTerm("0", "0", weight=1.0)]
    options = {"backend": backend} if how == "option" else False
    module = DistillationModule(student, teacher, losses=losses, compile=options)
    recorder = RecordLoss()
    trainer = make_trainer(max_epochs=2, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(
        torch.compile(module, backend=backend) if how == "lightning" else module,
        datamodule=RandomDataModule(),
    )
    return recorder.losses, module


@pytest.mark.parametrize("how", ["wrapped", "in_place", "option"])
def test_compiled_models_give_the_eager_loss_curve(how: str) -> None:
    eager_curve, _ = _fit_curve("eager")
    counter = CompileCounterWithBackend("aot_eager")
    compiled_curve, module = _fit_curve(how, counter)
    assert counter.frame_count >= (1 if how == "option" else 2)  # the models went through the compiler
    assert len(compiled_curve) == 8 and len(set(eager_curve)) > 1
    torch.testing.assert_close(torch.tensor(compiled_curve), torch.tensor(eager_curve), rtol=1e-5, atol=0)
    assert module.feature_hooks is not None and not module.feature_hooks.attached  # removed in teardown
    assert isinstance(module.student, OptimizedModule) == (how == "wrapped")
    assert ("student._orig_mod.0.weight" in module.state_dict()) == (how == "wrapped")  # checkpoint keys


def test_lightning_compiled_module_gives_the_eager_loss_curve() -> None:
    """Works, but slow to trace: ``self.log`` recompiles per metric name (see the README)."""
    eager_curve, _ = _fit_curve("eager")
    compiled_curve, module = _fit_curve("lightning", backend="eager")
    assert len(compiled_curve) == 8
    torch.testing.assert_close(torch.tensor(compiled_curve), torch.tensor(eager_curve), rtol=1e-5, atol=0)
    assert module.feature_hooks is not None and not module.feature_hooks.attached


@pytest.mark.parametrize("bad", ["yes", 1, {1: "eager"}])
def test_compile_takes_a_bool_or_torch_compile_options(bad: Any) -> None:
    with pytest.raises(TypeError, match="compile must be True, False or a mapping of torch.compile options"):
        DistillationModule(small_net(), small_net(), compile=bad)
