"""CIFAR ResNets of the CRD benchmark: the three-stage 6n+2 family and the four-stage ResNet-50.

Reproduces ``models/resnet.py`` (``resnet20`` ... ``resnet32x4``) and ``models/resnetv2.py``
(``ResNet50``) of HobbitLong/RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020). Parameter and buffer names are the benchmark's, so its state dicts
load unchanged. Differences that do not change the function: every block ends with a
parameter-free :class:`~lightning_kd.models.cifar._layers.Add` module named ``merge`` whose
output is the block's pre-activation (the benchmark's ``preact``), ReLUs are modules and never
in place (a hooked output is never overwritten), and ``forward`` returns logits only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_kd.models.cifar._layers import Add, init_weights

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetFourStage",
    "resnet8x4",
    "resnet20",
    "resnet32x4",
    "resnet50",
    "resnet56",
    "resnet110",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """1x1 convolution + BN shortcut used when the shape changes."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or ``downsample`` (1x1 convolution + BN, the benchmark's
    "option B") when the stride or the width changes.

    Args:
        in_channels: input channels.
        channels: output channels.
        stride: stride of the first convolution (and of the shortcut).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = _projection(in_channels, channels, stride)
        self.merge = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """The block output; ``merge`` outputs the pre-ReLU sum on the way."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(self.merge(out, shortcut))


class ResNet(nn.Module):
    """Three-stage CIFAR ResNet with basic blocks, depth ``6n + 2`` (the benchmark's ``models/resnet.py``).

    ``conv3x3(3, w0) - BN - ReLU``, then stages ``layer1`` / ``layer2`` / ``layer3`` of ``n``
    basic blocks each with widths ``w1, w2, w3`` (strides 1, 2, 2), ``AvgPool2d(8)`` and a
    linear classifier ``fc``. Expects 32x32 inputs.

    Features of the benchmark's ``forward(x, is_feat=True)``, as dotted module paths whose
    output is the feature (also in :attr:`feature_paths` and :attr:`preact_feature_paths`);
    shapes for a 32x32 input, ``n`` blocks per stage:

    ::

        feature  preact=False  preact=True           shape
        f0       relu          relu                  (N, w0, 32, 32)
        f1       layer1        layer1.{n-1}.merge    (N, w1, 32, 32)
        f2       layer2        layer2.{n-1}.merge    (N, w2, 16, 16)
        f3       layer3        layer3.{n-1}.merge    (N, w3, 8, 8)
        f4       flatten       flatten               (N, w3)

    The benchmark's ``get_bn_before_relu()`` (for OFD) is ``layer{i}.{n-1}.bn2``.

    Args:
        depth: ``6n + 2`` (8, 20, 32, 56, 110, ...).
        widths: ``(w0, w1, w2, w3)``: stem and stage widths.
        num_classes: outputs of the classifier.
    """

    def __init__(self, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110, ...), got {depth}.")
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 values (stem, layer1, layer2, layer3), got {widths}.")
        self.num_classes = num_classes
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self._in_channels = widths[0]
        self.layer1 = self._make_stage(widths[1], blocks, stride=1)
        self.layer2 = self._make_stage(widths[2], blocks, stride=2)
        self.layer3 = self._make_stage(widths[3], blocks, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        last = blocks - 1
        #: module paths of the benchmark's ``feat`` list (``preact=False``).
        self.feature_paths = ("relu", "layer1", "layer2", "layer3", "flatten")
        #: module paths of the benchmark's ``feat`` list with ``preact=True``.
        self.preact_feature_paths = (
            "relu",
            f"layer1.{last}.merge",
            f"layer2.{last}.merge",
            f"layer3.{last}.merge",
            "flatten",
        )
        init_weights(self)

    def _make_stage(self, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self._in_channels, channels, stride)]
        layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        self._in_channels = channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class Bottleneck(nn.Module):
    """Post-activation bottleneck block (1x1, 3x3, 1x1 convolutions, expansion 4).

    The shortcut ``shortcut`` is the identity, or a 1x1 convolution + BN when the stride or
    the width changes.

    Args:
        in_channels: input channels.
        channels: width of the 3x3 convolution; the block outputs ``4 * channels``.
        stride: stride of the 3x3 convolution (and of the shortcut).
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = self.expansion * channels
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(channels, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _projection(in_channels, out_channels, stride)
        self.merge = Add()
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """The block output; ``merge`` outputs the pre-ReLU sum on the way."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.merge(out, self.shortcut(x)))


class ResNetFourStage(nn.Module):
    """Four-stage bottleneck ResNet for 32x32 inputs (the benchmark's ``models/resnetv2.py``).

    A torchvision-style ResNet whose stem is a single ``conv3x3(3, 64)`` (stride 1, no max
    pooling) + BN + ReLU; stages ``layer1`` ... ``layer4`` of bottleneck blocks with widths
    64, 128, 256, 512 (outputs x4), strides 1, 2, 2, 2; global average pooling and a linear
    classifier ``linear``.

    Features of the benchmark's ``forward(x, is_feat=True)`` (also in :attr:`feature_paths`
    and :attr:`preact_feature_paths`); shapes for a 32x32 input with blocks ``(b1, ..., b4)``:

    ::

        feature  preact=False  preact=True           shape
        f0       relu          relu                  (N, 64, 32, 32)
        f1       layer1        layer1.{b1-1}.merge   (N, 256, 32, 32)
        f2       layer2        layer2.{b2-1}.merge   (N, 512, 16, 16)
        f3       layer3        layer3.{b3-1}.merge   (N, 1024, 8, 8)
        f4       layer4        layer4.{b4-1}.merge   (N, 2048, 4, 4)
        f5       flatten       flatten               (N, 2048)

    For ResNet-50 the ``preact=True`` paths are ``layer1.2.merge``, ``layer2.3.merge``,
    ``layer3.5.merge``, ``layer4.2.merge``.

    Args:
        blocks: bottleneck blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50.
        num_classes: outputs of the classifier.
    """

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive counts, got {blocks}.")
        self.num_classes = num_classes
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self._in_channels = 64
        self.layer1 = self._make_stage(64, blocks[0], stride=1)
        self.layer2 = self._make_stage(128, blocks[1], stride=2)
        self.layer3 = self._make_stage(256, blocks[2], stride=2)
        self.layer4 = self._make_stage(512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        #: module paths of the benchmark's ``feat`` list (``preact=False``).
        self.feature_paths = ("relu", "layer1", "layer2", "layer3", "layer4", "flatten")
        #: module paths of the benchmark's ``feat`` list with ``preact=True``.
        self.preact_feature_paths = (
            "relu",
            *(f"layer{i + 1}.{count - 1}.merge" for i, count in enumerate(blocks)),
            "flatten",
        )
        init_weights(self)

    def _make_stage(self, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for index in range(blocks):
            layers.append(Bottleneck(self._in_channels, channels, stride if index == 0 else 1))
            self._in_channels = channels * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, H, W)`` (32x32 in the benchmark)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


def resnet20(num_classes: int = 100) -> nn.Module:
    """ResNet-20 (3 x 3 basic blocks, widths 16/16/32/64), about 0.28M parameters for 100 classes.

    Hook paths (see :class:`ResNet`): ``relu``, ``layer1``, ``layer2``, ``layer3``, ``flatten``;
    pre-activations ``layer1.2.merge``, ``layer2.2.merge``, ``layer3.2.merge``.
    """
    return ResNet(20, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 100) -> nn.Module:
    """ResNet-56 (3 x 9 basic blocks, widths 16/16/32/64), about 0.86M parameters for 100 classes.

    Hook paths (see :class:`ResNet`): ``relu``, ``layer1``, ``layer2``, ``layer3``, ``flatten``;
    pre-activations ``layer1.8.merge``, ``layer2.8.merge``, ``layer3.8.merge``.
    """
    return ResNet(56, (16, 16, 32, 64), num_classes)


def resnet110(num_classes: int = 100) -> nn.Module:
    """ResNet-110 (3 x 18 basic blocks, widths 16/16/32/64), about 1.74M parameters for 100 classes.

    Hook paths (see :class:`ResNet`): ``relu``, ``layer1``, ``layer2``, ``layer3``, ``flatten``;
    pre-activations ``layer1.17.merge``, ``layer2.17.merge``, ``layer3.17.merge``.
    """
    return ResNet(110, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 100) -> nn.Module:
    """ResNet-8x4 (3 x 1 basic block, widths 32/64/128/256), about 1.23M parameters for 100 classes.

    Hook paths (see :class:`ResNet`): ``relu``, ``layer1``, ``layer2``, ``layer3``, ``flatten``;
    pre-activations ``layer1.0.merge``, ``layer2.0.merge``, ``layer3.0.merge``.
    """
    return ResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> nn.Module:
    """ResNet-32x4 (3 x 5 basic blocks, widths 32/64/128/256), about 7.43M parameters for 100 classes.

    Hook paths (see :class:`ResNet`): ``relu``, ``layer1``, ``layer2``, ``layer3``, ``flatten``;
    pre-activations ``layer1.4.merge``, ``layer2.4.merge``, ``layer3.4.merge``.
    """
    return ResNet(32, (32, 64, 128, 256), num_classes)


def resnet50(num_classes: int = 100) -> nn.Module:
    """The benchmark's CIFAR ResNet-50 (``ResNet50``: bottlenecks 3/4/6/3, 3x3 stem), ~23.71M parameters.

    Hook paths (see :class:`ResNetFourStage`): ``relu``, ``layer1`` ... ``layer4``, ``flatten``;
    pre-activations ``layer1.2.merge``, ``layer2.3.merge``, ``layer3.5.merge``, ``layer4.2.merge``.
    """
    return ResNetFourStage((3, 4, 6, 3), num_classes)
