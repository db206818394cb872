"""Ingredient 1 of distillation: what is transferred, and the loss that transfers it."""

from lightning_kd.losses import functional
from lightning_kd.losses.attention import ATTerm, NSTTerm
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs
from lightning_kd.losses.feature import FitNetTerm, make_regressor
from lightning_kd.losses.fsp import FSPTerm
from lightning_kd.losses.relation import CCTerm, PKTTerm, RKDTerm, SPTerm
from lightning_kd.losses.response import CrossEntropyTerm, DISTTerm, DKDTerm, KDTerm

__all__ = [
    "ATTerm",
    "CCTerm",
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "FitNetTerm",
    "FSPTerm",
    "KDTerm",
    "LayerPairTerm",
    "LossTerm",
    "NSTTerm",
    "PKTTerm",
    "RKDTerm",
    "SPTerm",
    "StepOutputs",
    "functional",
    "make_regressor",
]
