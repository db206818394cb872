"""Data-free generators standardise every channel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd.models import ConvGenerator1d, Generator
from tests.helpers import LATENT

GENERATORS = [Generator((2, 12), LATENT, (16,)), Generator((5,), LATENT), ConvGenerator1d((2, 12), LATENT, 8)]


@pytest.mark.parametrize("generator", GENERATORS)
def test_generators_standardise_every_channel(generator: nn.Module) -> None:
    x = generator(torch.randn(32, LATENT))
    assert x.shape == (32, *generator.output_shape)
    channels = x.transpose(0, 1).reshape(x.shape[1], -1)
    torch.testing.assert_close(channels.mean(dim=1), torch.zeros(x.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(channels.var(dim=1, unbiased=False), torch.ones(x.shape[1]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="latent_dim"):
        generator(torch.randn(4, LATENT + 1))
