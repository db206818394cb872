r"""Distillation inside transformers: hidden states (TinyBERT), attention maps and value relations (MiniLM).

Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu, "TinyBERT: Distilling BERT for Natural Language
Understanding", Findings of EMNLP 2020, Eq. 8-9: :math:`\mathcal{L}_{hidn} = \mathrm{MSE}(H^S W_h, H^T)`.
Wang, Wei, Dong, Bao, Yang, Zhou, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers", NeurIPS 2020, Eq. 7-9:

.. math::
    \mathcal{L}_{AT} = \frac{1}{A_h |x|} \sum_{a, t} D_{KL}(A^T_{a,t} \,\|\, A^S_{a,t}), \qquad
    \mathcal{L}_{VR} = \frac{1}{A_h |x|} \sum_{a, t} D_{KL}(VR^T_{a,t} \,\|\, VR^S_{a,t})

The terms read token states and attention maps from the models' outputs
(``StepOutputs.student_output`` / ``teacher_output``: a Hugging Face ``ModelOutput`` or the dict of
:class:`~lightning_kd.models.sentence_encoder.SentenceEncoder`), and the batch's attention mask, so
padded tokens never enter a loss. Value vectors are not part of any output: :class:`ValueRelationTerm`
hooks the value projections by dotted path instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.hooks import find_layer
from lightning_kd.losses._checks import _check_same_shape
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = [
    "attention_kl_loss",
    "attention_mask_of",
    "AttentionMapTerm",
    "hidden_state_loss",
    "HiddenStateTerm",
    "model_output_field",
    "uniform_mapping",
    "value_relation_loss",
    "ValueRelationTerm",
]


def _real_tokens(attention_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """``attention_mask`` as a boolean ``(N, L)`` tensor (all True when ``None``), checked."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the token states need "
            f"({batch}, {length}): pass the batch's attention_mask (1 for real tokens, 0 for padding)."
        )
    real = attention_mask.bool()
    if not real.any(dim=1).all():
        raise ValueError(
            "attention_mask marks no real token in some sequence: every sequence needs at least one "
            "token with mask 1 (drop empty sentences from the dataset)."
        )
    return real


@float32_math
def hidden_state_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    r"""TinyBERT hidden-state loss: mean squared error between token states, over real tokens only.

    Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
    EMNLP 2020, Eq. 8: :math:`\mathcal{L}_{hidn} = \mathrm{MSE}(H^S W_h, H^T)`; with
    :math:`H^S = E^S` and :math:`H^T = E^T` it is their embedding-layer loss (Eq. 9). The
    projection :math:`W_h` onto the teacher's width belongs to the loss term
    (:class:`~lightning_kd.losses.transformer.HiddenStateTerm`); pass its output here. Unlike the
    authors' code (an MSE over every position), padded positions are left out.

    Args:
        student_hidden: ``(N, L, D)`` token states of the student (after the projection).
        teacher_hidden: ``(N, L, D)`` token states of the teacher.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: every token is real.

    Returns:
        Scalar: the mean of :math:`(h^S - h^T)^2` over real tokens and the ``D`` features.
    """
    _check_same_shape(
        "student_hidden",
        student_hidden,
        "teacher_hidden",
        teacher_hidden,
        hint="Project the student's states onto the teacher's width (HiddenStateTerm does) and tokenize "
        "both models' inputs with the same tokenizer.",
    )
    if student_hidden.ndim != 3:
        raise ValueError(f"Token states must be (N, L, D), got shape {tuple(student_hidden.shape)}.")
    real = _real_tokens(attention_mask, *student_hidden.shape[:2], student_hidden.device)
    per_token = (student_hidden - teacher_hidden).pow(2).mean(dim=-1)
    return torch.where(real, per_token, 0.0).sum() / real.sum()


def _masked_attention_kl(teacher_probs: Tensor, student_log_probs: Tensor, real: Tensor) -> Tensor:
    """``KL(teacher || student)`` per ``(N, H, L, L)`` row over real keys; mean over heads, real queries."""
    pointwise = torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * student_log_probs
    keep = (teacher_probs > 0) & real[:, None, None, :]
    rows = torch.where(keep, pointwise, 0.0).sum(dim=-1)
    queries = real[:, None, :].expand_as(rows)
    return torch.where(queries, rows, 0.0).sum() / queries.sum()


