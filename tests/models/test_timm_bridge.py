"""timm_model: unknown names."""

from __future__ import annotations

import pytest

from lightning_kd.models import timm_model


def test_timm_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="timm has no model 'resnet_nope'"):
        timm_model("resnet_nope", num_classes=3)
