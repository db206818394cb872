"""ConvNet2d: the layer names every method reads, their shapes, pre-activations, bad settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd.models import ConvNet2d

TEACHER = dict(widths=(32, 64, 64), depth=2, hidden=128)
STUDENT = dict(widths=(8, 16, 16), depth=1, hidden=32)
#: every layer the mnist_digits recipes hook
LAYERS = ["conv1", "conv2", "conv3", "conv1.bn", "conv2.bn", "conv3.bn", "embedding"]


def captured(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in LAYERS
    ]
    logits = model(x)
    for handle in handles:
        handle.remove()
    return logits, outputs


@pytest.mark.parametrize("settings", [TEACHER, STUDENT], ids=["teacher", "student"])
def test_stages_have_the_family_s_names_and_sizes(settings: dict) -> None:
    torch.manual_seed(0)
    model = ConvNet2d(**settings)
    c1, c2, c3 = settings["widths"]
    logits, outputs = captured(model, torch.randn(4, 1, 28, 28))
    assert logits.shape == (4, 10)
    for name, shape in {
        "conv1": (c1, 14, 14),
        "conv2": (c2, 7, 7),
        "conv3": (c3, 7, 7),
        "embedding": (settings["hidden"],),
    }.items():
        assert outputs[name].shape == (4, *shape), name
    for k in (1, 2, 3):
        pre, post = outputs[f"conv{k}.bn"], outputs[f"conv{k}"]
        assert pre.min() < 0  # the hook kept the pre-activation: the ReLU is not in place
        torch.testing.assert_close(post, pre.clamp_min(0))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 * settings["depth"]
    assert [c.stride for c in convs if c.stride != (1, 1)] == [(2, 2), (2, 2)]


def test_the_student_is_much_smaller_than_the_teacher() -> None:
    sizes = [sum(p.numel() for p in ConvNet2d(**s).parameters()) for s in (TEACHER, STUDENT)]
    assert sizes == [541994, 29058]


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"widths": (8, 16)}, "widths needs 3 channel counts, got \\[8, 16\\]"), ({"depth": 0}, "depth=0")],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConvNet2d(**settings)
