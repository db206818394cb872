"""A small 2-D CNN for 28x28 images (the real MNIST digits): teacher and student of one family.

Three stages named ``conv1``, ``conv2``, ``conv3`` (``depth`` conv-BN-ReLU blocks each), the
flattened ``embedding`` and the ``classifier``, so the same layer names serve every teacher and
student of the family (as ``layer1``..``layer3`` and ``flatten`` do for the CIFAR ResNets):

- ``convK`` (the stage's output after its last ReLU): the feature maps AT, NST, FitNet, FT,
  VID, ReviewKD and FSP read;
- ``convK.bn`` (the last BatchNorm of the stage, before its ReLU): the pre-activation OFD and
  AB read (the ReLUs are not in place, so a hook there keeps its values);
- ``embedding`` (the penultimate vector): what RKD, PKT, CC and CRD read.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ConvNet2d", "ConvStage"]


class ConvStage(nn.Module):
    """``depth`` 3x3 conv-BN-ReLU blocks, the first with ``stride``; the last is ``conv``, ``bn``, ``relu``.

    Args:
        in_channels: input channels.
        out_channels: channels of every block.
        depth: number of blocks (at least 1).
        stride: stride of the first block's convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"A stage needs at least one conv block, got depth={depth}.")
        blocks: list[nn.Module] = []
        for index in range(depth - 1):
            conv = nn.Conv2d(
                in_channels, out_channels, 3, stride=stride if index == 0 else 1, padding=1, bias=False
            )
            blocks += [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)  # empty for depth 1
        first = depth == 1
        self.conv = nn.Conv2d(
            in_channels if first else out_channels,
            out_channels,
            3,
            stride=stride if first else 1,
            padding=1,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """The stage's maps after its last ReLU."""
        return self.relu(self.bn(self.conv(self.blocks(x))))


class ConvNet2d(nn.Module):
    """2-D CNN for ``(N, in_channels, side, side)`` images: three stages, a hidden layer, a classifier.

    The stages have strides 2, 2, 1: on 28x28 digits the maps are 14x14 (``conv1``), 7x7
    (``conv2``, ``conv3``), so any two models of the family have maps of the same sizes at the
    same stage (AT, NST and FSP compare spatial positions). ``embedding`` is
    ``Flatten -> Linear(widths[2] * 7 * 7, hidden) -> ReLU``.

    Args:
        in_channels: input channels.
        num_classes: number of outputs.
        side: height (= width) of the input images.
        widths: channels of the three stages.
        depth: conv blocks per stage.
        hidden: width of the penultimate layer (``embedding``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        side: int = 28,
        widths: Sequence[int] = (32, 64, 64),
        depth: int = 2,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(
                f"ConvNet2d has three stages: widths needs 3 channel counts, got {list(widths)}."
            )
        self.num_classes = num_classes
        c1, c2, c3 = widths
        self.conv1 = ConvStage(in_channels, c1, depth, stride=2)
        self.conv2 = ConvStage(c1, c2, depth, stride=2)
        self.conv3 = ConvStage(c2, c3, depth, stride=1)
        out_side = (side + 1) // 2
        out_side = (out_side + 1) // 2
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(c3 * out_side * out_side, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.classifier(self.embedding(self.conv3(self.conv2(self.conv1(x)))))
