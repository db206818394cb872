r"""Curriculum temperature (CTKD): a temperature learned adversarially through a gradient-reversal layer.

Li, Li, Yang, Zhang, Li, Song, Wang, Zhang, "Curriculum Temperature for Knowledge Distillation",
AAAI 2023. The temperature :math:`\tau = \tau_{min} + \tau_{range}\, \sigma(\theta)` is trained to
*maximise* the distillation loss that the student minimises: its gradient passes a
gradient-reversal layer (Ganin & Lempitsky, 2015) that multiplies it by :math:`-\lambda`, and
:math:`\lambda` grows from 0 to 1 on a cosine curriculum
(:class:`~lightning_kd.callbacks.ReversalStrengthSchedule`):

.. math::
    \min_{s} \max_{\theta} \mathcal{L}_{KD}(s; \tau(\theta)), \qquad
    \lambda_e = \tfrac12 \big(1 - \cos(\pi \min(e / E, 1))\big)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_kd.losses._checks import _check_positive
from lightning_kd.losses.base import LossTerm, StepOutputs

__all__ = ["CTKDTerm", "InstanceTemperature", "ctkd_temperature", "gradient_reversal"]


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def gradient_reversal(x: Tensor, strength: float) -> Tensor:
    r"""Gradient-reversal layer: ``x`` forward, :math:`-\lambda\, \partial L / \partial x` backward.

    Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015. CTKD's
    code writes the same layer as ``dx = lambda_ * grads`` with a ``lambda_`` that decays from 0 to
    -1 (``CosineDecay(max_value=0, min_value=-1)``); here ``strength`` is its magnitude, from 0 to 1.
    """
    return _GradientReversal.apply(x, float(strength))


def ctkd_temperature(raw: Tensor, strength: float, t_min: float = 1.0, t_range: float = 20.0) -> Tensor:
    r"""CTKD's temperature :math:`\tau_{min} + \tau_{range}\, \sigma(\mathrm{GRL}_\lambda(\theta))`.

    As ``train_student.py`` / ``helper/loops.py`` of ``zhengli97/CTKD``
    (``temp = opt.t_start + opt.t_end * torch.sigmoid(temp)``, ``t_start=1``, ``t_end=20``): the
    temperature lies in :math:`(\tau_{min}, \tau_{min} + \tau_{range})` and its gradient is reversed.

    Args:
        raw: the learned value(s) :math:`\theta`, any shape.
        strength: the reversal strength :math:`\lambda \ge 0`.
        t_min: the lowest temperature.
        t_range: the width of the temperature's range.
    """
    return t_min + t_range * torch.sigmoid(gradient_reversal(raw, strength))


class InstanceTemperature(nn.Module):
    """One raw temperature per sample, from the two models' predictions (CTKD's instance-wise variant).

    As the ``Instance_MLP`` of the CTKD reimplementation in mdistiller: the teacher's ``top_k``
    largest probabilities and the student's probabilities of the same classes (detached: the
    temperature module does not train the models through its input), then
    ``Linear(2k, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, 1)``, the last layer
    initialised to 0 (every sample starts at the middle of the range).

    Args:
        top_k: how many classes are read (at most the number of classes).
        hidden: the hidden width.
    """

    def __init__(self, top_k: int, hidden: int = 256) -> None:
        super().__init__()
        self.top_k = top_k
        self.net = nn.Sequential(
            nn.Linear(2 * top_k, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``(N,)`` raw temperatures of ``(N, C)`` logits."""
        p_teacher = torch.softmax(teacher_logits.detach().float(), dim=-1)
        p_student = torch.softmax(student_logits.detach().float(), dim=-1)
        top, index = p_teacher.topk(self.top_k, dim=-1)
        return self.net(torch.cat([top, p_student.gather(-1, index)], dim=-1)).squeeze(-1)


