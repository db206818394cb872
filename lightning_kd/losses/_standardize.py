r"""Logit standardization: every row of logits replaced by its Z-score before the temperature softmax.

Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024:

.. math::
    \mathcal{Z}(z) = \frac{z - \bar z}{\epsilon + \sigma(z)}, \qquad
    \bar z = \frac{1}{C} \sum_c z_c, \quad
    \sigma(z) = \Big(\frac{1}{C - 1} \sum_c (z_c - \bar z)^2\Big)^{1/2}, \quad \epsilon = 10^{-7}

exactly as the authors' ``normalize`` (``mdistiller/distillers/KD.py``, ``DKD.py`` and ``MLKD.py`` of
``sunshangquan/logit-standardization-KD``): ``Tensor.std``'s default, i.e. the *unbiased* standard
deviation (Bessel's correction), and :math:`\epsilon` added to the std, not under the square root.
The losses then divide :math:`\mathcal{Z}(z)` by their (base) temperature as before.
"""

from __future__ import annotations

from torch import Tensor

from lightning_kd.losses._checks import _check_num_classes

__all__ = ["STANDARDIZE_EPS", "standardize_logits"]

#: added to the standard deviation, as in the authors' code.
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """Z-score over the last dimension: ``(z - mean) / (1e-7 + std)``, std with Bessel's correction.

    Raises:
        ValueError: fewer than 2 classes (the std of one value is undefined).
    """
    _check_num_classes(logits, 2, "for logit standardization (the std of one value is undefined)")
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)  # unbiased (correction=1), like the authors' code
    return (logits - mean) / (STANDARDIZE_EPS + std)
