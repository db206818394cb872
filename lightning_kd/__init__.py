"""lightning_kd: knowledge distillation for PyTorch Lightning."""

from lightning_kd.callbacks import (
    DistillationStages,
    FeatureHooks,
    LossWeightSchedule,
    Stage,
    TemperatureAnnealing,
)
from lightning_kd.losses import (
    ATTerm,
    CCTerm,
    CRDTerm,
    CrossEntropyTerm,
    DISTTerm,
    DKDTerm,
    FitNetTerm,
    FSPTerm,
    KDTerm,
    LayerPairTerm,
    LossTerm,
    NSTTerm,
    OFDTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
    StepOutputs,
    VIDTerm,
)
from lightning_kd.module import DistillationModule

__version__ = "0.1.0"

__all__ = [
    "ATTerm",
    "CCTerm",
    "CRDTerm",
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "DistillationModule",
    "DistillationStages",
    "FeatureHooks",
    "FitNetTerm",
    "FSPTerm",
    "KDTerm",
    "LayerPairTerm",
    "LossTerm",
    "LossWeightSchedule",
    "NSTTerm",
    "OFDTerm",
    "PKTTerm",
    "RKDTerm",
    "SPTerm",
    "Stage",
    "StepOutputs",
    "TemperatureAnnealing",
    "VIDTerm",
    "__version__",
]
