r"""Contrastive representation distillation (CRD) against memory banks of past embeddings.

Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020. With scores
:math:`P = \exp(u^\top v / \tau) / Z`, :math:`K` negatives and :math:`P_n = 1 / n`, one direction is

.. math::
    \mathcal{L}(P) = -\frac{1}{N} \sum_i \Big[\log \frac{P_{i0}}{P_{i0} + K P_n + \epsilon}
    + \sum_{k=1}^{K} \log \frac{K P_n}{P_{ik} + K P_n + \epsilon}\Big]

and :math:`\mathcal{L}_{CRD} = \mathcal{L}(P^s) + \mathcal{L}(P^t)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses._checks import _check_same_shape
from lightning_kd.losses.base import LayerPairTerm, StepOutputs, checked_temperature
from lightning_kd.losses.synced_buffers import all_gather_rows, broadcast_from_rank_zero, world_size
from lightning_kd.precision import float32_math

__all__ = ["ContrastMemory", "crd_loss", "CRDTerm", "Embed"]


#: added to the denominators of CRD's NCE loss, as ``eps`` in the authors' ``crd/criterion.py``.
_CRD_EPS = 1e-7


def _check_crd_scores(name: str, scores: Tensor) -> None:
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"{name} must have shape (N, 1 + K): the positive's score in column 0, then K >= 1 negatives' "
            f"scores; got shape {tuple(scores.shape)}."
        )


def _crd_nce(scores: Tensor, num_samples: int, eps: float) -> Tensor:
    """One direction of CRD's NCE loss: ``-(sum log h(positive) + sum log(1 - h(negatives))) / N``."""
    noise = (scores.shape[1] - 1) / num_samples  # K * Pn, with Pn = 1 / num_samples
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_positive = torch.log(positive / (positive + noise + eps))
    log_negatives = torch.log(noise / (negatives + noise + eps))
    return -(log_positive.sum() + log_negatives.sum()) / scores.shape[0]


@float32_math
def crd_loss(
    student_scores: Tensor, teacher_scores: Tensor, num_samples: int, eps: float = _CRD_EPS
) -> Tensor:
    r"""CRD's NCE loss on the scores of one positive and K negatives, summed over both anchors.

    Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, as
    ``ContrastLoss`` / ``CRDLoss`` in ``crd/criterion.py`` of ``HobbitLong/RepDistiller``. A score
    is :math:`P = \exp(u^\top v / \tau) / Z` for an anchor embedding :math:`u` of one model and a
    memory-bank embedding :math:`v` of the other model
    (:class:`~lightning_kd.losses.crd.ContrastMemory` computes them); column 0 holds the
    positive (the same sample), columns :math:`1 \dots K` the negatives. With the uniform noise
    distribution :math:`P_n = 1 / n` over the :math:`n` = ``num_samples`` training samples, NCE
    models the probability that a pair is real as
    :math:`h = P / (P + K P_n)`, and one direction of the loss is

    .. math::
        \mathcal{L}(P) = -\frac{1}{N} \sum_{i=1}^{N} \Big[
        \log \frac{P_{i0}}{P_{i0} + K P_n + \epsilon}
        + \sum_{k=1}^{K} \log \frac{K P_n}{P_{ik} + K P_n + \epsilon} \Big],
        \qquad \epsilon = 10^{-7}

    exactly as ``ContrastLoss`` (:math:`\epsilon` in the denominators only; the log-terms are
    *summed* over the positive and the :math:`K` negatives and divided by the batch size
    :math:`N`, not averaged over the :math:`1 + K` columns). CRD contrasts in both directions and
    adds them, as ``CRDLoss.forward`` does; this function does the sum:

    .. math::
        \mathcal{L}_{CRD} = \mathcal{L}(P^{s}) + \mathcal{L}(P^{t})

    where :math:`P^{s}` anchors on the student's embedding (scored against the teacher's
    memory) and :math:`P^{t}` on the teacher's (scored against the student's memory). For one
    direction alone, pass the same scores twice and halve the result.

    Args:
        student_scores: ``(N, 1 + K)`` student-anchored scores, positive in column 0, all > 0.
        teacher_scores: ``(N, 1 + K)`` teacher-anchored scores, same shape.
        num_samples: :math:`n`, the size of the training set (of the memory bank), for
            :math:`P_n = 1 / n`.
        eps: :math:`\epsilon \ge 0` added to the denominators.

    Returns:
        Scalar: ``L(student_scores) + L(teacher_scores)``, each summed over the :math:`1 + K`
        columns and averaged over the :math:`N` rows. The authors' code returns a 1-element
        tensor; here a 0-d one.
    """
    _check_crd_scores("student_scores", student_scores)
    _check_crd_scores("teacher_scores", teacher_scores)
    _check_same_shape(
        "student_scores",
        student_scores,
        "teacher_scores",
        teacher_scores,
        hint="Both directions score the same positive and negatives.",
    )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"num_samples must be a positive integer (the training set size), got {num_samples!r}."
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    return _crd_nce(student_scores, num_samples, eps) + _crd_nce(teacher_scores, num_samples, eps)


