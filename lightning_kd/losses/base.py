"""The contract between the training step and a loss term, and what every term shares.

:class:`LossTerm` owns the lifecycle of a term's adapters (the trainable parts that
:meth:`~LossTerm.build` sizes on a probe batch), the lookup of hooked features, and the errors
that say what to fix. :class:`LayerPairTerm` reads one student and one teacher layer,
:class:`LayerListTerm` several.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_kd.hooks import first_tensor
from lightning_kd.losses._checks import checked_temperature, checked_weight

__all__ = [
    "LayerListTerm",
    "LayerPairTerm",
    "LossTerm",
    "StepOutputs",
    "TokenOutputs",
    "checked_temperature",
    "checked_weight",
    "first_tensor",
    "modified_in_place_count",
    "weighted_total",
]


def weighted_total(values: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    r""":math:`\sum_k w_k v_k` of the terms' ``values``, one multiply-add (``torch.add``) per term.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("weighted_total needs at least one loss term's value.")
    names = iter(values)
    first = next(names)
    total = values[first] * weights[first]
    for name in names:
        total = torch.add(total, values[name], alpha=weights[name])
    return total


@dataclass
class TokenOutputs:
    """What a causal-LM step gives token-level terms, shifted once: position ``t`` predicts token ``t + 1``.

    The causal-LM module fills either the logits or, for terms that set
    :attr:`LossTerm.reads_hidden_states` (the fused LM-head path), the last hidden states and the
    output heads, so the student's full ``(N, L, V)`` logits are never formed.

    Attributes:
        mask: ``(N, L)`` bool, True where the token counts (its label is not -100 and it is inside
            the attention mask).
        targets: ``(N, L)`` int64 next-token ids, -100 where ``mask`` is False.
        vocab_size: the number of token ids both models share; divergences are taken over
            ``[..., :vocab_size]`` (the smaller vocabulary when one embedding is padded).
        student_logits: ``(N, L, V_s)``, or ``None`` on the fused path.
        teacher_logits: ``(N, L, V_t)`` (detached), or ``None`` on the fused path.
        student_hidden: ``(N, L, H_s)`` last hidden states, or ``None`` unless a term reads them.
        teacher_hidden: ``(N, L, H_t)``, detached, likewise.
        student_head: the student's output embedding (an ``nn.Linear``: weight ``(V_s, H_s)``), likewise.
        teacher_head: the teacher's output embedding, likewise.
        teacher_rows: the teacher's rows in a compact form that the chunked path decodes chunk by chunk
            (:class:`~lightning_kd.losses._token_chunks.DecodedRows`, e.g. a top-k store's), or ``None``;
            read where ``teacher_logits`` is ``None``.
    """

    mask: Tensor
    targets: Tensor
    vocab_size: int
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_hidden: Tensor | None = None
    teacher_hidden: Tensor | None = None
    student_head: nn.Module | None = None
    teacher_head: nn.Module | None = None
    teacher_rows: Any = None


@dataclass
class StepOutputs:
    """Everything a loss term may read from one training step.

    Attributes:
        student_logits: the student's predictions (its embeddings, in an
            :class:`~lightning_kd.EmbeddingDistillationModule`).
        targets: the labels of the batch (``None`` for unlabelled data).
        teacher_logits: the teacher's predictions (or embeddings); ``None`` without a teacher. They carry
            gradients only for a co-trained teacher; terms that distil into the student
            detach them.
        student_features: outputs of the student's hooked layers, by dotted path.
        teacher_features: outputs of the teacher's hooked layers, by dotted path.
        batch: the batch as the dataloader produced it.
        teacher_output: the teacher's output as its ``forward`` returned it (a tensor, a
            mapping such as a :class:`~lightning_kd.TeacherEnsemble`'s, or a Hugging
            Face ``ModelOutput``); ``None`` without a teacher.
        student_output: the student's output as its ``forward`` returned it.
        tokens: a causal-LM step's shifted token view (:class:`TokenOutputs`); ``None`` otherwise.
    """

    student_logits: Tensor
    targets: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_features: dict[str, Any] = field(default_factory=dict)
    teacher_features: dict[str, Any] = field(default_factory=dict)
    batch: Any = None
    teacher_output: Any = None
    student_output: Any = None
    tokens: TokenOutputs | None = None


