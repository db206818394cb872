"""TeacherEnsemble: several frozen teachers that teach as one (multi-teacher distillation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_kd.losses.functional import ensemble_log_probs
from lightning_kd.model_io import infer_num_classes, logits_of
from lightning_kd.teachers.loading import load_weights

__all__ = ["TeacherEnsemble"]


class TeacherEnsemble(nn.Module):
    """Teachers of any architectures over the same classes, used as one ``teacher``.

    ``forward`` returns a dict: ``"members"``, the ``(M, N, C)`` stack of each teacher's logits
    (what :class:`~lightning_kd.losses.MultiTeacherKDTerm` reads), ``"weights"``, the fixed
    mixture weights, and ``"logits"``, the log of the weighted mean of the teachers'
    probabilities (Hinton et al., 2015: an ensemble predicts by averaging), which gives the
    ensemble's accuracy and agreement. Give it to
    :class:`~lightning_kd.DistillationModule` as a frozen teacher; each member's accuracy is
    then logged as ``val|test/teacher<i>_acc``, the ensemble's as ``val|test/teacher_acc``.
    Hooked teacher layers are addressed as ``members.<i>.<path>``.

    Args:
        teachers: the member networks (at least two).
        checkpoints: per member, a weights file for :func:`~lightning_kd.teachers.load_weights`
            or ``None`` (weights as given).
        weights: fixed mixture weights, normalised to sum to 1; default: equal.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        checkpoints: Sequence[str | Path | None] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(
                f"A TeacherEnsemble needs at least two teachers, got {len(teachers)}; "
                "pass a single teacher to DistillationModule directly."
            )
        for name, values in (("checkpoints", checkpoints), ("weights", weights)):
            if values is not None and len(values) != len(teachers):
                raise ValueError(
                    f"{name} has {len(values)} entries for {len(teachers)} teachers: give one each."
                )
        self.members = nn.ModuleList(teachers)
        for member, checkpoint in zip(self.members, checkpoints or [None] * len(teachers), strict=True):
            if checkpoint is not None:
                load_weights(member, checkpoint)
        fixed = torch.tensor([1.0] * len(teachers) if weights is None else [float(w) for w in weights])
        if not (fixed.isfinite().all() and (fixed >= 0).all() and fixed.sum() > 0):
            raise ValueError(
                f"weights must be finite and non-negative with a positive sum, got {fixed.tolist()}."
            )
        self.register_buffer("weights", fixed / fixed.sum(), persistent=False)
        classes = {infer_num_classes(member) for member in self.members}
        if len(classes) > 1:
            raise ValueError(
                f"The teachers predict different numbers of classes {sorted(map(str, classes))}: "
                "an ensemble needs them all over the same classes."
            )
        self.num_classes = classes.pop()

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        """Every member's logits, the fixed weights, and the ensemble's log-probabilities."""
        members = torch.stack([logits_of(member(inputs)) for member in self.members])
        return {
            "logits": ensemble_log_probs(members, self.weights),
            "members": members,
            "weights": self.weights,
        }
