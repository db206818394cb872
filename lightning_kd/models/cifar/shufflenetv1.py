"""ShuffleNetV1 for CIFAR as in the CRD benchmark (``shufflenet_v1`` = the benchmark's ``ShuffleV1``).

Reproduces ``models/ShuffleNetv1.py`` of HobbitLong/RepDistiller: a 1x1 stem (no down-sampling),
three stages of grouped bottlenecks with channel shuffle (3 groups, 240/480/960 channels),
4x4 average pooling and a linear classifier. Parameter and buffer names are the benchmark's, so
its state dicts load unchanged. Each block's sum or concatenation is a module named ``merge``
(its output is the benchmark's ``preact``), ReLUs are modules, never in place, and ``forward``
returns logits only.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_kd.models.cifar._layers import Add, ChannelShuffle, Concat

__all__ = ["ShuffleBottleneck", "ShuffleNetV1", "shufflenet_v1"]


class ShuffleBottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 - BN - ReLU, shuffle, 3x3 depthwise - BN - ReLU, grouped 1x1 - BN.

    With stride 1 the input is added (``merge`` = sum); with stride 2 the input, average
    pooled (3x3, stride 2), is concatenated after the branch (``merge`` = concatenation, so
    the unit outputs ``out_channels + in_channels`` channels). ``relu`` follows ``merge``.
    As in the benchmark, the first 1x1 convolution is not grouped when the input has 24
    channels (the stem's output).

    Args:
        in_channels: input channels.
        out_channels: channels of the branch.
        stride: 1 or 2.
        groups: groups of the 1x1 convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        mid_channels = out_channels // 4
        first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride=stride, padding=1, groups=mid_channels, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        self.merge: nn.Module = Add()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
            self.merge = Concat()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """The unit's output; ``merge`` outputs the pre-ReLU sum / concatenation on the way."""
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.merge(out, self.shortcut(x)))


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 for 32x32 inputs.

    Stem ``conv1`` (1x1, 3 -> 24) + ``bn1`` + ``relu``; stages ``layer1`` / ``layer2`` /
    ``layer3`` whose first unit has stride 2 and concatenates its shortcut; ``avgpool``
    (4x4), ``flatten`` and the classifier ``linear``.

    Features of the benchmark's ``forward(x, is_feat=True)`` (also in :attr:`feature_paths`
    and :attr:`preact_feature_paths`), shapes for a 32x32 input with the benchmark's
    configuration (channels 240/480/960, units 4/8/4)::

        feature  preact=False  preact=True     shape
        f0       relu          relu            (N, 24, 32, 32)
        f1       layer1        layer1.3.merge  (N, 240, 16, 16)
        f2       layer2        layer2.7.merge  (N, 480, 8, 8)
        f3       layer3        layer3.3.merge  (N, 960, 4, 4)
        f4       flatten       flatten         (N, 960)

    Args:
        out_channels: output channels of the three stages.
        blocks: units per stage.
        groups: groups of the 1x1 convolutions.
        num_classes: outputs of the classifier.
    """

    def __init__(
        self,
        out_channels: Sequence[int] = (240, 480, 960),
        blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        if len(out_channels) != 3 or len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"Need 3 stages, got out_channels={out_channels}, blocks={blocks}.")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self._in_channels = 24
        self.layer1 = self._make_stage(out_channels[0], blocks[0], groups)
        self.layer2 = self._make_stage(out_channels[1], blocks[1], groups)
        self.layer3 = self._make_stage(out_channels[2], blocks[2], groups)
        self.avgpool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_channels[2], num_classes)
        #: module paths of the benchmark's ``feat`` list (``preact=False``).
        self.feature_paths = ("relu", "layer1", "layer2", "layer3", "flatten")
        #: module paths of the benchmark's ``feat`` list with ``preact=True``.
        self.preact_feature_paths = (
            "relu",
            *(f"layer{i + 1}.{count - 1}.merge" for i, count in enumerate(blocks)),
            "flatten",
        )

    def _make_stage(self, out_channels: int, blocks: int, groups: int) -> nn.Sequential:
        # the first unit concatenates its input, so its branch makes the remaining channels
        layers = [ShuffleBottleneck(self._in_channels, out_channels - self._in_channels, 2, groups)]
        layers += [ShuffleBottleneck(out_channels, out_channels, 1, groups) for _ in range(blocks - 1)]
        self._in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def shufflenet_v1(num_classes: int = 100) -> nn.Module:
    """The benchmark's ShuffleNetV1 (``ShuffleV1``: 3 groups, 240/480/960), about 0.95M parameters.

    Features and hook paths: see :class:`ShuffleNetV1` (``relu``, ``layer1``/``layer1.3.merge``,
    ``layer2``/``layer2.7.merge``, ``layer3``/``layer3.3.merge``, ``flatten``).
    """
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