class LossTerm(nn.Module):
    """A named, weighted term of the training objective.

    Subclasses implement :meth:`forward` (``StepOutputs -> scalar``) with the math of their
    method's ``*_loss`` function (also in :mod:`lightning_kd.losses.functional`), declare the
    layers they read in :attr:`student_layers` / :attr:`teacher_layers` (the module hooks
    exactly those), and own any trainable adapter they need. ``weight`` is an attribute that
    schedules (:class:`~lightning_kd.callbacks.LossWeightSchedule`) can change during training;
    every assignment is checked (finite and >= 0, :func:`checked_weight`).

    **Adapters.** A term whose trainable parts depend on the models' shapes names the
    attributes that :meth:`build` creates in :attr:`adapter_attributes` (attribute -> how
    messages call it) and sets them to ``None`` (or to a module given by the user) in
    ``__init__``. The base class then provides :attr:`needs_build` (true while any of them is
    ``None``) and :meth:`built_adapter` (the built attribute, or one ``RuntimeError`` saying how
    to build it). :meth:`captured_feature` reads a hooked layer's output.

    Args:
        name: key of the term; logged as ``train/loss_<name>``.
        weight: factor of the term in the total loss: finite and >= 0 (0 switches the term off).

    Raises:
        ValueError: the name is not an identifier, or the weight is negative or not finite.
    """

    #: whether the term reads the teacher's outputs (it then needs a teacher).
    needs_teacher: bool = True
    #: whether the term keeps its buffers identical across DDP processes itself (a memory bank
    #: updated with all-gathered samples); DDP then leaves them alone.
    synchronizes_own_buffers: bool = False
    #: whether the term reads :class:`TokenOutputs` hidden states and output heads instead of
    #: logits (the fused LM-head path); the causal-LM module then never forms the full logits.
    reads_hidden_states: bool = False
    #: the attributes that :meth:`build` (or :meth:`bind`) fills in, mapped to the words that
    #: messages use for them (``{"regressor": "regressor"}``); ``{}``: nothing to build.
    adapter_attributes: ClassVar[Mapping[str, str]] = {}

    def __init__(self, name: str, weight: float = 1.0) -> None:
        super().__init__()
        if not name.isidentifier():
            raise ValueError(
                f"Loss term name must be a Python identifier (letters, digits, _), got {name!r}."
            )
        self.name = name
        self.weight = weight

    @property
    def weight(self) -> float:
        """Factor of the term in the total loss (finite, >= 0)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = checked_weight(value, self.name)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """Dotted paths of the student layers whose outputs this term reads."""
        return ()

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """Dotted paths of the teacher layers whose outputs this term reads."""
        return ()

    @property
    def needs_build(self) -> bool:
        """Whether :meth:`build` must run (once, on a probe step): while an adapter attribute is None."""
        return any(getattr(self, attribute) is None for attribute in self.adapter_attributes)

    def bind(self, student: nn.Module, teacher: nn.Module | None, terms: Mapping[str, LossTerm]) -> None:
        """Read what the term needs from the models or its sibling terms, before :meth:`build`.

        For example the teacher's BatchNorm statistics (OFD) or the paraphraser another term
        owns (factor transfer). Called by :meth:`~lightning_kd.DistillationModule.build_terms`
        with the module's ``loss_terms``.
        """

    def build(self, outputs: StepOutputs) -> None:
        """Create trainable parts (adapters) from the shapes in ``outputs``.

        :class:`~lightning_kd.DistillationModule` calls this once in ``setup``, on the outputs
        of one probe batch (eval mode, no gradients), before the optimizer is created and
        before any strategy wraps the model, so the optimizer and DDP see the new parameters.
        """

    def forward(self, outputs: StepOutputs) -> Tensor:  # noqa: D102 - documented in the class
        raise NotImplementedError(f"{type(self).__name__} must implement forward(outputs) -> Tensor.")

    def built_adapter(self, attribute: str) -> Any:
        """The built adapter ``attribute`` (one of :attr:`adapter_attributes`).

        Raises:
            RuntimeError: it is still ``None`` (:meth:`unbuilt_error`).
        """
        value = getattr(self, attribute)
        if value is None:
            raise self.unbuilt_error(self.adapter_attributes.get(attribute, attribute))
        return value

    def unbuilt_error(self, what: str) -> RuntimeError:
        """The error for a term used before its ``what`` (an adapter, in words) was built."""
        return RuntimeError(
            f"Loss term {self.name!r} has no {what} yet: DistillationModule builds them in setup() on a "
            "probe batch. Run the term inside a fit, or call module.build_terms(batch) first."
        )

    def captured_feature(
        self, outputs: StepOutputs, role: Literal["student", "teacher"], path: str
    ) -> Tensor:
        """The tensor that the ``role`` model's layer at ``path`` output in this step.

        The teacher's is detached: terms distil into the student (a co-trained teacher learns
        from its own terms).

        Raises:
            KeyError: no output of that layer was captured; the message says how features are captured.
        """
        features = outputs.student_features if role == "student" else outputs.teacher_features
        try:
            value = features[path]
        except KeyError:
            raise KeyError(
                f"Loss term {self.name!r}: no captured output for {role} layer {path!r}. Features are "
                "captured by the FeatureHooks that DistillationModule adds for the layers its terms declare; "
                "call the term inside a fit, or attach FeatureHooks yourself."
            ) from None
        tensor = first_tensor(value)
        return tensor if role == "student" else tensor.detach()

    def detached_teacher_logits(self, outputs: StepOutputs, what: str = "logits") -> Tensor:
        """The teacher's logits (``what``: or embeddings) of this step, detached.

        Raises:
            ValueError: the step has no teacher output.
        """
        if outputs.teacher_logits is None:
            raise ValueError(f"Loss term {self.name!r} needs the teacher's {what}, but the step has none.")
        return outputs.teacher_logits.detach()

    def required_targets(self, outputs: StepOutputs, why: str = "", fix: str = "") -> Tensor:
        """The batch's targets.

        Args:
            outputs: the step.
            why: appended to "needs labels" in the error (e.g. ``" to split the target class"``).
            fix: what to do, appended to the error.

        Raises:
            ValueError: the batch has no targets.
        """
        if outputs.targets is None:
            fix = f": {fix}" if fix else ""
            raise ValueError(f"Loss term {self.name!r} needs labels{why}, but the batch has no targets{fix}.")
        return outputs.targets

    def extra_repr(self) -> str:
        """Name, weight and settings, shown in the module repr."""
        return f"name={self.name!r}, weight={self.weight}"


def modified_in_place_count(feature: Tensor) -> int:
    """How often ``feature`` was modified in place since it was made (its autograd version counter).

    A hooked output changed afterwards (``ReLU(inplace=True)``, ``+=``) no longer holds what the
    layer returned; 0 for untracked (inference) tensors.
    """
    try:
        return feature._version
    except RuntimeError:
        return 0


class LayerPairTerm(LossTerm):
    """A term on the outputs of one student layer and one teacher layer (most feature/relation methods).

    Args:
        student_layer: dotted path of the student layer (as in ``student.named_modules()``).
        teacher_layer: dotted path of the teacher layer.
        name: key of the term.
        weight: factor in the total loss.
    """

    def __init__(self, student_layer: str, teacher_layer: str, name: str, weight: float = 1.0) -> None:
        super().__init__(name, weight)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The one student layer this term reads."""
        return (self.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """The one teacher layer this term reads."""
        return (self.teacher_layer,)

    def pair(self, outputs: StepOutputs) -> tuple[Tensor, Tensor]:
        """``(student_feature, teacher_feature.detach())`` of this step (see :meth:`captured_feature`)."""
        return (
            self.captured_feature(outputs, "student", self.student_layer),
            self.captured_feature(outputs, "teacher", self.teacher_layer),
        )

    def extra_repr(self) -> str:
        """Name, weight and layers, shown in the module repr."""
        layers = f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}"
        return f"{super().extra_repr()}, {layers}"


