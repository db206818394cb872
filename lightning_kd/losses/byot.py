r"""Be Your Own Teacher (BYOT): the student's deepest classifier teaches auxiliary heads on its own stages.

Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019:

.. math::
    \mathcal{L} = \sum_{i=1}^{C-1} \Big[(1 - \alpha)\,\mathrm{CE}(z_i, y)
    + \alpha\, T^2 \mathrm{KL}\big(\mathrm{softmax}(z_C / T) \,\|\, \mathrm{softmax}(z_i / T)\big)
    + \lambda \frac{1}{N} \sum_n \lVert F_{i,n} - F_{C,n} \rVert_2^2\Big]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.hooks import LayerHooks, first_tensor
from lightning_kd.losses._checks import _check_positive, _check_same_shape, _check_targets
from lightning_kd.losses.base import LayerListTerm, LossTerm, StepOutputs, checked_temperature, checked_weight
from lightning_kd.losses.kd import kd_loss
from lightning_kd.model_io import logits_of
from lightning_kd.precision import float32_math

__all__ = ["AuxiliaryHead", "byot_loss", "BYOTTerm", "make_auxiliary_head"]


@float32_math
def _byot_head(
    logits: Tensor,
    feature: Tensor,
    deep_logits: Tensor,
    deep_feature: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float,
    feature_weight: float,
) -> Tensor:
    """BYOT loss of one shallow classifier (see :func:`byot_loss`); the deepest outputs are detached."""
    cross_entropy = F.cross_entropy(logits, target)
    distillation = kd_loss(logits, deep_logits.detach(), temperature)
    hint = (feature - deep_feature.detach()).pow(2).flatten(1).sum(dim=1).mean()
    return (1 - alpha) * cross_entropy + alpha * distillation + feature_weight * hint


def byot_loss(
    shallow_logits: Sequence[Tensor],
    shallow_features: Sequence[Tensor],
    deep_logits: Tensor,
    deep_feature: Tensor,
    target: Tensor,
    alpha: float = 0.3,
    temperature: float = 3.0,
    feature_weight: float = 1e-4,
) -> Tensor:
    r"""Be Your Own Teacher: the deepest classifier teaches the shallow classifiers of the same network.

    Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of
    Convolutional Neural Networks via Self Distillation", ICCV 2019. With shallow classifiers
    :math:`i = 1 \dots C-1` (logits :math:`z_i`, bottleneck features :math:`F_i`), the deepest
    classifier's logits :math:`z_C` and its input feature :math:`F_C` (both detached: the
    deepest classifier teaches and is not taught), labels :math:`y`, batch size :math:`N`:

    .. math::
        \mathcal{L} = \sum_{i=1}^{C-1} \Big[ (1 - \alpha)\,\mathrm{CE}(z_i, y)
        + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_C / T) \,\|\, \mathrm{softmax}(z_i / T)\big)
        + \lambda\, \frac{1}{N} \sum_{n} \lVert F_{i,n} - F_{C,n} \rVert_2^2 \Big]

    Reductions: CE averaged over the batch; KL summed over classes and averaged over the batch
    (``batchmean``, as :func:`kd_loss`), times :math:`T^2`; the hint is each sample's squared
    L2 distance (summed over every feature element), averaged over the batch. The deepest
    classifier's own cross-entropy is not part of this loss (a separate ``CrossEntropyTerm``).

    Reference code: the authors' ``train.py`` (``ArchipLab-LinfengZhang/pytorch-self-distillation-final``)
    uses :math:`\alpha = 0.3` (``loss_coefficient``) and :math:`T = 3`, the defaults here; its
    KD part is the soft-target cross-entropy, which differs from the KL by the teacher's
    entropy (same gradient) and has no :math:`T^2` (a factor 9 smaller at :math:`T = 3`), and
    it has no hint term; the deepest CE has weight 1. ``luanyunteng/pytorch-be-your-own-teacher``
    (``train.py``) adds the hint as ``beta * sum((F_i - F_C)**2 * mask)`` summed over the batch,
    with ``beta = 1e-6`` at batch 128 and a mask (either feature positive) that changes nothing
    for post-ReLU features: :math:`\lambda = \beta N \approx 10^{-4}`, the default here.

    Args:
        shallow_logits: ``(N, K)`` logits of each shallow classifier.
        shallow_features: ``(N, ...)`` bottleneck feature of each shallow classifier, each of
            ``deep_feature``'s shape.
        deep_logits: ``(N, K)`` logits of the deepest classifier (detached here).
        deep_feature: ``(N, ...)`` the deepest classifier's input feature (detached here).
        target: ``(N,)`` class indices.
        alpha: share of the distillation part, :math:`0 \le \alpha \le 1`; ``1 - alpha`` goes to CE.
        temperature: softening temperature :math:`T > 0`.
        feature_weight: :math:`\lambda \ge 0`, the weight of the hint.

    Returns:
        Scalar: the sum over the shallow classifiers.
    """
    shallow_logits, shallow_features = list(shallow_logits), list(shallow_features)
    if not shallow_logits or len(shallow_logits) != len(shallow_features):
        raise ValueError(
            f"byot_loss needs one feature per shallow classifier (at least one), got {len(shallow_logits)} "
            f"logits and {len(shallow_features)} features."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (the share of distillation), got {alpha}.")
    _check_positive("temperature", temperature)
    if not feature_weight >= 0:
        raise ValueError(f"feature_weight must be >= 0, got {feature_weight}.")
    _check_targets(deep_logits, target)
    for index, (logits, feature) in enumerate(zip(shallow_logits, shallow_features, strict=True)):
        _check_same_shape(
            f"shallow_logits[{index}]",
            logits,
            "deep_logits",
            deep_logits,
            hint="Every classifier must predict the same classes.",
        )
        _check_same_shape(
            f"shallow_features[{index}]",
            feature,
            "deep_feature",
            deep_feature,
            hint="Each shallow head's bottleneck must map its feature onto the deepest feature's shape.",
        )
    heads = zip(shallow_logits, shallow_features, strict=True)
    losses = [
        _byot_head(logits, feature, deep_logits, deep_feature, target, alpha, temperature, feature_weight)
        for logits, feature in heads
    ]
    return torch.stack(losses).sum()


class AuxiliaryHead(nn.Module):
    """A shallow classifier of BYOT: ``bottleneck`` (feature ``F_i``), then a linear ``classifier`` (``q_i``).

    Args:
        bottleneck: maps the hooked stage output onto the deepest feature's size.
        classifier: maps ``F_i`` to logits.
    """

    def __init__(self, bottleneck: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.classifier = classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(F_i, logits)`` of a stage output ``x``."""
        feature = self.bottleneck(x)
        return feature, self.classifier(feature)


