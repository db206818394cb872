"""The contract between the training step and a loss term."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_kd.hooks import first_tensor

__all__ = [
    "LayerPairTerm",
    "LossTerm",
    "StepOutputs",
    "checked_temperature",
    "first_tensor",
    "modified_in_place_count",
]


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
    """

    student_logits: Tensor
    targets: Tensor | None = None
    teacher_logits: Tensor | None = None
    student_features: dict[str, Any] = field(default_factory=dict)
    teacher_features: dict[str, Any] = field(default_factory=dict)
    batch: Any = None
    teacher_output: Any = None
    student_output: Any = None


def checked_temperature(temperature: float) -> float:
    """``temperature`` as a float; a ``ValueError`` unless it is > 0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    return float(temperature)


class LossTerm(nn.Module):
    """A named, weighted term of the training objective.

    Subclasses implement :meth:`forward` (``StepOutputs -> scalar``) with the math taken from
    :mod:`lightning_kd.losses.functional`, declare the layers they read in
    :attr:`student_layers` / :attr:`teacher_layers` (the module hooks exactly those), and own
    any trainable adapter they need. ``weight`` is a plain attribute so that schedules
    (:class:`~lightning_kd.callbacks.LossWeightSchedule`) can change it during training.

    Args:
        name: key of the term; logged as ``train/loss_<name>``.
        weight: factor of the term in the total loss.
    """

    #: whether the term reads the teacher's outputs (it then needs a teacher).
    needs_teacher: bool = True
    #: whether the term keeps its buffers identical across DDP processes itself (a memory bank
    #: updated with all-gathered samples); DDP then leaves them alone.
    synchronizes_own_buffers: bool = False

    def __init__(self, name: str, weight: float = 1.0) -> None:
        super().__init__()
        if not name.isidentifier():
            raise ValueError(
                f"Loss term name must be a Python identifier (letters, digits, _), got {name!r}."
            )
        self.name = name
        self.weight = float(weight)

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
        """Whether :meth:`build` must run (once, on a probe step) before training."""
        return False

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
        """``(student_feature, teacher_feature.detach())`` of this step."""
        try:
            student = outputs.student_features[self.student_layer]
            teacher = outputs.teacher_features[self.teacher_layer]
        except KeyError as error:
            raise KeyError(
                f"Loss term {self.name!r}: no captured output for layer {error.args[0]!r}. Features are "
                "captured by the FeatureHooks that DistillationModule adds for the layers its terms declare; "
                "call the term inside a fit, or attach FeatureHooks yourself."
            ) from None
        return first_tensor(student), first_tensor(teacher).detach()

    def extra_repr(self) -> str:
        """Name, weight and layers, shown in the module repr."""
        layers = f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}"
        return f"{super().extra_repr()}, {layers}"
