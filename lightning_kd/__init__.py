"""lightning_kd: knowledge distillation for PyTorch Lightning."""

from lightning_kd.callbacks import FeatureHooks, LossWeightSchedule, TemperatureAnnealing
from lightning_kd.losses import (
    ATTerm,
    CCTerm,
    CrossEntropyTerm,
    DISTTerm,
    DKDTerm,
    FitNetTerm,
    KDTerm,
    LayerPairTerm,
    LossTerm,
    NSTTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
    StepOutputs,
)
from lightning_kd.module import DistillationModule

__version__ = "0.1.0"

__all__ = [
    "ATTerm",
    "CCTerm",
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "DistillationModule",
    "FeatureHooks",
    "FitNetTerm",
    "KDTerm",
    "LayerPairTerm",
    "LossTerm",
    "LossWeightSchedule",
    "NSTTerm",
    "PKTTerm",
    "RKDTerm",
    "SPTerm",
    "StepOutputs",
    "TemperatureAnnealing",
    "__version__",
]
