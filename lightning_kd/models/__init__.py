"""Teacher and student networks: small models for the embedded data, the CRD CIFAR models, timm by name."""

from lightning_kd.models.cifar import CIFAR_MODELS, create_cifar_model
from lightning_kd.models.small import MLP, ConvNet1d
from lightning_kd.models.timm_bridge import timm_model

__all__ = ["CIFAR_MODELS", "MLP", "ConvNet1d", "create_cifar_model", "timm_model"]