def make_auxiliary_head(
    stage_shape: tuple[int, ...], feature_size: int, num_classes: int, relu: bool = True
) -> AuxiliaryHead:
    """A BYOT head for a stage output of ``stage_shape``, producing a ``feature_size`` vector and logits.

    - ``(N, C)`` vectors: ``Linear(C, D)`` (+ ReLU);
    - ``(N, C, L)`` / ``(N, C, H, W)`` maps: a stride-2 3x3 convolution ``C -> D`` + BatchNorm
      (+ ReLU), then global average pooling to ``(N, D)``;

    then ``Linear(D, num_classes)``. ``D = feature_size`` is the size of the deepest feature. The
    authors' heads (``resnet.py`` of ``ArchipLab-LinfengZhang/pytorch-self-distillation-final``)
    are stacks of separable stride-2 convolutions, one per stage left to the deepest one, each
    ending in BatchNorm + ReLU, then average pooling; one convolution keeps the heads small here.

    Args:
        stage_shape: shape of the hooked stage output, batch first.
        feature_size: ``D``, the number of elements of one sample's deepest feature.
        num_classes: outputs of the classifier.
        relu: end the bottleneck with a ReLU (for a post-ReLU deepest feature, which the hint
            then can match).

    Raises:
        ValueError: the stage output is neither a vector nor a 1-D / 2-D map.
    """
    activation: list[nn.Module] = [nn.ReLU()] if relu else []
    ndim = len(stage_shape)
    if ndim == 2:
        bottleneck: nn.Module = nn.Sequential(nn.Linear(stage_shape[1], feature_size), *activation)
    elif ndim in (3, 4):
        conv = nn.Conv1d if ndim == 3 else nn.Conv2d
        norm = nn.BatchNorm1d if ndim == 3 else nn.BatchNorm2d
        pool = nn.AdaptiveAvgPool1d(1) if ndim == 3 else nn.AdaptiveAvgPool2d(1)
        bottleneck = nn.Sequential(
            conv(stage_shape[1], feature_size, kernel_size=3, stride=2, padding=1, bias=False),
            norm(feature_size),
            *activation,
            pool,
            nn.Flatten(),
        )
    else:
        raise ValueError(
            f"A BYOT head needs a stage output of shape (N, C), (N, C, L) or (N, C, H, W), got "
            f"{stage_shape}. Hook a layer that returns one of these."
        )
    return AuxiliaryHead(bottleneck, nn.Linear(feature_size, num_classes))


