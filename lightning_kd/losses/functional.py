"""The pure math of every distillation loss: tensors in, scalar out, no state.

An index in the style of :mod:`torch.nn.functional`: each function lives in its method's file
(``kd_loss`` in :mod:`lightning_kd.losses.kd`, ``crd_loss`` in :mod:`lightning_kd.losses.crd`, ...)
next to the loss term that uses it. Every function runs in float32, also under ``bf16-mixed`` /
``16-mixed`` autocast: low-precision softmax and logarithms lose the small probability mass that
soft targets carry. Reductions are documented per function.

Math that is not a distillation loss has moved: ``linear_cka``, ``soft_label_entropy`` and
``non_argmax_probability`` to :mod:`lightning_kd.callbacks.report.functional`; the data-free
generator losses ``dafl_*`` and ``bn_statistics_loss`` to
:mod:`lightning_kd.paradigms.generator_losses`. Their old names here still work (imported on
first access).
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_kd.losses.ab import ab_loss
from lightning_kd.losses.at import at_loss
from lightning_kd.losses.byot import byot_loss
from lightning_kd.losses.cc import cc_loss
from lightning_kd.losses.crd import crd_loss
from lightning_kd.losses.ctkd import ctkd_temperature, gradient_reversal
from lightning_kd.losses.dist import dist_loss
from lightning_kd.losses.dkd import dkd_loss
from lightning_kd.losses.embedding import embedding_match_loss
from lightning_kd.losses.fitnet import fitnet_loss
from lightning_kd.losses.fsp import fsp_loss
from lightning_kd.losses.ft import ft_loss
from lightning_kd.losses.kd import kd_loss
from lightning_kd.losses.lupi import generalized_distillation_loss
from lightning_kd.losses.mlkd import batch_correlation_loss, class_correlation_loss, mlkd_loss
from lightning_kd.losses.multi_teacher import confidence_weights, ensemble_log_probs, multi_teacher_kd_loss
from lightning_kd.losses.nst import nst_loss
from lightning_kd.losses.ofd import ofd_loss, ofd_margin
from lightning_kd.losses.pkt import pkt_loss
from lightning_kd.losses.reviewkd import hcl_loss
from lightning_kd.losses.rkd import rkd_loss
from lightning_kd.losses.seed import seed_loss
from lightning_kd.losses.sp import sp_loss
from lightning_kd.losses.token_cross_entropy import token_cross_entropy, token_cross_entropy_fused
from lightning_kd.losses.token_divergence import (
    token_divergence,
    token_divergence_chunked,
    token_divergence_fused,
)
from lightning_kd.losses.transformer import attention_kl_loss, hidden_state_loss, value_relation_loss
from lightning_kd.losses.uld import uld_loss
from lightning_kd.losses.vid import vid_loss

#: names that left this module, and the module that holds each now (imported on first access:
#: importing them here would make ``lightning_kd.losses`` depend on callbacks and paradigms).
_MOVED = {
    "linear_cka": "lightning_kd.callbacks.report.functional",
    "non_argmax_probability": "lightning_kd.callbacks.report.functional",
    "soft_label_entropy": "lightning_kd.callbacks.report.functional",
    "bn_statistics_loss": "lightning_kd.paradigms.generator_losses",
    "dafl_activation_loss": "lightning_kd.paradigms.generator_losses",
    "dafl_information_entropy_loss": "lightning_kd.paradigms.generator_losses",
    "dafl_one_hot_loss": "lightning_kd.paradigms.generator_losses",
}

__all__ = [
    "ab_loss",
    "at_loss",
    "attention_kl_loss",
    "byot_loss",
    "cc_loss",
    "confidence_weights",
    "crd_loss",
    "dist_loss",
    "batch_correlation_loss",
    "class_correlation_loss",
    "ctkd_temperature",
    "dkd_loss",
    "gradient_reversal",
    "mlkd_loss",
    "embedding_match_loss",
    "ensemble_log_probs",
    "fitnet_loss",
    "fsp_loss",
    "ft_loss",
    "generalized_distillation_loss",
    "hcl_loss",
    "hidden_state_loss",
    "kd_loss",
    "multi_teacher_kd_loss",
    "nst_loss",
    "ofd_loss",
    "ofd_margin",
    "pkt_loss",
    "rkd_loss",
    "seed_loss",
    "sp_loss",
    "token_cross_entropy",
    "token_cross_entropy_fused",
    "token_divergence",
    "token_divergence_chunked",
    "token_divergence_fused",
    "uld_loss",
    "value_relation_loss",
    "vid_loss",
]


def __getattr__(name: str) -> Any:
    """The moved names of :data:`_MOVED`, imported from their new module on first access (PEP 562)."""
    if name in _MOVED:
        value = getattr(importlib.import_module(_MOVED[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The loss functions and the moved names."""
    return sorted([*globals(), *_MOVED])
