"""The CIFAR-100 teachers and students of the CRD benchmark (Tian et al., ICLR 2020).

Re-implementations of the models in HobbitLong/RepDistiller ``models/`` with the same layers,
widths, depths, BatchNorms, shortcuts, classifiers and initialisation, so parameter counts
match the benchmark, and with the same parameter names, so its state dicts load unchanged.
Every ``forward(x)`` returns logits only; the benchmark's intermediate features
(``forward(x, is_feat=True, preact=...)``) are outputs of named submodules, listed in each
model's docstring and in its ``feature_paths`` / ``preact_feature_paths`` attributes, for use
as hook paths (``student_layers`` / ``teacher_layers``).

Build a model by name with :func:`create_cifar_model` (``"resnet32x4"``, ``"wrn_40_2"``, ...;
the benchmark's own spellings ``"ShuffleV1"``, ``"ShuffleV2"``, ``"mobile_half"``,
``"ResNet50"`` are accepted too).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_kd.models.cifar.mobilenetv2 import MobileNetV2, mobilenetv2
from lightning_kd.models.cifar.resnet import (
    ResNet,
    ResNetFourStage,
    resnet8x4,
    resnet20,
    resnet32x4,
    resnet50,
    resnet56,
    resnet110,
)
from lightning_kd.models.cifar.shufflenetv1 import ShuffleNetV1, shufflenet_v1
from lightning_kd.models.cifar.shufflenetv2 import ShuffleNetV2, shufflenet_v2
from lightning_kd.models.cifar.vgg import VGG, vgg8, vgg13
from lightning_kd.models.cifar.wrn import WideResNet, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "CIFAR_MODELS",
    "MobileNetV2",
    "ResNet",
    "ResNetFourStage",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "VGG",
    "WideResNet",
    "create_cifar_model",
    "mobilenetv2",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet50",
    "resnet56",
    "resnet110",
    "shufflenet_v1",
    "shufflenet_v2",
    "vgg8",
    "vgg13",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]

#: factories by name; each takes ``num_classes`` and returns a fresh, randomly initialised model.
CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet50": resnet50,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
    "mobilenetv2": mobilenetv2,
    "shufflenet_v1": shufflenet_v1,
    "shufflenet_v2": shufflenet_v2,
}

#: the benchmark's ``model_dict`` names that differ from ours.
_BENCHMARK_ALIASES = {
    "mobile_half": "mobilenetv2",
    "ShuffleV1": "shufflenet_v1",
    "ShuffleV2": "shufflenet_v2",
    "ResNet50": "resnet50",
}


def create_cifar_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build a CRD-benchmark CIFAR model by name, e.g. ``create_cifar_model("resnet32x4")``.

    Usable from YAML: ``class_path: lightning_kd.models.create_cifar_model`` with
    ``init_args: {name: resnet8x4, num_classes: 100}``.

    Args:
        name: a key of :data:`CIFAR_MODELS`, or one of the benchmark's spellings
            ``mobile_half``, ``ShuffleV1``, ``ShuffleV2``, ``ResNet50``.
        num_classes: outputs of the classifier.

    Raises:
        ValueError: unknown ``name``; the message lists the valid names.
    """
    factory = CIFAR_MODELS.get(_BENCHMARK_ALIASES.get(name, name))
    if factory is None:
        raise ValueError(
            f"Unknown CIFAR model {name!r}. Valid names: {sorted(CIFAR_MODELS)} "
            f"(the benchmark's names {sorted(_BENCHMARK_ALIASES)} are accepted too)."
        )
    return factory(num_classes)
