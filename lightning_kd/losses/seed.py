r"""SEED: self-supervised distillation against a FIFO queue of the teacher's past embeddings.

Fang, Wang, Wang, Zhang, Yang, Liu, "SEED: Self-supervised Distillation For Visual
Representation", ICLR 2021. With :math:`\mathbf{D}^+ = [z^T_i, d_1, \dots, d_K]`:

.. math::
    p^T_{ij} = \mathrm{softmax}_j(z^T_i \cdot \mathbf{D}^+_j / \tau_T), \quad
    p^S_{ij} = \mathrm{softmax}_j(z^S_i \cdot \mathbf{D}^+_j / \tau_S), \quad
    \mathcal{L} = \frac{1}{N} \sum_i \sum_j -p^T_{ij} \log p^S_{ij}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.losses._checks import _check_embedding_pair, _check_positive
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature
from lightning_kd.losses.synced_buffers import all_gather_rows, broadcast_from_rank_zero, world_size
from lightning_kd.precision import float32_math

__all__ = ["seed_loss", "SEEDTerm"]


@float32_math
def seed_loss(
    student_emb: Tensor,
    teacher_emb: Tensor,
    queue: Tensor,
    student_temperature: float = 0.2,
    teacher_temperature: float = 0.01,
) -> Tensor:
    r"""SEED: the student matches the teacher's similarity distribution over a queue of embeddings.

    Fang, Wang, Wang, Zhang, Yang, Liu, "SEED: Self-supervised Distillation For Visual
    Representation", ICLR 2021 (``seed/builder.py`` of ``jacobswan1/SEED``). With
    :math:`z^S_i, z^T_i` the L2-normalised embeddings of sample :math:`i` and
    :math:`\mathbf{D}^+ = [z^T_i, d_1, \dots, d_K]` the teacher's own embedding followed by the
    :math:`K` queue rows :math:`d_j`,

    .. math::

        p^T_{ij} = \mathrm{softmax}_j\left(z^T_i \cdot \mathbf{D}^+_j / \tau_T\right), \quad
        p^S_{ij} = \mathrm{softmax}_j\left(z^S_i \cdot \mathbf{D}^+_j / \tau_S\right), \quad
        L = \frac{1}{N} \sum_i \sum_j -p^T_{ij} \log p^S_{ij}

    (the first column is the positive: :math:`z^T_i \cdot z^T_i = 1` for the teacher,
    :math:`z^S_i \cdot z^T_i` for the student). The teacher side carries no gradient.

    Args:
        student_emb: ``(N, D)`` student embeddings (normalised here).
        teacher_emb: ``(N, D)`` teacher embeddings (normalised here; detached).
        queue: ``(K, D)`` past teacher embeddings, rows L2-normalised (not renormalised here);
            ``K`` may be 0 (then the loss is 0: one candidate only).
        student_temperature: :math:`\tau_S > 0` (0.2 in the paper and the authors' code).
        teacher_temperature: :math:`\tau_T > 0` (0.01 here; the authors' code defaults to 1e-4).

    Returns:
        Scalar: the cross-entropy summed over the :math:`1 + K` candidates, averaged over the batch.
    """
    _check_embedding_pair(student_emb, teacher_emb)
    if student_emb.ndim != 2:
        raise ValueError(f"Expected (N, D) embeddings, got student_emb of shape {tuple(student_emb.shape)}.")
    if queue.ndim != 2 or queue.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"queue has shape {tuple(queue.shape)}; expected (K, D={student_emb.shape[1]}): one teacher "
            "embedding of the same width per row."
        )
    _check_positive("student_temperature", student_temperature)
    _check_positive("teacher_temperature", teacher_temperature)
    student = F.normalize(student_emb, dim=1)
    teacher = F.normalize(teacher_emb.detach(), dim=1)
    queue = queue.detach()
    student_scores = torch.cat([(student * teacher).sum(dim=1, keepdim=True), student @ queue.T], dim=1)
    teacher_scores = torch.cat([(teacher * teacher).sum(dim=1, keepdim=True), teacher @ queue.T], dim=1)
    student_scores = student_scores / student_temperature
    teacher_scores = teacher_scores / teacher_temperature
    teacher_probs = F.softmax(teacher_scores, dim=1)
    return -(teacher_probs * F.log_softmax(student_scores, dim=1)).sum(dim=1).mean()


class SEEDTerm(LossTerm):
    r"""SEED (Fang et al., ICLR 2021): the student copies the teacher's similarity distribution over a queue.

    See :func:`lightning_kd.losses.functional.seed_loss` for the formula. The term reads the
    embeddings as ``student_logits`` / ``teacher_logits`` (an
    :class:`~lightning_kd.EmbeddingDistillationModule` puts them there); it needs no labels.

    The queue, as in the authors' ``seed/builder.py`` (after MoCo):

    - ``queue``: a ``(queue_size, D)`` buffer, saved in checkpoints, filled at creation with
      random unit vectors (global torch RNG, so ``seed_everything`` fixes it) and then, after each
      training step's loss, with the batch's L2-normalised teacher embeddings, first in first
      out; ``queue_pointer`` (a buffer too) is the row written next. A batch that passes the end
      wraps around to row 0; a batch larger than the queue leaves its last ``queue_size`` rows,
      where writing all of them in turn would have.
    - ``D`` is the width of the first embeddings the term sees (no probe batch needed); a
      checkpoint loaded into a term that has not seen any yet takes the saved queue's width.
      Pass ``embedding_dim`` to create the queue at once.
    - Only training steps enqueue (``self.training``): validation and test read the queue only.

    **Under DDP** every process enqueues the teacher embeddings of *all* processes (all-gathered
    in rank order, as the authors' ``concat_all_gather``), and the first use in a distributed run
    broadcasts rank 0's queue, so the queues stay identical. The term sets
    ``synchronizes_own_buffers``: DDP does not re-broadcast the queue at every forward.

    Defaults: the paper's queue holds 65,536 embeddings of ImageNet; the default here is 4,096, a
    fraction of a small training set such as MNIST-1D's (a queue longer than the training set
    holds the same samples several times). :math:`\tau_S = 0.2` is the paper's and the code's;
    :math:`\tau_T = 0.01` is the value given in the brief for the paper, while the authors' code
    defaults to ``--distill-t 1e-4`` (nearly one-hot targets).

    Args:
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        queue_size: :math:`K`, embeddings kept (>= 1).
        student_temperature: :math:`\tau_S > 0`.
        teacher_temperature: :math:`\tau_T > 0`.
        embedding_dim: width ``D`` of the embeddings, to create the queue now; default: on first use.
    """

    needs_teacher = True
    synchronizes_own_buffers = True
    queue: Tensor
    queue_pointer: Tensor

    def __init__(
        self,
        name: str = "seed",
        weight: float = 1.0,
        queue_size: int = 4096,
        student_temperature: float = 0.2,
        teacher_temperature: float = 0.01,
        embedding_dim: int | None = None,
    ) -> None:
        super().__init__(name, weight)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}.")
        if embedding_dim is not None and (
            isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1
        ):
            raise ValueError(f"embedding_dim must be an integer >= 1 or None, got {embedding_dim!r}.")
        self.queue_size = queue_size
        self.student_temperature = checked_temperature(student_temperature)
        self.teacher_temperature = checked_temperature(teacher_temperature)
        self.register_buffer("queue", torch.empty(queue_size, 0))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._broadcast_done = False
        if embedding_dim is not None:
            self._create_queue(embedding_dim, torch.device("cpu"))

    @property
    def queue_ready(self) -> bool:
        """Whether the queue has its width (created on first use, from ``embedding_dim``, or loaded)."""
        return self.queue.shape[1] > 0

    def _create_queue(self, width: int, device: torch.device) -> None:
        self.queue = F.normalize(torch.randn(self.queue_size, width), dim=1).to(device)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Take the saved queue's width when this term has not sized its queue yet."""
        saved = state_dict.get(f"{prefix}queue")
        if isinstance(saved, Tensor) and saved.ndim == 2 and not self.queue_ready:
            self.queue = torch.empty(saved.shape, dtype=self.queue.dtype, device=self.queue.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _broadcast_once(self) -> None:
        """Rank 0's queue and pointer to every process, the first time they are used in a distributed run."""
        if self._broadcast_done or world_size() == 1:  # a later DDP run still needs it
            return
        broadcast_from_rank_zero((self.queue, self.queue_pointer))
        self._broadcast_done = True

    def _checked_embeddings(self, outputs: StepOutputs) -> tuple[Tensor, Tensor]:
        student, teacher = outputs.student_logits, self.detached_teacher_logits(outputs, "embeddings")
        if student.ndim != 2 or student.shape != teacher.shape:
            raise ValueError(
                f"Loss term {self.name!r} (SEED) needs (N, D) embeddings of the same shape, got student "
                f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}. Give the student a projection "
                "head onto the teacher's width; use an EmbeddingDistillationModule (it passes embeddings)."
            )
        if self.queue_ready and self.queue.shape[1] != student.shape[1]:
            raise ValueError(
                f"Loss term {self.name!r}: the embeddings are {student.shape[1]} wide but the queue holds "
                f"{self.queue.shape[1]}-wide ones (from embedding_dim, the first batch, or a checkpoint). "
                "Set embedding_dim to the embeddings' width."
            )
        return student, teacher

    @torch.no_grad()
    def enqueue(self, teacher_emb: Tensor) -> None:
        """Write the L2-normalised ``(N, D)`` embeddings (of all processes under DDP) at the pointer, FIFO."""
        self._broadcast_once()
        keys = all_gather_rows(F.normalize(teacher_emb.detach().float(), dim=1))
        count, pointer = len(keys), int(self.queue_pointer)
        kept = keys[-self.queue_size :]  # as if all were written in turn: the last queue_size remain
        rows = (
            pointer + count - len(kept) + torch.arange(len(kept), device=self.queue.device)
        ) % self.queue_size
        self.queue[rows] = kept.to(self.queue.dtype)
        self.queue_pointer.fill_((pointer + count) % self.queue_size)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``seed_loss`` of the batch against the queue; then, in training, the batch is enqueued."""
        student, teacher = self._checked_embeddings(outputs)
        if not self.queue_ready:
            self._create_queue(student.shape[1], student.device)
        self._broadcast_once()
        # a copy, as the authors' `queue.clone()`: the enqueue below writes in place before backward
        loss = seed_loss(
            student, teacher, self.queue.clone(), self.student_temperature, self.teacher_temperature
        )
        if self.training:
            self.enqueue(teacher)
        return loss

    def extra_repr(self) -> str:
        """Name, weight, queue size and temperatures, shown in the module repr."""
        return (
            f"{super().extra_repr()}, queue_size={self.queue_size}, "
            f"student_temperature={self.student_temperature}, teacher_temperature={self.teacher_temperature}"
        )
