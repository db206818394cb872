"""The CRD-benchmark CIFAR models: shapes, parameter counts, documented hook paths, registry."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

from lightning_kd.models import CIFAR_MODELS, create_cifar_model
from lightning_kd.models.cifar import MobileNetV2, ShuffleNetV1, ShuffleNetV2

# parameter counts (100 classes) as reported for the benchmark, to 1%
REPORTED_MILLIONS = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet20": 0.28,
    "resnet56": 0.86,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "mobilenetv2": 0.81,
    "shufflenet_v1": 0.95,
    "shufflenet_v2": 1.36,
}


# exact counts of HobbitLong/RepDistiller's models/ (100 classes)
EXACT = {
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet20": 278_324,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet50": 23_705_252,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenet_v1": 949_258,
    "shufflenet_v2": 1_355_528,
}


# (feature_paths, preact_feature_paths, shapes without the batch dimension) for a 32x32 input
_RESNET_SMALL = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]


_RESNET_X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]


_WRN_2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]


_VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]


_WRN_FEATS = ("conv1", "block1", "block2", "block3", "flatten")


_WRN_PRE = ("conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1", "flatten")


def _resnet(last: int) -> tuple[str, ...]:
    return ("relu", *(f"layer{i}.{last}.merge" for i in (1, 2, 3)), "flatten")


_RESNET_FEATS = ("relu", "layer1", "layer2", "layer3", "flatten")


_VGG_FEATS = ("relu0", "relu1", "relu2", "relu3", "relu4", "flatten")


_VGG_PRE = ("relu0", "block1", "block2", "block3", "block4", "flatten")


_MBV2 = ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "flatten")


_SHUFFLE_PRE = ("relu", "layer1.3.merge", "layer2.7.merge", "layer3.3.merge", "flatten")


FEATURES = {
    "resnet8x4": (_RESNET_FEATS, _resnet(0), _RESNET_X4),
    "resnet32x4": (_RESNET_FEATS, _resnet(4), _RESNET_X4),
    "resnet20": (_RESNET_FEATS, _resnet(2), _RESNET_SMALL),
    "resnet56": (_RESNET_FEATS, _resnet(8), _RESNET_SMALL),
    "resnet110": (_RESNET_FEATS, _resnet(17), _RESNET_SMALL),
    "resnet50": (
        ("relu", "layer1", "layer2", "layer3", "layer4", "flatten"),
        ("relu", "layer1.2.merge", "layer2.3.merge", "layer3.5.merge", "layer4.2.merge", "flatten"),
        [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)],
    ),
    "wrn_16_2": (_WRN_FEATS, _WRN_PRE, _WRN_2),
    "wrn_40_2": (_WRN_FEATS, _WRN_PRE, _WRN_2),
    "wrn_40_1": (_WRN_FEATS, _WRN_PRE, _RESNET_SMALL),
    "vgg8": (_VGG_FEATS, _VGG_PRE, _VGG),
    "vgg13": (_VGG_FEATS, _VGG_PRE, _VGG),
    "mobilenetv2": (_MBV2, _MBV2, [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)]),
    "shufflenet_v1": (
        _RESNET_FEATS,
        _SHUFFLE_PRE,
        [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)],
    ),
    "shufflenet_v2": (
        _RESNET_FEATS,
        _SHUFFLE_PRE,
        [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)],
    ),
}


# a parameter name of the benchmark's state dict per model (its checkpoints load unchanged)
BENCHMARK_KEYS = {
    "resnet8x4": "layer1.0.downsample.0.weight",
    "resnet50": "layer1.0.shortcut.0.weight",
    "wrn_40_2": "block1.layer.0.convShortcut.weight",
    "vgg8": "block0.0.bias",
    "mobilenetv2": "classifier.0.weight",
    "shufflenet_v1": "linear.weight",
    "shufflenet_v2": "layer1.0.conv5.weight",
}


NAMES = sorted(CIFAR_MODELS)


@functools.cache
def _model(name: str) -> nn.Module:
    """One eval-mode instance per architecture, shared by the read-only tests."""
    torch.manual_seed(0)
    return CIFAR_MODELS[name](100).eval()


def test_every_model_is_covered() -> None:
    assert set(CIFAR_MODELS) == set(EXACT) == set(FEATURES)
    assert set(REPORTED_MILLIONS) <= set(CIFAR_MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_logits(name: str) -> None:
    model = _model(name)
    assert model.num_classes == 100
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "mobilenetv2", "shufflenet_v2"])
def test_num_classes(name: str) -> None:
    model = create_cifar_model(name, num_classes=10).eval()
    assert model.num_classes == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name: str) -> None:
    count = sum(p.numel() for p in _model(name).parameters())
    assert count == EXACT[name]
    if name in REPORTED_MILLIONS:
        assert count / 1e6 == pytest.approx(REPORTED_MILLIONS[name], rel=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_feature_paths(name: str) -> None:
    model = _model(name)
    feats, preacts, shapes = FEATURES[name]
    assert model.feature_paths == feats
    assert model.preact_feature_paths == preacts
    documented = (inspect.getdoc(CIFAR_MODELS[name]) or "") + (inspect.getdoc(type(model)) or "")
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    snapshots: dict[str, torch.Tensor] = {}

    def capture(path: str):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            captured[path] = output
            snapshots[path] = output.detach().clone()

        return hook

    handles = []
    for path in dict.fromkeys(feats + preacts):
        assert path in modules, f"{name}: no submodule {path!r}"
        assert path in documented, f"{name}: {path!r} is not in the docstrings"
        handles.append(modules[path].register_forward_hook(capture(path)))
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    finally:
        for handle in handles:
            handle.remove()
    for paths in (feats, preacts):
        assert [tuple(captured[p].shape[1:]) for p in paths] == [tuple(s) for s in shapes]
    for path, tensor in captured.items():  # nothing overwrote a hooked output (no in-place ops)
        assert torch.equal(tensor, snapshots[path]), f"{name}: output of {path!r} was modified in place"
    for feat, preact in zip(feats, preacts, strict=True):
        if feat != preact:  # a pre-activation feature (BN output or residual sum): some entries < 0
            assert (captured[preact] < 0).any()
            assert not torch.equal(captured[preact], captured[feat])


@pytest.mark.parametrize("name", sorted(BENCHMARK_KEYS))
def test_benchmark_parameter_names(name: str) -> None:
    assert BENCHMARK_KEYS[name] in _model(name).state_dict()


def test_resnet_preact_relu_gives_activation() -> None:
    model = _model("resnet20")
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[p].register_forward_hook(lambda m, i, o, p=p: captured.__setitem__(p, o))
        for p in ("layer2", "layer2.2.merge")
    ]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(captured["layer2"], torch.relu(captured["layer2.2.merge"]))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "shufflenet_v2"])
def test_backward(name: str) -> None:
    model = create_cifar_model(name).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_benchmark_aliases() -> None:
    assert isinstance(create_cifar_model("mobile_half"), MobileNetV2)
    assert isinstance(create_cifar_model("ShuffleV1"), ShuffleNetV1)
    assert isinstance(create_cifar_model("ShuffleV2", num_classes=10).linear, nn.Linear)
    assert isinstance(create_cifar_model("shufflenet_v2"), ShuffleNetV2)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="Unknown CIFAR model 'resnet18'") as info:
        create_cifar_model("resnet18")
    for name in ("resnet8x4", "wrn_40_2", "mobilenetv2", "shufflenet_v1"):
        assert name in str(info.value)
