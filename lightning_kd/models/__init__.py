"""Teacher and student networks: small models for the embedded data, and timm by name."""

from lightning_kd.models.small import MLP, ConvNet1d
from lightning_kd.models.timm_bridge import timm_model

__all__ = ["MLP", "ConvNet1d", "timm_model"]
