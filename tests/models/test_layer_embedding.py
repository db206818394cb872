"""LayerEmbedding returns a layer and names the nearest layers."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.models import ConvNet1d, LayerEmbedding


def test_layer_embedding_returns_the_layer_and_names_the_nearest_layers() -> None:
    net = ConvNet1d()
    wrapped = LayerEmbedding(net, "embedding")
    x = torch.randn(2, 1, 40)
    expected = net.embedding(net.conv3(net.conv2(net.conv1(x))))
    assert torch.equal(wrapped(x), expected)
    with pytest.raises(ValueError, match="nearest existing names"):
        LayerEmbedding(net, "embeding")
