"""FeatureHooks: the right tensors, cleared every step, removed at teardown, clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_kd import DistillationModule, FeatureHooks, LossTerm, StepOutputs
from lightning_kd.models import ConvNet1d, timm_model
from tests.helpers import NUM_FEATURES, Pair, RandomDataModule, make_trainer, small_net


def test_hooks_capture_the_outputs_of_the_named_layers() -> None:
    student, teacher = small_net(), ConvNet1d(length=NUM_FEATURES, num_classes=4)
    hooks = FeatureHooks(student_layers=["1", "2"], teacher_layers=["conv2.0", "embedding"])
    hooks.attach(Pair(student, teacher).eval())
    x = torch.randn(5, NUM_FEATURES)
    student(x)
    teacher(x.unsqueeze(1))

    expected_bn = student[1](student[0](x))
    torch.testing.assert_close(hooks.features["student"]["1"], expected_bn)
    torch.testing.assert_close(hooks.features["student"]["2"], torch.relu(expected_bn))
    conv2_out = teacher.conv2[0](teacher.conv1(x.unsqueeze(1)))
    torch.testing.assert_close(hooks.features["teacher"]["conv2.0"], conv2_out)
    assert hooks.features["teacher"]["embedding"].shape == (5, 128)

    hooks.detach()
    assert hooks.features == {"student": {}, "teacher": {}}
    assert all(not m._forward_hooks for m in student.modules())
    assert all(not m._forward_hooks for m in teacher.modules())


def test_layers_on_a_missing_teacher_are_an_error() -> None:
    with pytest.raises(ValueError, match="there is no teacher"):
        FeatureHooks(teacher_layers=["0"]).attach(Pair(small_net()))


class FeatureMSE(LossTerm):
    """A test term that reads hooked features and records what it saw."""

    def __init__(self) -> None:
        super().__init__("feat", weight=0.5)
        self.batch_sizes: list[int] = []
        self.stale: list[bool] = []
        self.last_seen: dict[str, Tensor] = {}

    @property
    def student_layers(self) -> tuple[str, ...]:
        return ("2",)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return ("2",)

    def forward(self, outputs: StepOutputs) -> Tensor:
        s, t = outputs.student_features["2"], outputs.teacher_features["2"]
        self.batch_sizes.append(s.shape[0])
        # a feature of this step belongs to this batch: same batch size as the logits
        self.stale.append(s.shape[0] != outputs.student_logits.shape[0])
        assert s.requires_grad and not t.requires_grad
        return torch.mean((s - t) ** 2)


def test_module_hooks_the_layers_its_terms_declare_and_clears_them() -> None:
    from lightning_kd import CrossEntropyTerm

    term = FeatureMSE()
    module = DistillationModule(small_net(), small_net(), losses=[CrossEntropyTerm(), term])
    trainer = make_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(module, datamodule=RandomDataModule(n=40, batch_size=16))  # batches of 16, 16, 8
    assert term.batch_sizes == [16, 16, 8]
    assert not any(term.stale)
    hooks = module.feature_hooks
    assert isinstance(hooks, FeatureHooks)
    assert hooks.features == {"student": {}, "teacher": {}}  # nothing kept between steps
    assert all(not m._forward_hooks for m in module.modules())  # removed at teardown
    assert "train/loss_feat" in trainer.callback_metrics


def test_unknown_layer_of_a_term_stops_the_fit_before_training() -> None:
    class BadTerm(FeatureMSE):
        @property
        def student_layers(self) -> tuple[str, ...]:
            return ("7",)

    from lightning_kd import CrossEntropyTerm

    module = DistillationModule(small_net(), small_net(), losses=[CrossEntropyTerm(), BadTerm()])
    with pytest.raises(ValueError, match="Unknown student layer '7'"):
        make_trainer().fit(module, datamodule=RandomDataModule())
    assert module.global_step == 0


def test_hooks_work_on_a_timm_model() -> None:
    model = timm_model("test_resnet", num_classes=4, in_chans=1)
    hooks = FeatureHooks(student_layers=["layer1.0.conv1", "layer2"])
    hooks.attach(Pair(model).eval())
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 4)
    features: dict[str, Any] = hooks.features["student"]
    assert set(features) == {"layer1.0.conv1", "layer2"}
    assert features["layer2"].shape[0] == 2 and features["layer2"].dim() == 4
    hooks.detach()
