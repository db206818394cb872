"""A generator of synthetic inputs for data-free distillation: latent noise -> vectors or signals."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ConvGenerator1d", "Generator"]


class Generator(nn.Module):
    """MLP generator ``z -> x`` of inputs of any shape, in the style of DAFL's generator.

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, map Gaussian noise
    ``z`` through fully connected / convolutional layers with BatchNorm and LeakyReLU(0.2),
    a ``tanh``, and a final BatchNorm without affine parameters, so every generated batch
    has zero mean and unit variance per channel, like standardised real data. Here the body
    is an MLP:

    ``z -> [Linear -> BatchNorm1d -> LeakyReLU(0.2)] * len(hidden) -> Linear -> tanh ->
    reshape to output_shape -> BatchNorm over dim 1 (affine=False)``.

    For ``output_shape=(C, L)`` (a 1-D signal, e.g. MNIST-1D's ``(1, 40)``) or ``(C, H, W)``
    the last BatchNorm standardises each channel over the batch and the positions; for a
    vector ``(D,)`` each feature.

    Args:
        output_shape: shape of one generated sample, without the batch dimension.
        latent_dim: size of the noise vector ``z``.
        hidden: widths of the hidden layers.
    """

    def __init__(
        self, output_shape: Sequence[int] = (1, 40), latent_dim: int = 100, hidden: Sequence[int] = (256, 256)
    ) -> None:
        super().__init__()
        output_shape = tuple(int(size) for size in output_shape)
        if not output_shape or any(size < 1 for size in output_shape):
            raise ValueError(f"output_shape must be a non-empty tuple of positive sizes, got {output_shape}.")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}.")
        self.output_shape = output_shape
        self.latent_dim = latent_dim
        layers: list[nn.Module] = []
        width = latent_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.LeakyReLU(0.2)]
            width = size
        layers += [nn.Linear(width, math.prod(output_shape)), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.output_norm = nn.BatchNorm1d(output_shape[0], affine=False)

    def forward(self, z: Tensor) -> Tensor:
        """Samples ``(N, *output_shape)`` from noise ``(N, latent_dim)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"Generator expects noise of shape (N, {self.latent_dim}), got {tuple(z.shape)}: "
                "draw z with the generator's latent_dim."
            )
        x = self.body(z).reshape(len(z), self.output_shape[0], -1)
        return self.output_norm(x).reshape(len(z), *self.output_shape)


class ConvGenerator1d(nn.Module):
    """1-D convolutional generator ``z -> x`` of signals ``(channels, length)``: DAFL's generator in 1-D.

    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019 (their image generator,
    with 1-D convolutions): ``z -> Linear -> (width, length / 4) -> BatchNorm -> [upsample x2 ->
    Conv1d(k=3) -> BatchNorm -> LeakyReLU(0.2)] * 2 -> Conv1d(k=3) -> tanh -> BatchNorm per
    channel (affine=False)``. The convolutions make neighbouring positions correlated, as in
    real signals. ``length`` must be a multiple of 4.

    Args:
        output_shape: ``(channels, length)`` of one generated signal.
        latent_dim: size of the noise vector ``z``.
        width: channels of the hidden feature maps (the second block halves them).
    """

    def __init__(self, output_shape: Sequence[int] = (1, 40), latent_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        if len(output_shape) != 2 or output_shape[1] % 4 or min(output_shape) < 1:
            raise ValueError(
                f"output_shape must be (channels, length), length a multiple of 4; got {tuple(output_shape)}."
            )
        channels, length = (int(size) for size in output_shape)
        self.output_shape = (channels, length)
        self.latent_dim = latent_dim
        self.width = width
        self.project = nn.Linear(latent_dim, width * (length // 4))

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Upsample(scale_factor=2),
                nn.Conv1d(c_in, c_out, 3, padding=1),
                nn.BatchNorm1d(c_out),
                nn.LeakyReLU(0.2),
            ]

        self.body = nn.Sequential(
            nn.BatchNorm1d(width),
            *block(width, width),
            *block(width, width // 2),
            nn.Conv1d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm1d(channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        """Signals ``(N, channels, length)`` from noise ``(N, latent_dim)``."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"ConvGenerator1d expects noise of shape (N, {self.latent_dim}), got {tuple(z.shape)}: "
                "draw z with the generator's latent_dim."
            )
        return self.body(self.project(z).reshape(len(z), self.width, -1))
