"""lightning_kd: knowledge distillation for PyTorch Lightning."""

from lightning_kd.callbacks import (
    DistillationStages,
    FeatureHooks,
    LossWeightSchedule,
    Stage,
    TemperatureAnnealing,
)
from lightning_kd.losses import (
    ABTerm,
    ATTerm,
    CCTerm,
    CRDTerm,
    CrossEntropyTerm,
    DISTTerm,
    DKDTerm,
    FitNetTerm,
    FSPTerm,
    FTTerm,
    KDTerm,
    LayerPairTerm,
    LossTerm,
    MultiTeacherKDTerm,
    NSTTerm,
    OFDTerm,
    ParaphraserTerm,
    PKTTerm,
    ReviewKDTerm,
    RKDTerm,
    SPTerm,
    StepOutputs,
    VIDTerm,
)
from lightning_kd.module import DistillationModule
from lightning_kd.paradigms import MutualLearningModule
from lightning_kd.teacher_ensemble import TeacherEnsemble

__version__ = "0.1.0"

__all__ = [
    "ABTerm",
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
    "FTTerm",
    "FSPTerm",
    "KDTerm",
    "LayerPairTerm",
    "LossTerm",
    "LossWeightSchedule",
    "MultiTeacherKDTerm",
    "MutualLearningModule",
    "NSTTerm",
    "OFDTerm",
    "ParaphraserTerm",
    "PKTTerm",
    "ReviewKDTerm",
    "RKDTerm",
    "SPTerm",
    "Stage",
    "StepOutputs",
    "TeacherEnsemble",
    "TemperatureAnnealing",
    "VIDTerm",
    "__version__",
]
