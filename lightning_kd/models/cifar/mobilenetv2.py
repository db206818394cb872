"""MobileNetV2 for CIFAR as in the CRD benchmark (``mobilenetv2`` = the benchmark's ``mobile_half``).

Reproduces ``models/mobilenetv2.py`` of HobbitLong/RepDistiller (the variant of "Knowledge
Distillation via Route Constrained Optimization"): a stride-2 stem, seven stages of inverted
residual blocks, a 1x1 convolution to 1280 channels and a linear classifier. The benchmark's
"MobileNetV2" student is ``mobile_half``: expansion 6 and width multiplier 0.5. Parameter and
buffer names are the benchmark's (``blocks.1.0.conv.0.weight``, ``classifier.0.weight``, ...),
so its state dicts load unchanged. No ReLU is in place.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.cifar._layers import init_weights

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]

#: (expansion, channels, blocks, stride) of the seven stages; expansion ``None`` = the model's ``T``.
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """Inverted residual block: 1x1 expand - BN - ReLU, 3x3 depthwise - BN - ReLU, 1x1 project - BN.

    ``conv`` holds the eight layers; the input is added when the stride is 1 and the width is
    unchanged (no activation after the projection or the sum).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the depthwise convolution (1 or 2).
        expand_ratio: hidden width = ``in_channels * expand_ratio``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}.")
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """The block output."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for ``input_size`` x ``input_size`` images (32 in the benchmark).

    ``conv1`` (3x3 stride-2 conv - BN - ReLU, ``int(32 * width_mult)`` channels), the seven
    stages ``blocks.0`` ... ``blocks.6`` (widths ``int(c * width_mult)`` for
    ``c`` = 16, 24, 32, 64, 96, 160, 320; strides 1, 1, 2, 2, 1, 2, 1; the first stage has
    expansion 1, the others ``expand_ratio``), ``conv2`` (1x1 conv - BN - ReLU to 1280
    channels, ``int(1280 * width_mult)`` when ``width_mult > 1``), ``avgpool``, ``flatten``
    and ``classifier`` (a ``Sequential`` holding one linear layer).

    Features of the benchmark's ``forward(x, is_feat=True)`` (also in :attr:`feature_paths`;
    the benchmark ignores ``preact`` for this model, so :attr:`preact_feature_paths` is the
    same), shapes for a 32x32 input and ``width_mult=0.5``::

        feature  path      shape
        f0       conv1     (N, 16, 16, 16)
        f1       blocks.1  (N, 12, 16, 16)
        f2       blocks.2  (N, 16, 8, 8)
        f3       blocks.4  (N, 48, 4, 4)
        f4       blocks.6  (N, 160, 2, 2)
        f5       flatten   (N, 1280)

    The benchmark's ``get_bn_before_relu()`` (for OFD) is ``blocks.{1,2,4,6}.{last}.conv.7``
    (``blocks.1.1.conv.7``, ``blocks.2.2.conv.7``, ``blocks.4.2.conv.7``, ``blocks.6.0.conv.7``).

    Args:
        num_classes: outputs of the classifier.
        expand_ratio: expansion ``T`` of the inverted residual blocks after the first stage.
        width_mult: width multiplier.
        input_size: input height and width, a multiple of 32 (sets the pooling window).
    """

    def __init__(
        self, num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5, input_size: int = 32
    ) -> None:
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}.")
        self.num_classes = num_classes
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for expansion, width, count, stride in _STAGES:
            out_channels = int(width * width_mult)
            layers = []
            for index in range(count):
                layers.append(
                    InvertedResidual(
                        channels, out_channels, stride if index == 0 else 1, expansion or expand_ratio
                    )
                )
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        #: module paths of the benchmark's ``feat`` list.
        self.feature_paths = ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6", "flatten")
        #: the same as :attr:`feature_paths` (the benchmark ignores ``preact`` here).
        self.preact_feature_paths = self.feature_paths
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, input_size, input_size)``."""
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


def mobilenetv2(num_classes: int = 100) -> nn.Module:
    """The benchmark's MobileNetV2 student (``mobile_half``): expansion 6, width 0.5, ~0.81M parameters.

    Features and hook paths: see :class:`MobileNetV2` (``conv1``, ``blocks.1``, ``blocks.2``,
    ``blocks.4``, ``blocks.6``, ``flatten``).
    """
    return MobileNetV2(num_classes, expand_ratio=6, width_mult=0.5)
