"""find_layer: unknown layers list the closest names; LayerHooks: which call of a layer is captured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_kd import DistillationModule, FeatureHooks, FitNetTerm
from lightning_kd.callbacks import find_layer
from lightning_kd.hooks import LayerHooks
from lightning_kd.models import ConvNet1d
from tests.helpers import NUM_CLASSES, NUM_FEATURES, Pair, RandomDataModule, make_trainer, small_net


def test_unknown_layer_lists_the_closest_names() -> None:
    model = ConvNet1d()
    with pytest.raises(ValueError, match=r"Unknown student layer 'conv3.00'.*'conv3.0'"):
        find_layer(model, "conv3.00", "student")
    hooks = FeatureHooks(teacher_layers=["embeding"])
    with pytest.raises(ValueError, match=r"Unknown teacher layer 'embeding'.*'embedding'"):
        hooks.attach(Pair(small_net(), model))


class SharedBlock(nn.Module):
    """Calls ``block`` twice per forward (weight sharing), then ``head`` once."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(NUM_FEATURES, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.relu(self.block(self.stem(x)))
        return self.head(self.block(first))


def test_a_layer_run_twice_in_one_forward_is_an_error_naming_it_and_the_fix() -> None:
    model, x = SharedBlock(), torch.randn(4, NUM_FEATURES)
    hooks = LayerHooks.on(model, ["block", "head"], "student").attach()
    with pytest.raises(
        RuntimeError, match=r"student layers run more than once.*'block' ran 2 times.*Hook a layer"
    ):
        model(x)
    hooks.detach()
    with LayerHooks.on(model, ["stem", "head"], "student") as once:  # each runs once per forward: fine
        model(x)
        expected = model(x)  # counts start again with every forward
    torch.testing.assert_close(once.captured["head"], expected)


def test_keep_last_and_all_say_which_calls_are_captured() -> None:
    model, x = SharedBlock(), torch.randn(4, NUM_FEATURES)
    first = model.block(model.stem(x))
    second = model.block(torch.relu(first))
    with LayerHooks.on(model, ["block"], keep="last") as last:
        model(x)
    with LayerHooks.on(model, ["block"], keep="all") as every:
        model(x)
    torch.testing.assert_close(last.captured["block"], second)
    assert len(every.captured["block"]) == 2
    torch.testing.assert_close(every.captured["block"][0], first)
    torch.testing.assert_close(every.captured["block"][1], second)


def test_without_a_model_calls_are_counted_between_clears() -> None:
    block = nn.Linear(3, 3)
    hooks = LayerHooks({"block": block}).attach()
    block(torch.randn(2, 3))
    hooks.clear()
    block(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="'block' ran 2 times"):
        block(torch.randn(2, 3))


def test_a_distillation_fit_on_a_shared_block_stops_naming_the_layer() -> None:
    module = DistillationModule(SharedBlock(), teacher=SharedBlock(), losses=[FitNetTerm("head", "block")])
    with pytest.raises(RuntimeError, match=r"teacher layers run more than once.*'block' ran 2 times"):
        make_trainer(max_epochs=1).fit(module, datamodule=RandomDataModule())