class CTKDTerm(LossTerm):
    r"""Curriculum temperature (Li et al., AAAI 2023): a logit term at a temperature learned adversarially.

    Wraps a term that has ``loss_at_temperature(outputs, temperature)``
    (:class:`~lightning_kd.KDTerm`, :class:`~lightning_kd.DKDTerm`, their ``standardize`` variants)
    and computes it at the learned temperature :func:`ctkd_temperature` instead of the wrapped
    term's own ``temperature`` (the wrapped term's ``weight`` is not used: this term's is).
    ``temperature="global"`` learns one temperature (the authors' ``Global_T``, :math:`\theta`
    initialised to 1, i.e. :math:`\tau \approx 15.6`);
    ``"instance"`` one per sample from :class:`InstanceTemperature`, built on the probe batch. The
    temperature's parameters train with the student's optimizer (the authors' SGD holds both);
    ``strength`` (:math:`\lambda`) is set by :class:`~lightning_kd.callbacks.ReversalStrengthSchedule`.
    The temperature of the last step is kept (detached) in :attr:`last_temperature`.

    Args:
        term: the wrapped logit term.
        name: key of the term.
        weight: factor in the total loss (the authors' ``-a 0.9`` with CE at 0.1 for KD).
        temperature: ``"global"`` or ``"instance"``.
        t_min: the lowest temperature (the authors' ``t_start``: 1).
        t_range: the width of the range (the authors' ``t_end``: 20).
        strength: the reversal strength :math:`\lambda` to start with (0: the curriculum's start).
        top_k: for ``"instance"``: classes read per sample (default: all).
        hidden: for ``"instance"``: the hidden width.

    Raises:
        TypeError: ``term`` cannot be computed at a given temperature.
        ValueError: an unknown ``temperature`` mode, ``t_min`` or ``t_range`` <= 0, or ``strength`` < 0.
    """

    adapter_attributes: ClassVar[dict[str, str]] = {"instance_temperature": "instance temperature module"}

    def __init__(
        self,
        term: LossTerm,
        name: str = "ctkd",
        weight: float = 1.0,
        temperature: Literal["global", "instance"] = "global",
        t_min: float = 1.0,
        t_range: float = 20.0,
        strength: float = 0.0,
        top_k: int | None = None,
        hidden: int = 256,
    ) -> None:
        super().__init__(name, weight)
        if not callable(getattr(term, "loss_at_temperature", None)):
            raise TypeError(
                f"CTKDTerm {name!r} wraps a term that it computes at a learned temperature, but "
                f"{type(term).__name__} has no loss_at_temperature(outputs, temperature); wrap KDTerm or "
                "DKDTerm."
            )
        if temperature not in ("global", "instance"):
            raise ValueError(
                f"CTKDTerm {name!r}: temperature must be 'global' or 'instance', got {temperature!r}."
            )
        _check_positive("t_min", t_min)
        _check_positive("t_range", t_range)
        self.term = term
        self.mode = temperature
        self.t_min = float(t_min)
        self.t_range = float(t_range)
        self.strength = strength
        self.top_k = top_k
        self.hidden = hidden
        self.global_temperature = nn.Parameter(torch.ones(1)) if temperature == "global" else None
        self.instance_temperature: InstanceTemperature | None = None
        self.last_temperature: Tensor | None = None

    @property
    def strength(self) -> float:
        r"""The gradient reversal's strength :math:`\lambda` (>= 0)."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        value = float(value)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"CTKDTerm {self.name!r}: strength must be a finite number >= 0, got {value}.")
        self._strength = value

    @property
    def needs_build(self) -> bool:
        """Only the instance-wise temperature is built (on the probe batch)."""
        return self.mode == "instance" and self.instance_temperature is None

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        """As the wrapped term."""
        return self.term.needs_teacher

    @property
    def student_layers(self) -> tuple[str, ...]:
        """As the wrapped term."""
        return self.term.student_layers

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """As the wrapped term."""
        return self.term.teacher_layers

    def build(self, outputs: StepOutputs) -> None:
        """The instance-wise temperature module, sized by the number of classes."""
        self.term.build(outputs)
        if self.needs_build:
            num_classes = outputs.student_logits.shape[-1]
            top_k = num_classes if self.top_k is None else min(self.top_k, num_classes)
            self.instance_temperature = InstanceTemperature(top_k, self.hidden).to(
                outputs.student_logits.device
            )

    def learned_temperature(self, outputs: StepOutputs) -> Tensor:
        """The learned temperature of this step: ``(1,)`` global, or ``(N,)`` one per row of logits."""
        if self.mode == "global":
            raw = self.global_temperature
        else:
            module = self.built_adapter("instance_temperature")
            raw = module(outputs.student_logits, self.detached_teacher_logits(outputs))
        return ctkd_temperature(raw, self.strength, self.t_min, self.t_range)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """The wrapped term's loss, at the learned temperature."""
        temperature = self.learned_temperature(outputs)
        self.last_temperature = temperature.detach()
        return self.term.loss_at_temperature(outputs, temperature)

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        settings = (
            f"temperature={self.mode!r}, t_min={self.t_min}, t_range={self.t_range}, strength={self.strength}"
        )
        return f"{super().extra_repr()}, {settings}"
