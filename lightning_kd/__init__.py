"""lightning_kd: knowledge distillation for PyTorch Lightning."""

from lightning_kd.callbacks import FeatureHooks, LossWeightSchedule, TemperatureAnnealing
from lightning_kd.losses import CrossEntropyTerm, DISTTerm, DKDTerm, KDTerm, LossTerm, StepOutputs
from lightning_kd.module import DistillationModule

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "DistillationModule",
    "FeatureHooks",
    "KDTerm",
    "LossTerm",
    "LossWeightSchedule",
    "StepOutputs",
    "TemperatureAnnealing",
    "__version__",
]
