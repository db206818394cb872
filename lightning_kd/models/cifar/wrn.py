"""Wide ResNets of the CRD benchmark (``wrn_16_2``, ``wrn_40_2``, ``wrn_40_1``).

Reproduces ``models/wrn.py`` of HobbitLong/RepDistiller (Zagoruyko & Komodakis' pre-activation
WRN-d-k for CIFAR). Parameter and buffer names are the benchmark's (``block1.layer.0.bn1``,
``convShortcut``, ...), so its state dicts load unchanged. ReLUs are never in place, so a
hooked BatchNorm output (the benchmark's pre-activation features) is not overwritten.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.models.cifar._layers import init_weights

__all__ = ["WideBasicBlock", "WideResNet", "WideStage", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``.

    When the width changes, the shortcut is a 1x1 convolution ``convShortcut`` applied to the
    *activated* input ``relu(bn1(x))``; otherwise it is ``x`` itself (as in the benchmark).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the shortcut).
        drop_rate: dropout between the two convolutions (0 in the benchmark).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_channels == out_channels
        # name kept from the benchmark so that its checkpoints load
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The block output (no activation after the sum)."""
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideStage(nn.Module):
    """A stage of ``blocks`` wide blocks in ``layer`` (the benchmark's ``NetworkBlock``).

    Args:
        blocks: number of blocks.
        in_channels: input channels of the first block.
        out_channels: channels of every block's output.
        stride: stride of the first block.
        drop_rate: dropout inside each block.
    """

    def __init__(
        self, blocks: int, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(blocks)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        """The stage output."""
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs, depth ``6n + 4``.

    ``conv3x3(3, 16)``, stages ``block1`` / ``block2`` / ``block3`` of ``n`` pre-activation
    blocks with widths ``16k, 32k, 64k`` (strides 1, 2, 2), final ``bn1`` + ``relu``,
    ``AvgPool2d(8)`` and a linear classifier ``fc``.

    Features of the benchmark's ``forward(x, is_feat=True)`` (also in :attr:`feature_paths`
    and :attr:`preact_feature_paths`), shapes for a 32x32 input and widen factor ``k``. The
    blocks are pre-activation, so the benchmark's ``preact=True`` features are the stage
    outputs passed through the *next* BatchNorm, which is exactly the output of that
    BatchNorm in the forward pass::

        feature  preact=False  preact=True         shape
        f0       conv1         conv1               (N, 16, 32, 32)
        f1       block1        block2.layer.0.bn1  (N, 16k, 32, 32)
        f2       block2        block3.layer.0.bn1  (N, 32k, 16, 16)
        f3       block3        bn1                 (N, 64k, 8, 8)
        f4       flatten       flatten             (N, 64k)

    The benchmark's ``get_bn_before_relu()`` (for OFD) is the same three BatchNorms.

    Args:
        depth: ``6n + 4`` (16, 28, 40, ...).
        widen_factor: width multiplier ``k``.
        num_classes: outputs of the classifier.
        drop_rate: dropout inside the blocks (0 in the benchmark).
    """

    def __init__(
        self, depth: int, widen_factor: int = 1, num_classes: int = 100, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 28, 40, ...), got {depth}.")
        self.num_classes = num_classes
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        #: module paths of the benchmark's ``feat`` list (``preact=False``).
        self.feature_paths = ("conv1", "block1", "block2", "block3", "flatten")
        #: module paths of the benchmark's ``feat`` list with ``preact=True``.
        self.preact_feature_paths = ("conv1", "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1", "flatten")
        init_weights(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))


def wrn_16_2(num_classes: int = 100) -> nn.Module:
    """WRN-16-2 (2 blocks per stage, widths 32/64/128), about 0.70M parameters for 100 classes.

    Hook paths (see :class:`WideResNet`): ``conv1``, ``block1``, ``block2``, ``block3``, ``flatten``;
    pre-activations ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``.
    """
    return WideResNet(16, 2, num_classes)


def wrn_40_2(num_classes: int = 100) -> nn.Module:
    """WRN-40-2 (6 blocks per stage, widths 32/64/128), about 2.26M parameters for 100 classes.

    Hook paths (see :class:`WideResNet`): ``conv1``, ``block1``, ``block2``, ``block3``, ``flatten``;
    pre-activations ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``.
    """
    return WideResNet(40, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> nn.Module:
    """WRN-40-1 (6 blocks per stage, widths 16/32/64), about 0.57M parameters for 100 classes.

    Hook paths (see :class:`WideResNet`): ``conv1``, ``block1``, ``block2``, ``block3``, ``flatten``;
    pre-activations ``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``.
    """
    return WideResNet(40, 1, num_classes)
