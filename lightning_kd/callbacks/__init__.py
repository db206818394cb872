"""Ingredient 3 of distillation (how it unfolds over training) and its plumbing.

- How it unfolds: :class:`TemperatureAnnealing`, :class:`LossWeightSchedule`,
  :class:`ReversalStrengthSchedule` (CTKD's curriculum; all :class:`ScheduledValue`),
  :class:`DistillationStages`, :class:`ReproducibleOrder`.
- Plumbing: :class:`FeatureHooks` (the layers the loss terms read) and
  :class:`QuantizationAwareTraining` (its ``torch.ao`` functions are in :mod:`lightning_kd.quantization`).
- Reports of what distillation did: the :mod:`lightning_kd.callbacks.report` subpackage,
  whose callbacks are re-exported here.
"""

from lightning_kd.callbacks.feature_hooks import FeatureHooks
from lightning_kd.callbacks.loss_weights import LossWeightSchedule
from lightning_kd.callbacks.quantization import QuantizationAwareTraining
from lightning_kd.callbacks.report import (
    CKAReport,
    ClassAgreementReport,
    ClassChanges,
    CompressionReport,
    DistillationReport,
    KNNProbe,
    TemperatureEntropyReport,
)
from lightning_kd.callbacks.reproducible_order import ReproducibleOrder
from lightning_kd.callbacks.reversal_strength import ReversalStrengthSchedule
from lightning_kd.callbacks.scheduled_value import ScheduledValue, schedule_value
from lightning_kd.callbacks.stages import DistillationStages, Stage
from lightning_kd.callbacks.temperature import TemperatureAnnealing
from lightning_kd.hooks import find_layer
from lightning_kd.quantization import (
    convert_to_int8,
    evaluate_int8,
    post_training_int8,
    prepare_qat,
    restore_qat_student,
)

__all__ = [
    "CKAReport",
    "ClassAgreementReport",
    "ClassChanges",
    "CompressionReport",
    "DistillationReport",
    "DistillationStages",
    "FeatureHooks",
    "KNNProbe",
    "LossWeightSchedule",
    "QuantizationAwareTraining",
    "ReproducibleOrder",
    "ReversalStrengthSchedule",
    "ScheduledValue",
    "Stage",
    "TemperatureAnnealing",
    "TemperatureEntropyReport",
    "convert_to_int8",
    "evaluate_int8",
    "find_layer",
    "post_training_int8",
    "prepare_qat",
    "restore_qat_student",
    "schedule_value",
]
