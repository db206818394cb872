"""Ingredient 3 of distillation (how it unfolds over training) and its plumbing."""

from lightning_kd.callbacks.cka import CKAReport
from lightning_kd.callbacks.class_agreement import ClassAgreementReport, ClassChanges
from lightning_kd.callbacks.compression import CompressionReport
from lightning_kd.callbacks.feature_hooks import FeatureHooks, find_layer
from lightning_kd.callbacks.knn_probe import KNNProbe
from lightning_kd.callbacks.loss_weights import LossWeightSchedule
from lightning_kd.callbacks.quantization import (
    QuantizationAwareTraining,
    convert_to_int8,
    evaluate_int8,
    post_training_int8,
    prepare_qat,
    restore_qat_student,
)
from lightning_kd.callbacks.report import DistillationReport
from lightning_kd.callbacks.reproducible_order import ReproducibleOrder
from lightning_kd.callbacks.scheduled_value import ScheduledValue, schedule_value
from lightning_kd.callbacks.stages import DistillationStages, Stage
from lightning_kd.callbacks.temperature import TemperatureAnnealing
from lightning_kd.callbacks.temperature_entropy import TemperatureEntropyReport

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