#: random keys drawn at once when sampling negatives without replacement (bounds the memory).
_KEYS_PER_CHUNK = 2**24


def _check_memory_settings(num_samples: int, feat_dim: int, temperature: float, momentum: float) -> None:
    for name, value, minimum in (("num_samples", num_samples, 2), ("feat_dim", feat_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    checked_temperature(temperature)
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}.")


class ContrastMemory(nn.Module):
    r"""CRD's two memory banks: one embedding per training sample for each model, and the scores against them.

    As ``ContrastMemory`` in ``crd/memory.py`` of ``HobbitLong/RepDistiller``:

    - ``memory_student`` / ``memory_teacher``: ``(num_samples, feat_dim)`` buffers (so they are
      saved in checkpoints), initialised uniformly in :math:`[-a, a]`, :math:`a = 1 / \sqrt{d / 3}`
      (rows of expected squared norm 1, not normalised), from the global torch RNG.
    - :meth:`score`: :math:`P = \exp(u^\top v / \tau) / Z` for the student's embedding against
      rows of the teacher's bank and vice versa.
    - ``z_student`` / ``z_teacher``: the normalisation constants, buffers at -1 until the first
      call of :meth:`score` sets each to the mean of its unnormalised scores (positive and
      negatives of the whole batch) times ``num_samples``; fixed afterwards (and checkpointed).
    - :meth:`update`: :math:`m_i \leftarrow \mathrm{normalize}(\mu\, m_i + (1 - \mu)\, u_i)` for
      the samples of the batch, in both banks, after the scores were taken.

    **Under DDP** (``torch.distributed`` initialised with more than one process), each process
    sees other samples, so the banks are kept identical explicitly: :meth:`update` all-gathers
    the indices and the detached embeddings of every process (rank order) and applies all of
    them on every process, each index once (if an index occurs several times, the last
    occurrence in rank order wins); :meth:`score` all-reduces the sums that estimate :math:`Z`, so
    :math:`Z` is the mean over the first batch of *all* processes; and the first :meth:`score` or
    :meth:`update` of a distributed run broadcasts rank 0's banks and :math:`Z` to every process
    (so they agree even if the processes were seeded differently or DDP is told to ignore these
    buffers). Every process must therefore call :meth:`score` and :meth:`update` at the same
    steps, as a training step does.

    Args:
        num_samples: :math:`n`, rows of each bank (the size of the training set).
        feat_dim: :math:`d`, width of the embeddings.
        temperature: :math:`\tau` (``nce_t``, 0.07 in the authors' code).
        momentum: :math:`\mu` of the update (``nce_m``, 0.5).
    """

    memory_student: Tensor
    memory_teacher: Tensor
    z_student: Tensor
    z_teacher: Tensor

    def __init__(
        self, num_samples: int, feat_dim: int = 128, temperature: float = 0.07, momentum: float = 0.5
    ) -> None:
        super().__init__()
        _check_memory_settings(num_samples, feat_dim, temperature, momentum)
        self.num_samples = num_samples
        self.feat_dim = feat_dim
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_samples, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_teacher", torch.rand(num_samples, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._broadcast_done = False

    def extra_repr(self) -> str:
        """Sizes and settings, shown in the module repr."""
        return (
            f"num_samples={self.num_samples}, feat_dim={self.feat_dim}, "
            f"temperature={self.temperature}, momentum={self.momentum}"
        )

    def _broadcast_once(self) -> None:
        """Rank 0's banks and Z to every process, the first time they are used in a distributed run."""
        if self._broadcast_done or world_size() == 1:  # a later DDP run still needs it
            return
        broadcast_from_rank_zero((self.memory_student, self.memory_teacher, self.z_student, self.z_teacher))
        self._broadcast_done = True

    def sample(self, indices: Tensor, num_negatives: int) -> Tensor:
        """Contrast indices ``(N, 1 + K)``: each sample's own index, then ``K`` negatives.

        The negatives of a row are drawn uniformly from the ``num_samples - 1`` other indices
        (never the row's own), without replacement when ``K <= num_samples - 1`` and with
        replacement otherwise, with the global torch RNG of ``indices``' device. The authors'
        dataset ('exact' mode) also draws without replacement, but only among samples of
        *other classes*; see :class:`CRDTerm`.

        Args:
            indices: ``(N,)`` integer indices of the batch's samples in ``[0, num_samples)``.
            num_negatives: ``K >= 1``.
        """
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {num_negatives!r}.")
        indices = indices.reshape(-1).long()
        n = self.num_samples
        if num_negatives > n - 1:
            draws = torch.randint(0, n - 1, (indices.shape[0], num_negatives), device=indices.device)
            negatives = draws + (draws >= indices.unsqueeze(1)).long()  # skip the positive
        else:
            rows_per_chunk = max(1, _KEYS_PER_CHUNK // n)
            chunks = []
            for chunk in indices.split(rows_per_chunk):
                keys = torch.rand(chunk.shape[0], n, device=indices.device)
                keys.scatter_(1, chunk.unsqueeze(1), 2.0)  # above every key in [0, 1): never drawn
                chunks.append(keys.topk(num_negatives, dim=1, largest=False).indices)
            negatives = torch.cat(chunks)
        return torch.cat([indices.unsqueeze(1), negatives], dim=1)

    def score(self, student_emb: Tensor, teacher_emb: Tensor, contrast_idx: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(student_scores, teacher_scores)``, each ``(N, 1 + K)``, in float32.

        ``student_scores[i, k] = exp(memory_teacher[c_ik] . s_i / tau) / z_student`` and
        ``teacher_scores[i, k] = exp(memory_student[c_ik] . t_i / tau) / z_teacher`` with
        :math:`c` = ``contrast_idx`` (the authors' ``out_v1`` and ``out_v2``). Gradients flow into
        the embeddings, not into the banks. The first call sets each :math:`Z` still at -1.

        Args:
            student_emb: ``(N, feat_dim)`` L2-normalised student embeddings.
            teacher_emb: ``(N, feat_dim)`` L2-normalised teacher embeddings.
            contrast_idx: ``(N, 1 + K)`` indices from :meth:`sample` (positive in column 0).
        """
        batch = student_emb.shape[0]
        expected = (batch, self.feat_dim)
        if tuple(student_emb.shape) != expected or tuple(teacher_emb.shape) != expected:
            raise ValueError(
                f"Expected student and teacher embeddings of shape {expected}, got "
                f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}."
            )
        if contrast_idx.ndim != 2 or contrast_idx.shape[0] != batch or contrast_idx.shape[1] < 2:
            raise ValueError(
                f"contrast_idx must have shape (N={batch}, 1 + K) with K >= 1, "
                f"got {tuple(contrast_idx.shape)}."
            )
        self._broadcast_once()
        with torch.autocast(device_type=student_emb.device.type, enabled=False):
            flat = contrast_idx.reshape(-1).long()
            shape = (*contrast_idx.shape, self.feat_dim)
            teacher_rows = self.memory_teacher.index_select(0, flat).view(shape).float()
            student_rows = self.memory_student.index_select(0, flat).view(shape).float()
            student_raw = torch.exp(
                torch.bmm(teacher_rows, student_emb.float().unsqueeze(2)).squeeze(2) / self.temperature
            )
            teacher_raw = torch.exp(
                torch.bmm(student_rows, teacher_emb.float().unsqueeze(2)).squeeze(2) / self.temperature
            )
            if self.z_student.item() < 0 or self.z_teacher.item() < 0:
                self._estimate_z(student_raw, teacher_raw)
            return student_raw / self.z_student.float(), teacher_raw / self.z_teacher.float()

    @torch.no_grad()
    def _estimate_z(self, student_raw: Tensor, teacher_raw: Tensor) -> None:
        """Set each unset Z to ``mean(unnormalised scores) * num_samples`` (over all processes)."""
        count = torch.tensor(float(student_raw.numel()), dtype=torch.float64, device=student_raw.device)
        sums = torch.stack([student_raw.sum().double(), teacher_raw.sum().double(), count])
        if world_size() > 1:
            dist.all_reduce(sums)
        z_student, z_teacher = sums[0] / sums[2] * self.num_samples, sums[1] / sums[2] * self.num_samples
        if self.z_student.item() < 0:
            self.z_student.fill_(z_student.item())
        if self.z_teacher.item() < 0:
            self.z_teacher.fill_(z_teacher.item())

    @torch.no_grad()
    def update(self, indices: Tensor, student_emb: Tensor, teacher_emb: Tensor) -> None:
        r"""Move the batch's rows of both banks towards its embeddings, then renormalise them.

        :math:`m_i \leftarrow (\mu m_i + (1 - \mu) u_i) / \lVert \mu m_i + (1 - \mu) u_i \rVert`
        (``F.normalize``, eps :math:`10^{-12}`; the authors divide by the norm itself, the same
        unless the norm is below the eps), ``memory_student`` with the student's embeddings and
        ``memory_teacher`` with the teacher's. Under DDP the indices and embeddings of all
        processes are gathered first and applied on every process (see the class docstring).

        Args:
            indices: ``(N,)`` indices of the batch's samples.
            student_emb: ``(N, feat_dim)`` student embeddings (detached here).
            teacher_emb: ``(N, feat_dim)`` teacher embeddings.
        """
        indices = indices.reshape(-1).long()
        expected = (indices.shape[0], self.feat_dim)
        if tuple(student_emb.shape) != expected or tuple(teacher_emb.shape) != expected:
            raise ValueError(
                f"Expected embeddings of shape {expected} for {indices.shape[0]} indices, got "
                f"{tuple(student_emb.shape)} and {tuple(teacher_emb.shape)}."
            )
        self._broadcast_once()
        rows = torch.cat([student_emb.detach().float(), teacher_emb.detach().float()], dim=1)
        indices, rows = all_gather_rows(indices), all_gather_rows(rows)
        # each index once, from its last occurrence: a deterministic result on every process
        unique, inverse = torch.unique(indices, return_inverse=True)
        positions = torch.arange(indices.shape[0], device=indices.device)
        last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
        rows = rows[last]
        for memory, new in (
            (self.memory_student, rows[:, : self.feat_dim]),
            (self.memory_teacher, rows[:, self.feat_dim :]),
        ):
            mixed = memory.index_select(0, unique).float() * self.momentum + new * (1 - self.momentum)
            memory.index_copy_(0, unique, F.normalize(mixed, p=2, dim=1).to(memory.dtype))


class Embed(nn.Module):
    """CRD's embedding head: flatten, ``Linear(in_features, feat_dim)``, L2-normalise each row.

    As ``Embed`` in ``crd/criterion.py`` of ``HobbitLong/RepDistiller``; the normalisation is
    ``F.normalize`` (eps ``1e-12``) where the authors divide by the norm, the same for non-zero rows.
    """

    def __init__(self, in_features: int, feat_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, ...) -> (N, feat_dim)`` unit vectors."""
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), p=2, dim=1)


class CRDTerm(LayerPairTerm):
    r"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020).

    The authors' CRD (``crd/criterion.py``, ``crd/memory.py`` of ``HobbitLong/RepDistiller``):
    both layers' outputs are flattened per sample and mapped by trainable :class:`Embed` heads
    (``Linear`` + L2 normalisation, sized in :meth:`build` from the probe batch, trained with
    the student; the teacher's *feature* is detached, its head is trained) to ``feat_dim``
    dimensions. Each sample's student embedding is contrasted against the teacher's memory-bank
    row of the same sample (positive) and of ``num_negatives`` other samples, and vice versa;
    the loss is :func:`~lightning_kd.losses.functional.crd_loss` (the sum of both directions).
    After the loss, in training mode, both memory banks move towards the batch's embeddings
    (:meth:`ContrastMemory.update`, momentum ``momentum``, no gradient). The banks, the
    normalisation constants and the heads are part of the module's state dict, so checkpoints
    carry them and a resumed fit continues with them.

    The benchmark applies CRD to the penultimate features of both models (after global
    pooling, before the classifier) with ``-r 1 -a 0 -b 0.8``: ``CrossEntropyTerm(weight=1)``
    plus this term at weight 0.8 (``KDTerm(weight=1)`` in addition for "CRD+KD"), with
    ``feat_dim=128``, ``nce_k=16384``, ``nce_t=0.07``, ``nce_m=0.5``, the defaults here.

    **Sample indices.** The memory has one row per training sample, so every training batch
    must carry the samples' indices in the dataset: wrap the dataset in
    :class:`lightning_kd.data.WithIndex`, which appends the index to tuple items
    (``(inputs, targets, index)``, ``index_key=2``, the default) or adds it under ``"index"``
    to dict items (``index_key="index"``). ``num_samples`` must be the length of that dataset.

    **Negatives** (difference from the authors' code). The authors' dataset
    (``CIFAR100InstanceSample`` in ``dataset/cifar100.py``, mode ``'exact'``) draws each
    sample's ``K`` negatives in the data loader, without replacement, among the samples of
    the *other classes* only. This term draws them in the loss, uniformly without replacement
    among *all other samples* (only the positive itself excluded; with replacement if ``K``
    exceeds ``num_samples - 1``, as the authors' code does when ``K`` exceeds the candidates),
    so it needs no labels and works for any dataset. With 100 balanced classes, 1% of
    the candidates differ. The NCE noise distribution :math:`P_n = 1/n` is the authors'. Draws use
    the global torch RNG (seeded by ``seed_everything``), on the device of the features; memory
    per step is ``O(N * num_samples)`` random keys, in chunks of at most :math:`2^{24}`.

    **Under DDP** every process's memory updates reach every copy: each step all-gathers the
    sample indices and the detached embeddings of all processes (``torch.distributed``, only
    when it is initialised with more than one process) and applies all of them on every
    process, in rank order, each index once; the estimate of the normalisation constants
    :math:`Z` is all-reduced, so it covers the first batch of all processes; and rank 0's banks
    are broadcast once, before their first use. The banks, and :math:`Z`, are therefore identical
    on all processes at every step. Each process draws its own negatives (different ranks may
    draw different ones, or the same if seeded alike); that is fine, since they index
    identical banks. The cost per step is two small all-gathers of ``world_size * N`` indices
    and ``world_size * N * 2 * feat_dim`` floats. The term sets ``synchronizes_own_buffers``,
    so :class:`~lightning_kd.DistillationModule` lists the banks in DDP's
    ``_ddp_params_and_buffers_to_ignore``: DDP does not re-broadcast them from rank 0 at every
    forward (``2 * num_samples * feat_dim`` floats a step).

    Args:
        student_layer: dotted path of the student layer (the penultimate feature).
        teacher_layer: dotted path of the teacher layer.
        num_samples: size of the training set (rows of the memory banks).
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss; 0.8 is the benchmark's (``-b 0.8``).
        feat_dim: width of the embeddings (``--feat_dim``).
        num_negatives: ``K``, negatives per sample (``--nce_k``).
        temperature: :math:`\tau` of the scores (``--nce_t``).
        momentum: of the memory update (``--nce_m``).
        index_key: where the sample index is in a batch: a position for tuple batches, a key for
            dict batches.
    """

    synchronizes_own_buffers = True
    adapter_attributes = {
        "embed_student": "student embedding head",
        "embed_teacher": "teacher embedding head",
        "memory": "memory",
    }

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        num_samples: int,
        name: str = "crd",
        weight: float = 0.8,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        index_key: int | str = 2,
    ) -> None:
        super().__init__(student_layer, teacher_layer, name, weight)
        _check_memory_settings(num_samples, feat_dim, temperature, momentum)
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {num_negatives!r}.")
        self.num_samples = num_samples
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.index_key = index_key
        self.embed_student: Embed | None = None
        self.embed_teacher: Embed | None = None
        self.memory: ContrastMemory | None = None

    def build(self, outputs: StepOutputs) -> None:
        """Create both embedding heads (from the probe step's feature sizes) and the memory banks."""
        student, teacher = self._checked_pair(outputs)
        device = student.device
        self.embed_student = Embed(student[0].numel(), self.feat_dim).to(device)
        self.embed_teacher = Embed(teacher[0].numel(), self.feat_dim).to(device)
        self.memory = ContrastMemory(self.num_samples, self.feat_dim, self.temperature, self.momentum).to(
            device
        )

    def _checked_pair(self, outputs: StepOutputs) -> tuple[Tensor, Tensor]:
        student, teacher = self.pair(outputs)
        if student.ndim < 2 or teacher.ndim < 2 or student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"Loss term {self.name!r}: expected (N, ...) features of the same batch size, got student "
                f"{self.student_layer!r} of shape {tuple(student.shape)} and teacher {self.teacher_layer!r} "
                f"of shape {tuple(teacher.shape)}."
            )
        return student, teacher

    def _check_width(self, feature: Tensor, head: Embed, role: str, layer: str) -> None:
        width = feature[0].numel()
        if width != head.linear.in_features:
            raise ValueError(
                f"Loss term {self.name!r}: the {role} layer {layer!r} gave a feature of shape "
                f"{tuple(feature.shape)} ({width} values per sample), but its embedding head was built "
                f"for {head.linear.in_features} values per sample on the probe batch. The layer's output "
                "size must not change between batches."
            )

    def _indices(self, batch: Any, batch_size: int, device: torch.device) -> Tensor:
        """The batch's sample indices, checked: ``(N,)`` integers in ``[0, num_samples)``."""
        key = self.index_key
        lacks = f"Loss term {self.name!r} (CRD) needs each sample's index in the dataset, but the batch"
        how = (
            "Wrap the training dataset in lightning_kd.data.WithIndex(dataset): tuple items then end with "
            "their index (index_key=2 for (inputs, targets, index)), dict items get it under 'index' "
            "(index_key='index')."
        )
        if isinstance(batch, Mapping):
            if key not in batch:
                raise ValueError(
                    f"{lacks} is a mapping with keys {list(batch)}, none of them index_key={key!r}. {how}"
                )
            value = batch[key]
        elif isinstance(batch, Sequence) and not isinstance(batch, str):
            if isinstance(key, bool) or not isinstance(key, int) or not -len(batch) <= key < len(batch):
                raise ValueError(
                    f"{lacks} is a sequence of {len(batch)} items and has none at index_key={key!r}. {how}"
                )
            value = batch[key]
        else:
            raise ValueError(f"{lacks} is {type(batch).__name__}. {how}")
        indices = torch.as_tensor(value)
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(
                f"Loss term {self.name!r}: the sample indices at index_key={key!r} have dtype "
                f"{indices.dtype}; expected integers. Is index_key pointing at the index? {how}"
            )
        if tuple(indices.shape) != (batch_size,):
            raise ValueError(
                f"Loss term {self.name!r}: the sample indices at index_key={key!r} have shape "
                f"{tuple(indices.shape)}; expected one index per sample, shape ({batch_size},). {how}"
            )
        indices = indices.to(device=device, dtype=torch.long)
        if bool(((indices < 0) | (indices >= self.num_samples)).any()):
            raise ValueError(
                f"Loss term {self.name!r}: sample indices must be in [0, num_samples={self.num_samples}), "
                f"got values from {int(indices.min())} to {int(indices.max())}. Set num_samples to the "
                "length of the (WithIndex-wrapped) training dataset."
            )
        return indices

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``crd_loss`` of the batch's embeddings against the memory banks; then, in training, the update."""
        embed_student, embed_teacher = (
            self.built_adapter("embed_student"),
            self.built_adapter("embed_teacher"),
        )
        memory = self.built_adapter("memory")
        student, teacher = self._checked_pair(outputs)
        self._check_width(student, embed_student, "student", self.student_layer)
        self._check_width(teacher, embed_teacher, "teacher", self.teacher_layer)
        indices = self._indices(outputs.batch, student.shape[0], student.device)
        with torch.autocast(device_type=student.device.type, enabled=False):
            student_emb = embed_student(student.to(embed_student.linear.weight.dtype)).float()
            teacher_emb = embed_teacher(teacher.to(embed_teacher.linear.weight.dtype)).float()
        contrast_idx = memory.sample(indices, self.num_negatives)
        student_scores, teacher_scores = memory.score(student_emb, teacher_emb, contrast_idx)
        loss = crd_loss(student_scores, teacher_scores, self.num_samples)
        if self.training:
            memory.update(indices, student_emb, teacher_emb)
        return loss

    def extra_repr(self) -> str:
        """Name, weight, layers and CRD settings, shown in the module repr."""
        settings = (
            f"num_samples={self.num_samples}, feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}, index_key={self.index_key!r}"
        )
        return f"{super().extra_repr()}, {settings}"