@float32_math
def attention_kl_loss(
    student_attention: Tensor, teacher_attention: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    r"""MiniLM self-attention distribution transfer: KL from the teacher's attention rows to the student's.

    Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
    Pre-Trained Transformers", NeurIPS 2020, Eq. 7:
    :math:`\mathcal{L}_{AT} = \frac{1}{A_h |x|} \sum_{a=1}^{A_h} \sum_{t=1}^{|x|}
    D_{KL}(A^T_{a,t} \,\|\, A^S_{a,t})`, on the attention distributions
    :math:`A = \mathrm{softmax}(QK^\top / \sqrt{d_k})` of the last layer (the probabilities that
    Hugging Face models return with ``output_attentions=True``). Rows (queries) and columns (keys)
    of padded tokens are left out; the mean runs over heads and the real queries of the whole
    batch. Student probabilities are clamped at the smallest positive float before the logarithm,
    so a zero where the teacher also puts zero gives no NaN gradient.

    Args:
        student_attention: ``(N, H, L, L)`` attention probabilities of the student (rows sum to 1).
        teacher_attention: ``(N, H, L, L)`` attention probabilities of the teacher, same heads.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: every token is real.

    Returns:
        Scalar >= 0: the KL divergence in nats, averaged over heads and real query tokens.
    """
    _check_same_shape(
        "student_attention",
        student_attention,
        "teacher_attention",
        teacher_attention,
        hint="Student and teacher need the same number of attention heads (build the student with the "
        "teacher's num_attention_heads) and inputs from the same tokenizer.",
    )
    if student_attention.ndim != 4 or student_attention.shape[-1] != student_attention.shape[-2]:
        raise ValueError(f"Attention maps must be (N, H, L, L), got shape {tuple(student_attention.shape)}.")
    n, _, length, _ = student_attention.shape
    real = _real_tokens(attention_mask, n, length, student_attention.device)
    student_log_probs = student_attention.clamp_min(torch.finfo(student_attention.dtype).tiny).log()
    return _masked_attention_kl(teacher_attention, student_log_probs, real)


def _value_relation_log_probs(values: Tensor, num_heads: int, real: Tensor) -> Tensor:
    """``log_softmax(V_a V_a^T / sqrt(d_k))`` per head ``a`` of ``(N, L, D)`` values, padded keys masked."""
    n, length, width = values.shape
    per_head = values.reshape(n, length, num_heads, width // num_heads).transpose(1, 2)
    scores = per_head @ per_head.transpose(-1, -2) / math.sqrt(width // num_heads)
    scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


@float32_math
def value_relation_loss(
    student_values: Tensor, teacher_values: Tensor, num_heads: int, attention_mask: Tensor | None = None
) -> Tensor:
    r"""MiniLM value-relation transfer: KL between the scaled dot-products of values, per head.

    Wang et al., "MiniLM", NeurIPS 2020, Eq. 8-9: :math:`VR_a = \mathrm{softmax}(V_a V_a^\top /
    \sqrt{d_k})` for each head :math:`a` of the last layer's values, and
    :math:`\mathcal{L}_{VR} = \frac{1}{A_h |x|} \sum_a \sum_t D_{KL}(VR^T_{a,t} \,\|\, VR^S_{a,t})`.
    Both models' values are split into the same ``num_heads`` heads, each with its own
    :math:`d_k = D / \text{num\_heads}`, so the student may be narrower (with MiniLMv2's relation
    heads, ``num_heads`` may differ from the models' attention heads). Padded tokens are left out as
    keys (masked before the softmax) and as queries; the mean runs over heads and real queries.

    Args:
        student_values: ``(N, L, D_s)`` value vectors (the output of the last layer's value projection).
        teacher_values: ``(N, L, D_t)`` value vectors of the teacher.
        num_heads: heads to split both into; must divide ``D_s`` and ``D_t``.
        attention_mask: ``(N, L)``, 1 for real tokens and 0 for padding; ``None``: every token is real.

    Returns:
        Scalar >= 0: the KL divergence in nats, averaged over heads and real query tokens.
    """
    same_tokens = student_values.shape[:2] == teacher_values.shape[:2]
    if student_values.ndim != 3 or teacher_values.ndim != 3 or not same_tokens:
        raise ValueError(
            f"student_values {tuple(student_values.shape)} and teacher_values {tuple(teacher_values.shape)} "
            "must both be (N, L, D) for the same N sentences of L tokens (same tokenizer for both models)."
        )
    for name, values in (("student_values", student_values), ("teacher_values", teacher_values)):
        if num_heads < 1 or values.shape[-1] % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the width {values.shape[-1]} of {name}: pick a number "
                "of relation heads that divides both models' hidden sizes."
            )
    n, length, _ = student_values.shape
    real = _real_tokens(attention_mask, n, length, student_values.device)
    teacher_probs = _value_relation_log_probs(teacher_values, num_heads, real).exp()
    student_log_probs = _value_relation_log_probs(student_values, num_heads, real)
    return _masked_attention_kl(teacher_probs, student_log_probs, real)


#: how to make a model return each field
_FIELD_FIXES = {
    "hidden_states": "output_hidden_states=True (SentenceEncoder(..., output_hidden_states=True), or "
    "config.output_hidden_states=True for a Hugging Face model)",
    "attentions": "output_attentions=True and the eager attention "
    "(SentenceEncoder(..., output_attentions=True) sets both; for a Hugging Face model, "
    "from_pretrained(..., attn_implementation='eager') and "
    "config.output_attentions=True: SDPA attention returns no maps)",
}


def model_output_field(output: Any, field: str, term: str, role: str) -> tuple[Tensor, ...]:
    """``output[field]`` / ``output.field`` (a tuple over layers), or an error naming the flag to set."""
    value = output.get(field) if isinstance(output, Mapping) else getattr(output, field, None)
    if not value:
        raise ValueError(
            f"Loss term {term!r} reads the {role}'s {field}, but its output has none. Build the {role} with "
            f"{_FIELD_FIXES.get(field, field + ' in its output')}."
        )
    return tuple(value)


def attention_mask_of(outputs: StepOutputs, mask_key: str | None, term: str) -> Tensor | None:
    """The batch's attention mask (``batch[mask_key]``), or ``None`` when ``mask_key`` is ``None``."""
    if mask_key is None:
        return None
    if not isinstance(outputs.batch, Mapping) or mask_key not in outputs.batch:
        keys = list(outputs.batch) if isinstance(outputs.batch, Mapping) else type(outputs.batch).__name__
        raise KeyError(
            f"Loss term {term!r} masks padding with batch[{mask_key!r}], but the batch has {keys}. "
            "Yield dict batches with the tokenizer's attention_mask, set mask_key to its key, or "
            "mask_key=None when nothing is padded."
        )
    return outputs.batch[mask_key]


def uniform_mapping(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform layer mapping ``g(m) = m * N / M``, ``m = 0 .. M``, as ``(student, teacher)`` pairs.

    Jiao et al., "TinyBERT", Findings of EMNLP 2020, Sec. 3.1: index 0 is the embedding layer's output
    (``g(0) = 0``), index ``m`` the output of transformer layer ``m``, as in Hugging Face's
    ``hidden_states`` tuples. 2 student and 6 teacher layers: ``[(0, 0), (1, 3), (2, 6)]``.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(
            f"The uniform mapping needs 1 <= student layers <= teacher layers, got {student_layers} and "
            f"{teacher_layers}; pass `layers` explicitly."
        )
    return [(m, m * teacher_layers // student_layers) for m in range(student_layers + 1)]


class HiddenStateTerm(LossTerm):
    """TinyBERT hidden-state (and embedding-layer) distillation over a layer mapping.

    Jiao et al., "TinyBERT", Findings of EMNLP 2020, Eq. 8-9: for each pair ``(m, g(m))``,
    :func:`~lightning_kd.losses.functional.hidden_state_loss` between ``W_h H^S_m`` and
    ``H^T_{g(m)}`` over real tokens; the term is the sum over pairs (as the authors' code sums
    ``rep_loss``). ``W_h`` is one ``Linear(D_s, D_t)`` shared by all pairs (the authors'
    ``fit_dense``), built on the probe batch when the widths differ and trained with the student.
    The states are the models' ``hidden_states`` (``output_hidden_states=True``): index 0 is the
    embedding layer's output, index ``m`` transformer layer ``m``.

    Args:
        name: key of the term.
        weight: factor in the total loss.
        layers: ``(student_index, teacher_index)`` pairs into the ``hidden_states`` tuples; default
            :func:`uniform_mapping` (embeddings included).
        mask_key: key of the attention mask in the (dict) batch; ``None``: no padding.
        projection: the module mapping student states onto the teacher's width; default: built.
    """

    adapter_attributes = {"projection": "projection"}

    def __init__(
        self,
        name: str = "hidden",
        weight: float = 1.0,
        layers: Sequence[Sequence[int]] | None = None,
        mask_key: str | None = "attention_mask",
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__(name, weight)
        if layers is not None and not all(len(pair) == 2 for pair in layers):
            raise ValueError(f"layers must be (student_index, teacher_index) pairs, got {layers}.")
        self.layers = [tuple(int(i) for i in pair) for pair in layers] if layers is not None else None
        self.mask_key = mask_key
        self.projection = projection

    def build(self, outputs: StepOutputs) -> None:
        """A ``Linear(D_s, D_t)`` when the widths differ, else the identity."""
        student = model_output_field(outputs.student_output, "hidden_states", self.name, "student")
        teacher = model_output_field(outputs.teacher_output, "hidden_states", self.name, "teacher")
        width_s, width_t = student[0].shape[-1], teacher[0].shape[-1]
        self.projection = nn.Identity() if width_s == width_t else nn.Linear(width_s, width_t)
        self.projection.to(student[0].device)

    def mapping(self, student_states: int, teacher_states: int) -> list[tuple[int, int]]:
        """The ``(student, teacher)`` index pairs, checked against the numbers of states."""
        pairs = self.layers or uniform_mapping(student_states - 1, teacher_states - 1)
        for s, t in pairs:
            if not (-student_states <= s < student_states and -teacher_states <= t < teacher_states):
                raise IndexError(
                    f"Loss term {self.name!r}: pair ({s}, {t}) is outside the student's {student_states} and "
                    f"the teacher's {teacher_states} hidden states (index 0 is the embedding output)."
                )
        return pairs

    def forward(self, outputs: StepOutputs) -> Tensor:
        """Sum over the mapped pairs of the masked MSE between projected student and teacher states."""
        projection = self.built_adapter("projection")
        student = model_output_field(outputs.student_output, "hidden_states", self.name, "student")
        teacher = model_output_field(outputs.teacher_output, "hidden_states", self.name, "teacher")
        mask = attention_mask_of(outputs, self.mask_key, self.name)
        losses = [
            hidden_state_loss(projection(student[s]), teacher[t].detach(), mask)
            for s, t in self.mapping(len(student), len(teacher))
        ]
        return sum(losses[1:], losses[0])

    def extra_repr(self) -> str:
        """Name, weight and layer pairs."""
        return f"{super().extra_repr()}, layers={self.layers or 'uniform'}"


class AttentionMapTerm(LossTerm):
    """MiniLM self-attention distribution transfer on one layer pair (default: the last layers).

    Wang et al., "MiniLM", NeurIPS 2020, Eq. 7: see
    :func:`~lightning_kd.losses.functional.attention_kl_loss` (KL from the teacher's attention
    rows to the student's, per head, over real tokens). The maps are the models' ``attentions``
    (``output_attentions=True`` with the eager attention). Hugging Face returns the maps after the
    attention dropout: train the student with ``attention_probs_dropout_prob=0``
    (:class:`~lightning_kd.models.sentence_encoder.SentenceEncoder` sets it with
    ``output_attentions=True``), or the dropped entries enter the KL. MiniLM needs the same number
    of heads; ``average_heads=True`` compares the head-averaged maps instead, for students with
    fewer heads.

    Args:
        name: key of the term.
        weight: factor in the total loss.
        student_layer: index into the student's ``attentions`` (``-1``: the last layer).
        teacher_layer: index into the teacher's ``attentions``.
        mask_key: key of the attention mask in the (dict) batch; ``None``: no padding.
        average_heads: average each model's maps over heads before the KL.
    """

    def __init__(
        self,
        name: str = "attention",
        weight: float = 1.0,
        student_layer: int = -1,
        teacher_layer: int = -1,
        mask_key: str | None = "attention_mask",
        average_heads: bool = False,
    ) -> None:
        super().__init__(name, weight)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.mask_key = mask_key
        self.average_heads = average_heads

    def forward(self, outputs: StepOutputs) -> Tensor:
        """KL(teacher || student) of the attention rows, averaged over heads and real tokens."""
        student = model_output_field(outputs.student_output, "attentions", self.name, "student")
        teacher = model_output_field(outputs.teacher_output, "attentions", self.name, "teacher")
        try:
            student_map, teacher_map = student[self.student_layer], teacher[self.teacher_layer].detach()
        except IndexError:
            raise IndexError(
                f"Loss term {self.name!r}: layers ({self.student_layer}, {self.teacher_layer}) are outside "
                f"the student's {len(student)} and the teacher's {len(teacher)} attention maps."
            ) from None
        if self.average_heads:
            student_map = student_map.mean(dim=1, keepdim=True)
            teacher_map = teacher_map.mean(dim=1, keepdim=True)
        mask = attention_mask_of(outputs, self.mask_key, self.name)
        return attention_kl_loss(student_map, teacher_map, mask)

    def extra_repr(self) -> str:
        """Name, weight and layers."""
        return (
            f"{super().extra_repr()}, student_layer={self.student_layer}, teacher_layer={self.teacher_layer}"
        )


class ValueRelationTerm(LayerPairTerm):
    """MiniLM value-relation transfer between the value projections of one student and one teacher layer.

    Wang et al., "MiniLM", NeurIPS 2020, Eq. 8-9: see
    :func:`~lightning_kd.losses.functional.value_relation_loss`. The value vectors are captured by
    forward hooks on the two value projections, by dotted path (for a
    :class:`~lightning_kd.models.sentence_encoder.SentenceEncoder` over BERT with 6 layers:
    ``"model.encoder.layer.5.attention.self.value"``). ``num_heads`` defaults to the teacher's
    ``config.num_attention_heads`` (MiniLM); any number dividing both widths works (MiniLMv2's
    relation heads).

    Args:
        student_layer: dotted path of the student's value projection.
        teacher_layer: dotted path of the teacher's value projection.
        name: key of the term.
        weight: factor in the total loss.
        num_heads: relation heads for both models; default: the teacher's attention heads.
        mask_key: key of the attention mask in the (dict) batch; ``None``: no padding.
    """

    #: the number of relation heads, read from the teacher in :meth:`bind` when not given.
    adapter_attributes = {"num_heads": "num_heads"}

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        name: str = "value_relation",
        weight: float = 1.0,
        num_heads: int | None = None,
        mask_key: str | None = "attention_mask",
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        self.num_heads = num_heads
        self.mask_key = mask_key

    def bind(self, student: nn.Module, teacher: nn.Module | None, terms: Mapping[str, LossTerm]) -> None:
        """Check both layer paths and take ``num_heads`` from the teacher's config when unset."""
        find_layer(student, self.student_layer, "student")
        if teacher is None:
            raise ValueError(f"Loss term {self.name!r} needs a teacher.")
        find_layer(teacher, self.teacher_layer, "teacher")
        if self.num_heads is None:
            heads = getattr(getattr(teacher, "config", None), "num_attention_heads", None)
            if heads is None:
                raise ValueError(
                    f"Loss term {self.name!r}: the teacher has no config.num_attention_heads; "
                    "pass num_heads=."
                )
            self.num_heads = int(heads)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """KL(teacher || student) of the value relations, averaged over heads and real tokens."""
        num_heads = self.built_adapter("num_heads")
        student, teacher = self.pair(outputs)
        mask = attention_mask_of(outputs, self.mask_key, self.name)
        return value_relation_loss(student, teacher, num_heads, mask)

    def extra_repr(self) -> str:
        """Name, weight, layers and heads."""
        return f"{super().extra_repr()}, num_heads={self.num_heads}"
