"""A network's inner layer as its output: a trained classifier's penultimate features as an embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_kd.hooks import LayerHooks, find_layer
from lightning_kd.model_io import call_model
from lightning_kd.teachers.loading import load_weights

__all__ = ["LayerEmbedding"]


class LayerEmbedding(nn.Module):
    """``model``'s forward, returning the output of one of its layers, flattened to ``(N, D)``.

    Turns a trained classifier into an embedding teacher for
    :class:`~lightning_kd.EmbeddingDistillationModule`, e.g. the 128-d penultimate features of
    :class:`~lightning_kd.models.ConvNet1d` (``layer="embedding"``), as SEED distils a teacher's
    representation rather than its predictions. The whole ``model`` runs (the layers after
    ``layer`` too, a small cost for a classifier head); a forward hook, registered for the call
    only, catches the layer's output.

    The weights can come from ``checkpoint`` (any file :func:`~lightning_kd.teachers.load_weights`
    reads, e.g. the Lightning checkpoint of recipe ``mnist1d/teacher``): this wrapper's own
    state-dict keys carry the prefix ``model.``, so pass the file here rather than as the
    distillation module's ``teacher_checkpoint``.

    Args:
        model: the network.
        layer: dotted path of the layer (as in ``model.named_modules()``).
        checkpoint: a file with ``model``'s trained weights, loaded now.
    """

    def __init__(self, model: nn.Module, layer: str, checkpoint: str | Path | None = None) -> None:
        super().__init__()
        find_layer(model, layer)  # fail now on an unknown path, naming the closest ones
        if checkpoint is not None:
            load_weights(model, checkpoint)
        self.model = model
        self.layer = layer
        self.checkpoint = None if checkpoint is None else str(checkpoint)

    def forward(self, inputs: Any) -> Tensor:
        """``(N, D)``: the layer's output on ``inputs``, flattened after the batch dimension."""
        with LayerHooks.on(self.model, [self.layer]) as hooks:
            call_model(self.model, inputs)
        output = hooks.captured.get(self.layer)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"Layer {self.layer!r} of {type(self.model).__name__} "
                + (
                    "did not run in forward."
                    if output is None
                    else f"returned {type(output).__name__}, not a tensor."
                )
            )
        return output.flatten(1)

    def extra_repr(self) -> str:
        """The layer (and checkpoint) shown in the module repr."""
        return f"layer={self.layer!r}" + (f", checkpoint={self.checkpoint!r}" if self.checkpoint else "")
