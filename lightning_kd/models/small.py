"""Small networks for the embedded datasets: an MLP student and a 1-D CNN teacher.

Their ReLUs are not in place, so a hook on the layer before a ReLU (a pre-activation, as
OFD and AB read) keeps its values.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP", "ConvNet1d"]


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs: ``[Linear -> ReLU] * len(hidden) -> Linear``.

    Args:
        in_features: size of a flattened input (40 for MNIST-1D).
        num_classes: number of outputs.
        hidden: widths of the hidden layers.
    """

    def __init__(
        self, in_features: int = 40, num_classes: int = 10, hidden: Sequence[int] = (256, 256)
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class ConvNet1d(nn.Module):
    """1-D CNN for sequences ``(N, in_channels, length)``: three conv-BN-ReLU blocks, two linear layers.

    With the defaults on MNIST-1D (length 40) the convolutions give 64 x 10 = 640 features,
    then 640 -> 128 -> ``num_classes``.

    Args:
        in_channels: input channels.
        num_classes: number of outputs.
        length: input length.
        widths: channels of the three convolutions.
        hidden: width of the penultimate layer (``embedding``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        length: int = 40,
        widths: Sequence[int] = (32, 64, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        c1, c2, c3 = widths

        def block(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
            conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
            return nn.Sequential(conv, nn.BatchNorm1d(c_out), nn.ReLU())

        self.conv1 = block(in_channels, c1, 5, 2)
        self.conv2 = block(c1, c2, 3, 2)
        self.conv3 = block(c2, c3, 3, 1)
        out_length = (length + 1) // 2
        out_length = (out_length + 1) // 2
        self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(c3 * out_length, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``; ``(N, length)`` inputs are read as one channel.

        The reshape (rather than a branch on ``x.dim()``) keeps the model traceable by ``torch.fx``,
        so it can be a quantization-aware student.
        """
        x = x.reshape(x.shape[0], self.in_channels, -1)
        return self.classifier(self.embedding(self.conv3(self.conv2(self.conv1(x)))))
