"""Report callbacks: what distillation did, measured on validation data, as files, metrics and figures.

Each report is one callback in its own module; :mod:`~lightning_kd.callbacks.report.io` holds what
they share (where files go, collecting validation logits, logging metrics and figures) and
:mod:`~lightning_kd.callbacks.report.functional` their math as plain tensor functions.
"""

from lightning_kd.callbacks.report.cka import CKAReport
from lightning_kd.callbacks.report.class_agreement import (
    ClassAgreementReport,
    ClassChanges,
    agreement_figure,
    gain_figure,
)
from lightning_kd.callbacks.report.compression import (
    CompressionReport,
    ModelCost,
    checkpoint_bytes,
    compression_table,
    count_macs,
    count_parameters,
    latency_ms,
    measure,
)
from lightning_kd.callbacks.report.distillation import DistillationReport
from lightning_kd.callbacks.report.functional import (
    linear_cka,
    linear_probe_accuracy,
    non_argmax_probability,
    per_class_accuracy,
    reliability_bins,
    soft_label_entropy,
    weighted_knn_scores,
)
from lightning_kd.callbacks.report.io import (
    beside_checkpoints,
    collect_logits,
    log_metrics,
    output_directory,
    save_and_log_figure,
    validation_loader,
)
from lightning_kd.callbacks.report.knn_probe import KNNProbe, embed_dataset
from lightning_kd.callbacks.report.temperature_entropy import TemperatureEntropyReport

__all__ = [
    "CKAReport",
    "ClassAgreementReport",
    "ClassChanges",
    "CompressionReport",
    "DistillationReport",
    "KNNProbe",
    "ModelCost",
    "TemperatureEntropyReport",
    "agreement_figure",
    "beside_checkpoints",
    "checkpoint_bytes",
    "collect_logits",
    "compression_table",
    "count_macs",
    "count_parameters",
    "embed_dataset",
    "gain_figure",
    "latency_ms",
    "linear_cka",
    "linear_probe_accuracy",
    "log_metrics",
    "measure",
    "non_argmax_probability",
    "output_directory",
    "per_class_accuracy",
    "reliability_bins",
    "save_and_log_figure",
    "soft_label_entropy",
    "validation_loader",
    "weighted_knn_scores",
]
