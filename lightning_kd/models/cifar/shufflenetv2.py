"""ShuffleNetV2 for CIFAR as in the CRD benchmark (``shufflenet_v2`` = the benchmark's ``ShuffleV2``).

Reproduces ``models/ShuffleNetv2.py`` of HobbitLong/RepDistiller (``net_size=1``): a 1x1 stem
(no down-sampling), three stages of a down-sampling unit followed by channel-split units
(116/232/464 channels), a 1x1 convolution to 1024 channels, 4x4 average pooling and a linear
classifier. Parameter and buffer names are the benchmark's, so its state dicts load unchanged.

One restructuring, exact in values and gradients: the benchmark's basic unit computes
``shuffle(cat([x1, relu(b)]))`` and reports ``cat([x1, b])`` as its pre-activation; here the
unit computes ``preact = merge(x1, b) = cat([x1, b])`` and returns ``shuffle(relu(preact))``.
The pass-through half ``x1`` is always a copy of some ReLU output (the stem, every unit and
every down-sampling unit end with a ReLU and only split, concatenate or permute channels
after it), so ``relu(x1) == x1`` exactly, and the gradient to a zero entry of ``x1`` is zeroed
by the ReLU that produced it in both versions. This makes the benchmark's ``preact`` feature
the output of the module ``merge``. ReLUs are modules, never in place.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.cifar._layers import ChannelShuffle, Concat

__all__ = ["SHUFFLENET_V2_CONFIGS", "ShuffleDownBlock", "ShuffleNetV2", "ShuffleSplitBlock", "shufflenet_v2"]

#: ``net_size -> (stage channels + head channels, units per stage)``, as in the benchmark.
SHUFFLENET_V2_CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleSplitBlock(nn.Module):
    """Basic ShuffleNetV2 unit: split channels, transform the second part, concatenate, shuffle.

    ``x1, x2 = x[:, :c], x[:, c:]`` with ``c = int(channels * split_ratio)``; the branch is
    1x1 - BN - ReLU, 3x3 depthwise - BN, 1x1 - BN; ``merge`` concatenates ``[x1, branch]``
    (the pre-activation), then ``relu`` and ``shuffle`` (2 groups). See the module docstring
    for why applying ``relu`` to the concatenation is exact.

    Args:
        channels: input and output channels.
        split_ratio: fraction of the channels passed through unchanged.
    """

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_channels = int(channels * split_ratio)
        branch = channels - self.split_channels
        if branch != self.split_channels:
            raise ValueError(
                f"channels={channels} with split_ratio={split_ratio} must split into equal halves."
            )
        self.conv1 = nn.Conv2d(branch, branch, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(branch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(branch, branch, kernel_size=3, padding=1, groups=branch, bias=False)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = nn.Conv2d(branch, branch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.merge = Concat()
        self.relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        """The unit's output; ``merge`` outputs the pre-activation (unshuffled) on the way."""
        x1, x2 = x[:, : self.split_channels], x[:, self.split_channels :]
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2)))))
        out = self.bn3(self.conv3(out))
        return self.shuffle(self.relu(self.merge(x1, out)))


class ShuffleDownBlock(nn.Module):
    """Down-sampling ShuffleNetV2 unit (stride 2), both branches on the whole input.

    Left: 3x3 depthwise stride 2 - ``bn1``, 1x1 - ``bn2`` - ReLU. Right: 1x1 - ``bn3`` - ReLU,
    3x3 depthwise stride 2 - ``bn4``, 1x1 - ``bn5`` - ReLU. The two halves are concatenated
    and shuffled (2 groups).

    Args:
        in_channels: input channels.
        out_channels: output channels (each branch makes half).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.concat = Concat()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        """The unit's output (half the resolution)."""
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return self.shuffle(self.concat(left, right))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs.

    Stem ``conv1`` (1x1, 3 -> 24) + ``bn1`` + ``relu``; stages ``layer1`` / ``layer2`` /
    ``layer3``, each a :class:`ShuffleDownBlock` (index 0) then ``blocks[i]``
    :class:`ShuffleSplitBlock` units; head ``conv2`` (1x1) + ``bn2`` + ``relu2``;
    ``avgpool`` (4x4), ``flatten`` and the classifier ``linear``.

    Features of the benchmark's ``forward(x, is_feat=True)`` (also in :attr:`feature_paths`
    and :attr:`preact_feature_paths`), shapes for a 32x32 input with ``net_size=1``
    (channels 116/232/464/1024, units 3/7/3). The ``preact=True`` features are the unshuffled
    concatenations of the last unit of each stage::

        feature  preact=False  preact=True     shape
        f0       relu          relu            (N, 24, 32, 32)
        f1       layer1        layer1.3.merge  (N, 116, 16, 16)
        f2       layer2        layer2.7.merge  (N, 232, 8, 8)
        f3       layer3        layer3.3.merge  (N, 464, 4, 4)
        f4       flatten       flatten         (N, 1024)

    Args:
        net_size: a key of :data:`SHUFFLENET_V2_CONFIGS` (1.0 in the benchmark).
        num_classes: outputs of the classifier.
    """

    def __init__(self, net_size: float = 1.0, num_classes: int = 100) -> None:
        super().__init__()
        if net_size not in SHUFFLENET_V2_CONFIGS:
            raise ValueError(f"net_size must be one of {sorted(SHUFFLENET_V2_CONFIGS)}, got {net_size}.")
        channels, blocks = SHUFFLENET_V2_CONFIGS[net_size]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self._in_channels = 24
        self.layer1 = self._make_stage(channels[0], blocks[0])
        self.layer2 = self._make_stage(channels[1], blocks[1])
        self.layer3 = self._make_stage(channels[2], blocks[2])
        self.conv2 = nn.Conv2d(channels[2], channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(channels[3], num_classes)
        #: module paths of the benchmark's ``feat`` list (``preact=False``).
        self.feature_paths = ("relu", "layer1", "layer2", "layer3", "flatten")
        #: module paths of the benchmark's ``feat`` list with ``preact=True``.
        self.preact_feature_paths = (
            "relu",
            *(f"layer{i + 1}.{count}.merge" for i, count in enumerate(blocks)),
            "flatten",
        )

    def _make_stage(self, channels: int, blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleDownBlock(self._in_channels, channels)]
        layers += [ShuffleSplitBlock(channels) for _ in range(blocks)]
        self._in_channels = channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def shufflenet_v2(num_classes: int = 100) -> nn.Module:
    """The benchmark's ShuffleNetV2 (``ShuffleV2``, ``net_size=1``: 116/232/464/1024), ~1.36M parameters.

    Features and hook paths: see :class:`ShuffleNetV2` (``relu``, ``layer1``/``layer1.3.merge``,
    ``layer2``/``layer2.7.merge``, ``layer3``/``layer3.3.merge``, ``flatten``).
    """
    return ShuffleNetV2(1.0, num_classes)
