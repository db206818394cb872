"""VGG with BatchNorm for CIFAR, as in the CRD benchmark (``vgg8``, ``vgg13``).

Reproduces ``models/vgg.py`` of HobbitLong/RepDistiller, whose ``model_dict`` maps ``vgg8`` and
``vgg13`` to the BatchNorm variants ``vgg8_bn`` / ``vgg13_bn``: five convolutional blocks, no
fully connected layers but the classifier. Parameter and buffer names are the benchmark's
(``block0.0.weight``, ``classifier.weight``, ...), so its state dicts load unchanged. The
activations after the blocks are modules ``relu0`` ... ``relu4`` (the benchmark applies
``F.relu``), and no ReLU is in place.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_kd.models.cifar._layers import init_weights

__all__ = ["VGG", "VGG_CONFIGS", "vgg8", "vgg13"]

#: convolution widths of the five blocks, by depth (8 = the benchmark's configuration "S").
VGG_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _make_block(widths: Sequence[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """``[conv3x3 (with bias) - BN - ReLU] * len(widths)`` without the last ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG for CIFAR: five conv blocks, max pooling between them, global average pooling, a linear layer.

    Each block ``block{i}`` is ``[conv - BN - ReLU] * k`` *without* its final ReLU, so the
    block's output is pre-activation and ``relu{i}`` applies the activation. Blocks are
    separated by 2x2 max pooling ``pool0`` ... ``pool2``; ``pool3`` is used only for 64x64
    inputs (as in the benchmark), so a 32x32 input reaches ``block3`` and ``block4`` at 4x4.
    Then ``pool4`` (global average), ``flatten`` and the classifier ``classifier``.

    Features of the benchmark's ``forward(x, is_feat=True)`` (also in :attr:`feature_paths`
    and :attr:`preact_feature_paths`), shapes for a 32x32 input::

        feature  preact=False  preact=True  shape
        f0       relu0         relu0        (N, 64, 32, 32)
        f1       relu1         block1       (N, 128, 16, 16)
        f2       relu2         block2       (N, 256, 8, 8)
        f3       relu3         block3       (N, 512, 4, 4)
        f4       relu4         block4       (N, 512, 4, 4)
        f5       flatten       flatten      (N, 512)

    The benchmark's ``get_bn_before_relu()`` (for OFD) is the last module of ``block1`` ...
    ``block4`` (``block1.1`` for VGG-8, ``block1.4`` for VGG-13).

    Args:
        config: widths of the convolutions of each of the five blocks (see :data:`VGG_CONFIGS`).
        batch_norm: BatchNorm after every convolution (the benchmark's CIFAR models use it).
        num_classes: outputs of the classifier.
    """

    def __init__(
        self, config: Sequence[Sequence[int]], batch_norm: bool = True, num_classes: int = 100
    ) -> None:
        super().__init__()
        if len(config) != 5 or any(len(widths) == 0 for widths in config):
            raise ValueError(f"config must hold 5 non-empty blocks of widths, got {config}.")
        self.num_classes = num_classes
        in_channels = 3
        for index, widths in enumerate(config):
            self.add_module(f"block{index}", _make_block(widths, in_channels, batch_norm))
            self.add_module(f"relu{index}", nn.ReLU())
            in_channels = widths[-1]
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_channels, num_classes)
        #: module paths of the benchmark's ``feat`` list (``preact=False``).
        self.feature_paths = ("relu0", "relu1", "relu2", "relu3", "relu4", "flatten")
        #: module paths of the benchmark's ``feat`` list with ``preact=True``.
        self.preact_feature_paths = ("relu0", "block1", "block2", "block3", "block4", "flatten")
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)`` (or 64x64, with ``pool3``)."""
        height = x.shape[2]
        x = self.relu0(self.block0(x))
        x = self.relu1(self.block1(self.pool0(x)))
        x = self.relu2(self.block2(self.pool1(x)))
        x = self.relu3(self.block3(self.pool2(x)))
        if height == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


def vgg8(num_classes: int = 100) -> nn.Module:
    """VGG-8 with BatchNorm (one convolution per block), about 3.96M parameters for 100 classes.

    Hook paths (see :class:`VGG`): ``relu0`` ... ``relu4``, ``flatten``; pre-activations
    ``block1`` ... ``block4``.
    """
    return VGG(VGG_CONFIGS[8], batch_norm=True, num_classes=num_classes)


def vgg13(num_classes: int = 100) -> nn.Module:
    """VGG-13 with BatchNorm (two convolutions per block), about 9.46M parameters for 100 classes.

    Hook paths (see :class:`VGG`): ``relu0`` ... ``relu4``, ``flatten``; pre-activations
    ``block1`` ... ``block4``.
    """
    return VGG(VGG_CONFIGS[13], batch_norm=True, num_classes=num_classes)