class LayerListTerm(LossTerm):
    """A term on the outputs of several student layers and/or several teacher layers (FSP, ReviewKD, BYOT).

    Args:
        student_layers: dotted paths of the student layers, in the order the term reads them.
        teacher_layers: dotted paths of the teacher layers, in the order the term reads them.
        name: key of the term.
        weight: factor in the total loss.

    Raises:
        TypeError: a single string was given instead of a list of paths.
    """

    def __init__(
        self, student_layers: Sequence[str], teacher_layers: Sequence[str], name: str, weight: float = 1.0
    ) -> None:
        super().__init__(name, weight)
        if isinstance(student_layers, str) or isinstance(teacher_layers, str):
            raise TypeError("student_layers and teacher_layers are lists of layer paths, not single strings.")
        self._student_layers = tuple(student_layers)
        self._teacher_layers = tuple(teacher_layers)

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The student layers, in order."""
        return self._student_layers

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """The teacher layers, in order."""
        return self._teacher_layers

    def captured_features(self, outputs: StepOutputs, role: Literal["student", "teacher"]) -> list[Tensor]:
        """The outputs of the ``role`` model's layers, in order (see :meth:`LossTerm.captured_feature`)."""
        layers = self._student_layers if role == "student" else self._teacher_layers
        return [self.captured_feature(outputs, role, path) for path in layers]

    def extra_repr(self) -> str:
        """Name, weight and layers, shown in the module repr."""
        layers = f"student_layers={self._student_layers}, teacher_layers={self._teacher_layers}"
        return f"{super().extra_repr()}, {layers}"
