"""find_layer: unknown layers list the closest names."""

from __future__ import annotations

import pytest

from lightning_kd import FeatureHooks
from lightning_kd.callbacks import find_layer
from lightning_kd.models import ConvNet1d
from tests.helpers import Pair, small_net


def test_unknown_layer_lists_the_closest_names() -> None:
    model = ConvNet1d()
    with pytest.raises(ValueError, match=r"Unknown student layer 'conv3.00'.*'conv3.0'"):
        find_layer(model, "conv3.00", "student")
    hooks = FeatureHooks(teacher_layers=["embeding"])
    with pytest.raises(ValueError, match=r"Unknown teacher layer 'embeding'.*'embedding'"):
        hooks.attach(Pair(small_net(), model))
