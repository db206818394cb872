r"""ReviewKD: the student's stages reviewed from deep to shallow, fused by attention, matched by HCL.

Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. The hierarchical
context loss of one pair, with :math:`P_l` average pooling to :math:`l \times l`:

.. math::
    \mathcal{L}_{pair} = \frac{\ell(F^s, F^t) + \sum_k 2^{-k} \ell(P_{l_k}(F^s), P_{l_k}(F^t))}
    {1 + \sum_k 2^{-k}}, \qquad \mathcal{L} = \sum_{pairs} \mathcal{L}_{pair}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses._checks import _check_same_shape
from lightning_kd.losses.base import LayerListTerm, StepOutputs
from lightning_kd.precision import float32_math

__all__ = ["ABF", "hcl_loss", "ReviewKDTerm"]


#: output sizes of HCL's pooled pyramid levels, finest first (``hcl`` in ``CIFAR-100/model/reviewkd.py``).
_HCL_LEVELS = (4, 2, 1)


@float32_math
def _hcl_pair(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """HCL of one pair of equally shaped ``(N, C, H, W)`` or ``(N, C, L)`` maps (see :func:`hcl_loss`)."""
    loss = F.mse_loss(student_feat, teacher_feat)
    level_weight, total_weight = 1.0, 1.0
    smallest = min(student_feat.shape[2:])
    for size in _HCL_LEVELS:
        if size >= smallest:
            continue
        level_weight /= 2.0
        if student_feat.ndim == 4:
            pooled_s = F.adaptive_avg_pool2d(student_feat, (size, size))
            pooled_t = F.adaptive_avg_pool2d(teacher_feat, (size, size))
        else:
            pooled_s = F.adaptive_avg_pool1d(student_feat, size)
            pooled_t = F.adaptive_avg_pool1d(teacher_feat, size)
        loss = loss + level_weight * F.mse_loss(pooled_s, pooled_t)
        total_weight += level_weight
    return loss / total_weight


def hcl_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    r"""ReviewKD's hierarchical context loss: MSE over a pyramid of average-pooled maps, summed over pairs.

    Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. For one pair
    of maps :math:`F^s, F^t` of the same shape (the student's fused feature and the teacher's),
    with :math:`P_l` adaptive average pooling to :math:`l \times l` (to length :math:`l` for
    1-D maps) and :math:`\ell` the mean squared error over all elements:

    .. math::
        \mathcal{L}_{pair} = \frac{\ell(F^s, F^t) + \sum_{k=1}^{K} 2^{-k}\,
        \ell\big(P_{l_k}(F^s), P_{l_k}(F^t)\big)}{1 + \sum_{k=1}^{K} 2^{-k}}, \qquad
        \mathcal{L} = \sum_{pairs} \mathcal{L}_{pair}

    where :math:`l_1 > l_2 > \dots > l_K` are the levels of :math:`(4, 2, 1)` *smaller* than
    the map. The full map has weight 1 and every level used halves the weight: an 8x8 map
    gives weights 1, 1/2, 1/4, 1/8 (levels 4, 2, 1; total 1.875), a 4x4 map 1, 1/2, 1/4 (levels
    2, 1), a 1x1 map (the pooled feature) only the plain MSE. This is ``hcl`` of the authors'
    code (``CIFAR-100/model/reviewkd.py`` of ``dvlab-research/ReviewKD``; ``hcl_loss`` in
    ``mdistiller/distillers/ReviewKD.py`` of ``megvii-research/mdistiller`` is the same):
    ``F.mse_loss`` (mean), ``F.adaptive_avg_pool2d``, a level skipped when ``l >= h``, the sum
    over pairs. The authors test the height only and pool to a square; here a level is used
    when it is smaller than every spatial size, the same for their square maps. Their
    ``zip`` silently drops unpaired maps; here the numbers must match.

    Args:
        student_feats: ``(N, C, H, W)`` (or ``(N, C, L)``) maps, e.g. ReviewKD's fused student
            features, one per pair.
        teacher_feats: the teacher's maps, in the same order, each of its pair's shape.

    Returns:
        Scalar: the sum over the pairs of each pair's weighted mean of its levels' MSEs.
    """
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"hcl_loss needs one teacher map per student map (at least one pair), got {len(student_feats)} "
            f"student and {len(teacher_feats)} teacher maps."
        )
    for index, (student, teacher) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if student.ndim not in (3, 4) or teacher.ndim not in (3, 4):
            raise ValueError(
                f"student_feats[{index}] has shape {tuple(student.shape)} and teacher_feats[{index}] has "
                f"shape {tuple(teacher.shape)}: expected (N, C, H, W) (or (N, C, L)) maps."
            )
        _check_same_shape(
            f"student_feats[{index}]",
            student,
            f"teacher_feats[{index}]",
            teacher,
            hint="HCL compares maps of equal shape: map the student's features onto the teacher's first.",
        )
    loss = _hcl_pair(student_feats[0], teacher_feats[0])
    for student, teacher in zip(student_feats[1:], teacher_feats[1:], strict=True):
        loss = loss + _hcl_pair(student, teacher)
    return loss


#: upper bound of the fusion width, as ``min(512, in_channels[-1])`` in the authors' ``ReviewKD``.
_MAX_MID_CHANNELS = 512


class ABF(nn.Module):
    """Attention-based fusion of ReviewKD: one level of the review chain, from deep to shallow.

    Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, as ``ABF`` of
    the authors' code (``CIFAR-100/model/reviewkd.py`` of ``dvlab-research/ReviewKD``):

    1. ``conv1``: a bias-free 1x1 convolution and a BatchNorm take the student's feature of
       this level to ``mid_channels``;
    2. with ``fuse`` (every level but the deepest): the residual of the next deeper level,
       resized to this level's size (``F.interpolate``, mode ``nearest``), is fused with it by
       attention: ``att_conv`` (a 1x1 convolution with bias on the concatenation
       ``[x, residual]`` to 2 maps, then a sigmoid) gives two weights per position, and
       ``x = x * a_0 + residual * a_1``;
    3. ``x`` is resized (``nearest``) to ``out_size`` when it differs (the teacher's size at
       this level); it is the residual handed to the next shallower level;
    4. ``conv2``: a bias-free 3x3 convolution (padding 1) and a BatchNorm take ``x`` to the
       teacher's ``out_channels``: the fused feature compared with the teacher's.

    ``conv1`` and ``conv2`` are initialised with ``kaiming_uniform_(a=1)``, the rest with
    PyTorch's defaults, as theirs. ``spatial_dims=1`` builds the same module for ``(N, C, L)``
    sequences (``Conv1d``, ``BatchNorm1d``, 1-D nearest interpolation). The authors resize by
    the last dimension only, to a square; here every spatial dimension is matched, the same for
    their square maps.

    Args:
        in_channels: channels of the student's feature at this level.
        mid_channels: channels of the fused feature and of the residual (the same at all levels).
        out_channels: channels of the teacher's feature at this level.
        fuse: whether the level receives a residual (``False`` for the deepest level only).
        spatial_dims: 2 for ``(N, C, H, W)`` maps, 1 for ``(N, C, L)`` sequences.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 (sequences) or 2 (images), got {spatial_dims}.")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm1d
        self.spatial_dims = spatial_dims
        self.conv1 = nn.Sequential(
            conv(in_channels, mid_channels, kernel_size=1, bias=False), norm(mid_channels)
        )
        self.conv2 = nn.Sequential(
            conv(mid_channels, out_channels, kernel_size=3, padding=1, bias=False), norm(out_channels)
        )
        self.att_conv = (
            nn.Sequential(conv(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None = None, out_size: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Fuse the student's feature ``x`` with the deeper level's ``residual``.

        Args:
            x: ``(N, in_channels, *size)`` the student's feature at this level.
            residual: ``(N, mid_channels, ...)`` the residual of the next deeper level; required
                exactly when the module fuses.
            out_size: the teacher's spatial size at this level; default: ``x``'s.

        Returns:
            ``(output, residual)``: ``(N, out_channels, *out_size)`` the fused feature to compare
            with the teacher's, and ``(N, mid_channels, *out_size)`` the residual for the next
            shallower level.
        """
        if x.ndim != self.spatial_dims + 2:
            expected = "(N, C, H, W)" if self.spatial_dims == 2 else "(N, C, L)"
            raise ValueError(f"ABF expects {expected} features, got shape {tuple(x.shape)}.")
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("This ABF fuses a deeper level's residual: pass `residual`.")
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        elif residual is not None:
            raise ValueError("This ABF is the deepest level (fuse=False): it takes no residual.")
        if out_size is not None and tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewKDTerm(LayerListTerm):
    """ReviewKD (Chen et al., CVPR 2021): student features reviewed from deep to shallow, matched by HCL.

    The layers are listed from shallow to deep, one teacher layer per student layer. Each level
    has an :class:`ABF`, built in :meth:`build` from the probe step's shapes and trained with
    the student. :meth:`forward` runs the review chain from the deepest level to the shallowest
    (the deepest ABF gets no residual; each shallower one fuses the residual of the level below
    it) and returns :func:`~lightning_kd.losses.functional.hcl_loss` of the fused features
    against the teacher's features (detached), summed over the levels.

    As ``ReviewKD`` and ``train.py`` of the authors' CIFAR-100 code (``dvlab-research/ReviewKD``):

    - the width of every fusion is ``min(512, C)``, ``C`` the channels of the student's deepest
      level (the default of ``mid_channels``);
    - their levels are the outputs of the three stages and the globally pooled feature (an
      ``(N, C, 1, 1)`` level); here an ``(N, C)`` vector feature (e.g. the CIFAR ResNets'
      ``flatten``) is such a level: it is viewed as ``(N, C, 1, 1)``, or as ``(N, C, 1)`` when
      the other levels are ``(N, C, L)`` sequences (as ``(N, C, 1, 1)`` when every level is a
      vector); its HCL is the plain MSE, and its residual is spread over the next level by the
      nearest interpolation;
    - the student's features are the post-ReLU stage outputs, the teacher's the **pre-ReLU**
      ones (``is_feat=True, preact=True``: ``preact_feature_paths`` of the CIFAR models);
    - the loss is added with weight 5 for resnet32x4 -> resnet8x4 (``script/reviewKD.sh``;
      0.6 to 8 for other pairs, 1 by default) to cross-entropy with weight 1 and no KD, and
      warmed up linearly from 0 over 20 epochs (``min(1, epoch / 20)``, epochs counted from 0):
      ``LossWeightSchedule(term, start=0.0, end=weight, interval="epoch", total=20)``.

    Their training loop runs the teacher in train mode (its BatchNorms use the batch's
    statistics); a frozen teacher here stays in eval mode (running statistics). The spatial
    sizes of a level may differ between student and teacher: the fused feature is resized to
    the teacher's size (nearest), as the authors' ``out_shapes``.

    Args:
        student_layers: dotted paths of the student layers, shallow to deep.
        teacher_layers: the matching teacher layers, in the same order.
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        mid_channels: width of the fusions; default ``min(512, C)`` for the student's deepest
            level's channels ``C``, as the authors.
    """

    adapter_attributes = {"abfs": "ABFs"}

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        name: str = "reviewkd",
        weight: float = 1.0,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__(student_layers, teacher_layers, name, weight)
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError(
                f"ReviewKDTerm needs one teacher layer per student layer (at least one), got "
                f"{len(student_layers)} student layers {list(student_layers)} and {len(teacher_layers)} "
                f"teacher layers {list(teacher_layers)}."
            )
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}.")
        self.mid_channels = mid_channels
        self.abfs: nn.ModuleList | None = None

    def _levels(self, outputs: StepOutputs) -> tuple[list[Tensor], list[Tensor]]:
        """Student and (detached) teacher features, shallow to deep, vectors viewed as maps."""
        student, teacher = (
            self.captured_features(outputs, "student"),
            self.captured_features(outputs, "teacher"),
        )
        shapes = [
            (f"student layer {layer!r}", tuple(feature.shape))
            for layer, feature in zip(self._student_layers, student, strict=True)
        ] + [
            (f"teacher layer {layer!r}", tuple(feature.shape))
            for layer, feature in zip(self._teacher_layers, teacher, strict=True)
        ]
        described = ", ".join(f"{where} {shape}" for where, shape in shapes)
        if any(len(shape) not in (2, 3, 4) for _, shape in shapes):
            raise ValueError(
                f"Loss term {self.name!r}: ReviewKD fuses (N, C, H, W) maps, (N, C, L) sequences and (N, C) "
                f"vectors; got {described}."
            )
        if len({shape[0] for _, shape in shapes}) != 1:
            raise ValueError(f"Loss term {self.name!r}: the features differ in batch size: {described}.")
        map_ranks = {len(shape) for _, shape in shapes if len(shape) > 2}
        if len(map_ranks) > 1:
            raise ValueError(
                f"Loss term {self.name!r}: these shapes cannot be fused, the review chain needs all "
                f"(N, C, H, W) maps or all (N, C, L) sequences (plus (N, C) vectors): {described}."
            )
        spatial_dims = 1 if map_ranks == {3} else 2

        def as_map(feature: Tensor) -> Tensor:
            if feature.ndim > 2:
                return feature
            return feature.reshape(*feature.shape, *([1] * spatial_dims))

        return [as_map(f) for f in student], [as_map(f) for f in teacher]

    def build(self, outputs: StepOutputs) -> None:
        """Create one ABF per level from the probe step's shapes (the deepest without fusion)."""
        student, teacher = self._levels(outputs)
        mid = self.mid_channels
        if mid is None:
            mid = min(_MAX_MID_CHANNELS, student[-1].shape[1])
        spatial_dims = student[0].ndim - 2
        deepest = len(student) - 1
        self.abfs = nn.ModuleList(
            ABF(s.shape[1], mid, t.shape[1], fuse=index < deepest, spatial_dims=spatial_dims)
            for index, (s, t) in enumerate(zip(student, teacher, strict=True))
        ).to(student[0].device)

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``hcl_loss`` of the fused student features (review from deep to shallow) and the teacher's."""
        abfs = self.built_adapter("abfs")
        student, teacher = self._levels(outputs)
        fused: list[Tensor] = []
        residual: Tensor | None = None
        for abf, student_feat, teacher_feat in zip(
            reversed(abfs), reversed(student), reversed(teacher), strict=True
        ):
            output, residual = abf(student_feat, residual, tuple(teacher_feat.shape[2:]))
            fused.insert(0, output)
        return hcl_loss(fused, teacher)

    def extra_repr(self) -> str:
        """Name, weight, layers and fusion width, shown in the module repr."""
        return f"{super().extra_repr()}, mid_channels={self.mid_channels}"
