"""Loss terms inside transformers: hidden states (TinyBERT), attention maps and value relations (MiniLM).

The terms read token states and attention maps from the models' outputs
(``StepOutputs.student_output`` / ``teacher_output``: a Hugging Face ``ModelOutput`` or the dict of
:class:`~lightning_kd.models.sentence_encoder.SentenceEncoder`), and the batch's attention mask, so
padded tokens never enter a loss. Value vectors are not part of any output: :class:`ValueRelationTerm`
hooks the value projections by dotted path instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_kd.callbacks.feature_hooks import find_layer
from lightning_kd.losses import functional
from lightning_kd.losses.base import LayerPairTerm, LossTerm, StepOutputs, first_tensor

__all__ = [
    "AttentionMapTerm",
    "HiddenStateTerm",
    "ValueRelationTerm",
    "model_output_field",
    "uniform_mapping",
]

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

    @property
    def needs_build(self) -> bool:
        """Until the projection exists (an identity when the widths match)."""
        return self.projection is None

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
        if self.projection is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no projection yet: the module builds it in setup()."
            )
        student = model_output_field(outputs.student_output, "hidden_states", self.name, "student")
        teacher = model_output_field(outputs.teacher_output, "hidden_states", self.name, "teacher")
        mask = attention_mask_of(outputs, self.mask_key, self.name)
        losses = [
            functional.hidden_state_loss(self.projection(student[s]), teacher[t].detach(), mask)
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
        return functional.attention_kl_loss(student_map, teacher_map, mask)

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

    @property
    def needs_build(self) -> bool:
        """Until the number of heads is known (read from the teacher in :meth:`bind`)."""
        return self.num_heads is None

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
        if self.num_heads is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no num_heads yet: the module reads it in setup()."
            )
        student, teacher = self.pair(outputs)
        mask = attention_mask_of(outputs, self.mask_key, self.name)
        return functional.value_relation_loss(first_tensor(student), teacher, self.num_heads, mask)

    def extra_repr(self) -> str:
        """Name, weight, layers and heads."""
        return f"{super().extra_repr()}, num_heads={self.num_heads}"
