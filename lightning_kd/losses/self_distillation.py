"""Be Your Own Teacher (BYOT): the student's deepest classifier teaches auxiliary heads on its own stages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_kd.callbacks.feature_hooks import find_layer
from lightning_kd.losses import functional
from lightning_kd.losses.base import LossTerm, StepOutputs, checked_temperature, first_tensor
from lightning_kd.model_io import logits_of

__all__ = ["AuxiliaryHead", "BYOTTerm", "make_auxiliary_head"]


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


class BYOTTerm(LossTerm):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): auxiliary classifiers on the student's own stages.

    One :class:`AuxiliaryHead` per layer of ``shallow_layers`` reads that stage's output and
    yields a feature :math:`F_i` of the deepest feature's size and logits :math:`z_i`. The
    student's own logits :math:`z_C` and its feature at ``deep_layer`` :math:`F_C` (the input of
    its final classifier, flattened to ``(N, D)``) teach every head:
    ``sum_i (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_C/T) || softmax(z_i/T))
    + feature_weight ||F_i - F_C||^2``, with :math:`z_C, F_C` detached (see
    :func:`lightning_kd.losses.functional.byot_loss` for the reductions). The deepest
    classifier's own cross-entropy is a separate :class:`~lightning_kd.losses.response.CrossEntropyTerm`
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
        super().__init__(name, weight)
        self.shallow_layers = tuple(shallow_layers)
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
        self.deep_layer = deep_layer
        self.alpha = float(alpha)
        self.temperature = checked_temperature(temperature)
        self.feature_weight = float(feature_weight)
        self.bottleneck_relu = bool(bottleneck_relu)
        self.heads: nn.ModuleList | None = None

    @property
    def student_layers(self) -> tuple[str, ...]:
        """The shallow stages and the deepest feature."""
        return (*self.shallow_layers, self.deep_layer)

    @property
    def needs_build(self) -> bool:
        """Until the heads exist."""
        return self.heads is None

    def _feature(self, outputs: StepOutputs, layer: str) -> Tensor:
        try:
            return first_tensor(outputs.student_features[layer])
        except KeyError:
            raise KeyError(
                f"Loss term {self.name!r}: no captured output for student layer {layer!r}. Features are "
                "captured by the FeatureHooks that DistillationModule adds for the layers its terms declare; "
                "call the term inside a fit, or attach FeatureHooks yourself."
            ) from None

    def build(self, outputs: StepOutputs) -> None:
        """Create one head per shallow layer from the probe step's shapes."""
        deep = self._feature(outputs, self.deep_layer).flatten(1)
        if self.bottleneck_relu and bool((deep < 0).any()):
            raise ValueError(
                f"Loss term {self.name!r}: the output of deep_layer {self.deep_layer!r} has negative values, "
                "but the heads end in a ReLU and could not match it. Hook the post-ReLU feature that the "
                "final classifier reads, or set bottleneck_relu=False."
            )
        num_classes = outputs.student_logits.shape[-1]
        heads = [
            make_auxiliary_head(
                tuple(self._feature(outputs, layer).shape), deep.shape[1], num_classes, self.bottleneck_relu
            )
            for layer in self.shallow_layers
        ]
        self.heads = nn.ModuleList(heads).to(deep.device)

    def _run_heads(self, stages: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(features, logits)`` of the heads, from the outputs of ``shallow_layers`` in that order."""
        if self.heads is None:
            raise RuntimeError(
                f"Loss term {self.name!r} has no heads yet: the module builds them in setup()."
            )
        outputs = [head(stage) for head, stage in zip(self.heads, stages, strict=True)]
        return [feature for feature, _ in outputs], [logits for _, logits in outputs]

    def forward(self, outputs: StepOutputs) -> Tensor:
        """``byot_loss`` of every head against the student's logits and deepest feature (both detached)."""
        if outputs.targets is None:
            raise ValueError(f"Loss term {self.name!r} (BYOT) needs labels, but the batch has no targets.")
        deep = self._feature(outputs, self.deep_layer).flatten(1)
        features, logits = self._run_heads([self._feature(outputs, layer) for layer in self.shallow_layers])
        return functional.byot_loss(
            logits,
            features,
            outputs.student_logits,
            deep,
            outputs.targets,
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
        captured: dict[str, Any] = {}
        handles = []
        for layer in self.shallow_layers:

            def hook(module: nn.Module, args: Any, output: Any, layer: str = layer) -> None:
                captured[layer] = output

            handles.append(find_layer(student, layer, "student").register_forward_hook(hook))
        try:
            final = student(inputs)
        finally:
            for handle in handles:
                handle.remove()
        _, logits = self._run_heads([first_tensor(captured[layer]) for layer in self.shallow_layers])
        result = dict(zip(self.shallow_layers, logits, strict=True))
        result["final"] = logits_of(final)
        return result

    def extra_repr(self) -> str:
        """Name, weight, layers and settings, shown in the module repr."""
        return (
            f"{super().extra_repr()}, shallow_layers={list(self.shallow_layers)}, "
            f"deep_layer={self.deep_layer!r}, alpha={self.alpha}, temperature={self.temperature}, "
            f"feature_weight={self.feature_weight}"
        )
