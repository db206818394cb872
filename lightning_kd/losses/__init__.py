"""Ingredient 1 of distillation: what is transferred, and the loss that transfers it."""

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs
from lightning_kd.losses.response import CrossEntropyTerm, DISTTerm, DKDTerm, KDTerm

__all__ = ["CrossEntropyTerm", "DISTTerm", "DKDTerm", "KDTerm", "LossTerm", "StepOutputs", "functional"]
