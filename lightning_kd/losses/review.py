"""ReviewKD: the student's stages reviewed from deep to shallow, fused by attention, matched by HCL."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs, first_tensor

__all__ = ["ABF", "ReviewKDTerm"]

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


class ReviewKDTerm(LossTerm):
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

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        name: str = "reviewkd",
        weight: float = 1.0,
        mid_channels: int | None = None,
    ) -> None:
        super().__init__(name, weight)
        if isinstance(student_layers, str) or isinstance(teacher_layers, str):
            raise TypeError("student_layers and teacher_layers are lists of layer paths, not single strings.")
        if len(student_layers) != len(teacher_layers) or not student_layers:
            raise ValueError(
                f"ReviewKDTerm needs one teacher layer per student layer (at least one), got "
                f"{len(student_layers)} student layers {list(student_layers)} and {len(teacher_layers)} "
                f"teacher layers {list(teacher_layers)}."
            )
        if mid_channels is not None and mid_channels < 1:
            raise ValueError(f"mid_channels must be >= 1, got {mid_channels}.")
        self._student_layers = tuple(student_layers)
        self._teacher_layers = tuple(teacher_layers)
        self.mid_channels = mid_channels
        self.abfs: nn.ModuleList | None = None

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The student layers, shallow to deep."""
        return self._student_layers

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        """The teacher layers, shallow to deep."""
        return self._teacher_layers

    @property
    def needs_build(self) -> bool:
        """Until the ABFs exist."""
        return self.abfs is None

    def _captured(self, features: dict, layer: str) -> Tensor:
        try:
            return first_tensor(features[layer])
        except KeyError:
            raise KeyError(
                f"Loss term {self.name!r}: no captured output for layer {layer!r}. Features are captured by "
                "the FeatureHooks that DistillationModule adds for the layers its terms declare; call the "
                "term inside a fit, or attach FeatureHooks yourself."
            ) from None

    def _levels(self, outputs: StepOutputs) -> tuple[list[Tensor], list[Tensor]]:
        """Student and (detached) teacher features, shallow to deep, vectors viewed as maps."""
        student = [self._captured(outputs.student_features, layer) for layer in self._student_layers]
        teacher = [self._captured(outputs.teacher_features, layer).detach() for layer in self._teacher_layers]
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
        if self.abfs is None:
            raise RuntimeError(f"Loss term {self.name!r} has no ABFs yet: the module builds them in setup().")
        student, teacher = self._levels(outputs)
        fused: list[Tensor] = []
        residual: Tensor | None = None
        for abf, student_feat, teacher_feat in zip(
            reversed(self.abfs), reversed(student), reversed(teacher), strict=True
        ):
            output, residual = abf(student_feat, residual, tuple(teacher_feat.shape[2:]))
            fused.insert(0, output)
        return functional.hcl_loss(fused, teacher)

    def extra_repr(self) -> str:
        """Name, weight, layers and fusion width, shown in the module repr."""
        layers = f"student_layers={self._student_layers}, teacher_layers={self._teacher_layers}"
        return f"{super().extra_repr()}, {layers}, mid_channels={self.mid_channels}"