class BYOTTerm(LayerListTerm):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): auxiliary classifiers on the student's own stages.

    One :class:`AuxiliaryHead` per layer of ``shallow_layers`` reads that stage's output and
    yields a feature :math:`F_i` of the deepest feature's size and logits :math:`z_i`. The
    student's own logits :math:`z_C` and its feature at ``deep_layer`` :math:`F_C` (the input of
    its final classifier, flattened to ``(N, D)``) teach every head:
    ``sum_i (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_C/T) || softmax(z_i/T))
    + feature_weight ||F_i - F_C||^2``, with :math:`z_C, F_C` detached (see
    :func:`lightning_kd.losses.functional.byot_loss` for the reductions). The deepest
    classifier's own cross-entropy is a separate :class:`~lightning_kd.losses.cross_entropy.CrossEntropyTerm`
    (weight 1 in the authors' code). No teacher is needed.

    The heads (:func:`make_auxiliary_head`) are built on the module's probe batch, owned by this
    term, trained with the student and saved in checkpoints; the student itself is unchanged, so
    inference and export use it alone. :meth:`head_logits` returns every classifier's
    predictions for a batch (the authors also report the mean of all classifiers' logits).

    Args:
        shallow_layers: dotted paths of the student stages that get a head, shallowest first
            (e.g. ``["conv1", "conv2", "conv3"]`` for ``ConvNet1d``, ``["features.2"]`` for ``MLP``).
        deep_layer: dotted path of the layer whose output the student's final classifier reads
            (``"embedding"`` for ``ConvNet1d``, ``"features"`` for ``MLP``).
        name: key of the term (``train/loss_<name>``).
        weight: factor in the total loss.
        alpha: share of distillation in each head's loss; ``1 - alpha`` goes to its CE.
        temperature: softening temperature :math:`T`.
        feature_weight: lambda, the weight of the feature hint (per-sample squared L2 distance).
        bottleneck_relu: end each bottleneck with a ReLU; right when ``deep_layer``'s output is
            post-ReLU (as in ``MLP`` and ``ConvNet1d``), set ``False`` otherwise.
    """

    needs_teacher = False
    adapter_attributes = {"heads": "heads"}

    def __init__(
        self,
        shallow_layers: Sequence[str],
        deep_layer: str,
        name: str = "byot",
        weight: float = 1.0,
        alpha: float = 0.3,
        temperature: float = 3.0,
        feature_weight: float = 1e-4,
        bottleneck_relu: bool = True,
    ) -> None:
        if isinstance(shallow_layers, str):
            raise TypeError("shallow_layers is a list of layer paths, not a single string.")
        super().__init__((*shallow_layers, deep_layer), (), name, weight)
        if not self.shallow_layers:
            raise ValueError("shallow_layers is empty: name at least one student layer to attach a head to.")
        if deep_layer in self.shallow_layers or len(set(self.shallow_layers)) != len(self.shallow_layers):
            raise ValueError(
                f"shallow_layers {list(self.shallow_layers)} must be distinct and must not contain "
                f"deep_layer {deep_layer!r}."
            )
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (the share of distillation), got {alpha}.")
        if not feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}.")
        self.alpha = float(alpha)
        self.temperature = checked_temperature(temperature)
        self.feature_weight = checked_weight(feature_weight, name, "feature_weight")
        self.bottleneck_relu = bool(bottleneck_relu)
        self.heads: nn.ModuleList | None = None

    @property
    def shallow_layers(self) -> tuple[str, ...]:
        """The student stages that get a head, shallowest first."""
        return self.student_layers[:-1]

    @property
    def deep_layer(self) -> str:
        """The layer whose output the student's final classifier reads."""
        return self.student_layers[-1]

    def build(self, outputs: StepOutputs) -> None:
        """Create one head per shallow layer from the probe step's shapes."""
        deep = self.captured_feature(outputs, "student", self.deep_layer).flatten(1)
        if self.bottleneck_relu and bool((deep < 0).any()):
            raise ValueError(
                f"Loss term {self.name!r}: the output of deep_layer {self.deep_layer!r} has negative values, "
                "but the heads end in a ReLU and could not match it. Hook the post-ReLU feature that the "
                "final classifier reads, or set bottleneck_relu=False."
            )
        num_classes = outputs.student_logits.shape[-1]
        heads = [
            make_auxiliary_head(
                tuple(self.captured_feature(outputs, "student", layer).shape),
                deep.shape[1],
                num_classes,
                self.bottleneck_relu,
            )
            for layer in self.shallow_layers
        ]
        self.heads = nn.ModuleList(heads).to(deep.device)

    def _run_heads(self, stages: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(features, logits)`` of the heads, from the outputs of ``shallow_layers`` in that order."""
        outputs = [head(stage) for head, stage in zip(self.built_adapter("heads"), stages, strict=True)]
        return [feature for feature, _ in outputs], [logits for _, logits in outputs]

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``byot_loss`` of every head against the student's logits and deepest feature (both detached)."""
        targets = self.required_targets(outputs, why=" (BYOT)")
        deep = self.captured_feature(outputs, "student", self.deep_layer).flatten(1)
        features, logits = self._run_heads(
            [self.captured_feature(outputs, "student", layer) for layer in self.shallow_layers]
        )
        return byot_loss(
            logits,
            features,
            outputs.student_logits,
            deep,
            targets,
            alpha=self.alpha,
            temperature=self.temperature,
            feature_weight=self.feature_weight,
        )

    def head_logits(self, student: nn.Module, inputs: Any) -> dict[str, Tensor]:
        """Every classifier's logits for ``inputs``: each head's by layer path, the student's as ``"final"``.

        Runs ``student`` once with temporary hooks on the shallow layers. Call it under
        ``torch.no_grad()`` with the module in eval mode (``module.eval()``, which also switches
        the heads' BatchNorms) for predictions, e.g.
        ``module.loss_terms["byot"].head_logits(module.student, x)``.
        """
        with LayerHooks.on(student, self.shallow_layers, "student") as hooks:
            final = student(inputs)
            stages = [first_tensor(hooks.captured[layer]) for layer in self.shallow_layers]
        _, logits = self._run_heads(stages)
        result = dict(zip(self.shallow_layers, logits, strict=True))
        result["final"] = logits_of(final)
        return result

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return (
            f"{LossTerm.extra_repr(self)}, shallow_layers={list(self.shallow_layers)}, "
            f"deep_layer={self.deep_layer!r}, alpha={self.alpha}, temperature={self.temperature}, "
            f"feature_weight={self.feature_weight}"
        )
