"""Any timm model as teacher or student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from lightning_kd.teachers.loading import load_weights

__all__ = ["timm_model"]


def timm_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model by name (no download), optionally loading weights from a file.

    Usable from YAML: ``class_path: lightning_kd.models.timm_model`` with ``init_args``.
    The returned model is timm's own, so hook paths are timm's module names
    (``stages.2``, ``layer3.1.conv2``, ...).

    Args:
        name: a name from ``timm.list_models()``, e.g. ``"resnet18"`` (a pretrained tag such
            as ``"resnet18.a1_in1k"`` is accepted; weights are never downloaded).
        num_classes: outputs of the classifier.
        in_chans: input channels.
        checkpoint: a Lightning checkpoint or state dict to load (see
            :func:`lightning_kd.teachers.load_weights`).
        **kwargs: passed to :func:`timm.create_model` (e.g. ``drop_rate``).
    """
    architecture = name.split(".")[0]  # "resnet18.a1_in1k": architecture.pretrained_tag
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture}*")[:10]
        raise ValueError(f"timm has no model {name!r}. Similar names: {close or 'none'}.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model
